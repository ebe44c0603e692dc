"""The prompt cache on disk (``flashmoe serve --prompt-cache-dir``, ``FlashMoE.load(...,
prompt_cache_dir=)``): a restarted server's first request with the same system prompt and tools
has its prefix served from the file (``usage.prompt_tokens_details.cached_tokens``) and the same
answer; a damaged or mismatched file is ignored with a warning, the answer is unchanged, and the
file is written again."""

from __future__ import annotations

import shutil
import warnings

import pytest

from flashmoe_backend import FlashMoE, PromptCacheWarning
from flashmoe_backend.cli.demo import REQUEST, WEATHER_TOOL
from tests.server.conftest import GROUNDED, MODEL, spawn

AGENT = "You are a helpful assistant. Use the tools when they help."


def _chat(url: str, messages: list[dict]):
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    return client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0)


def _answer(response) -> tuple:
    message = response.choices[0].message
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return message.content, calls, response.choices[0].finish_reason


def test_a_restarted_server_serves_the_prefix_from_the_file(tmp_path):
    weather = [{"role": "system", "content": AGENT}, {"role": "user", "content": REQUEST}]
    with spawn("--prompt-cache-dir", str(tmp_path)) as url:
        first = _chat(url, GROUNDED)
        assert first.usage.prompt_tokens_details.cached_tokens == 0  # a fresh directory
        assert "pharmacist" in first.choices[0].message.content
        call = _chat(url, weather)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # one per system prompt + tools
    with spawn("--prompt-cache-dir", str(tmp_path)) as url:
        again = _chat(url, GROUNDED)  # the new process's first request
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert 0 < cached < again.usage.prompt_tokens
        assert _answer(again) == _answer(first)
        call_again = _chat(url, weather)
        assert call_again.usage.prompt_tokens_details.cached_tokens > 0
        assert _answer(call_again) == _answer(call)
        assert _answer(call)[1] == [("get_weather", '{"city": "Lisbon"}')]


# -- damaged and mismatched files, on the engine ---------------------------------------------


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(b"not a safetensors file")


def _flip_last_byte(path):  # array data: only the checksum notices
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def written(tmp_path_factory, engine):
    """A directory holding the file of GROUNDED's prefix, and the answer without any cache."""
    directory = tmp_path_factory.mktemp("prompt-cache")
    writer = FlashMoE.load(MODEL, prompt_cache_dir=directory)
    try:
        writer.generate(GROUNDED, tools=[WEATHER_TOOL], temperature=0)
    finally:
        writer.close()
    [path] = directory.glob("*.safetensors")
    reference = engine.generate(GROUNDED, tools=[WEATHER_TOOL], temperature=0)
    return path, reference


def _generate(directory, messages=GROUNDED):
    fresh = FlashMoE.load(MODEL, prompt_cache_dir=directory)
    try:
        return fresh.generate(messages, tools=[WEATHER_TOOL], temperature=0)
    finally:
        fresh.close()


@pytest.mark.parametrize(
    "damage,reason",
    [(_truncate, "unreadable"), (_garbage, "unreadable"), (_flip_last_byte, "checksum")],
    ids=["truncated", "garbage", "flipped-byte"],
)
def test_a_damaged_file_is_ignored_and_rewritten(tmp_path, written, damage, reason):
    good, reference = written
    path = tmp_path / good.name
    shutil.copy(good, path)
    assert _generate(tmp_path).stats.prompt_cached_tokens > 0  # the copy is used as it is
    damage(path)
    with pytest.warns(PromptCacheWarning, match=f"prompt cache file .* ignored: .*{reason}"):
        result = _generate(tmp_path)
    assert result.stats.prompt_cached_tokens == 0  # prefilled instead
    assert (result.text, result.token_ids) == (reference.text, reference.token_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptCacheWarning)
        assert _generate(tmp_path).stats.prompt_cached_tokens > 0  # the prefill wrote it again


def test_a_file_of_another_prefix_is_ignored(tmp_path, written, engine):
    good, _ = written
    other = [{"role": "system", "content": AGENT}, {"role": "user", "content": REQUEST}]
    reference = engine.generate(other, tools=[WEATHER_TOOL], temperature=0)
    probe = FlashMoE.load(MODEL, prompt_cache_dir=tmp_path)
    try:  # the file of GROUNDED's prefix put where the other prefix's file goes
        ids = probe.encode(other, tools=[WEATHER_TOOL])
        shutil.copy(good, probe.prompt_files.path(ids[: _shared_end(probe, other, ids)]))
        with pytest.warns(PromptCacheWarning, match="token prefix differs"):
            result = probe.generate(other, tools=[WEATHER_TOOL], temperature=0)
    finally:
        probe.close()
    assert result.stats.prompt_cached_tokens == 0 and result.token_ids == reference.token_ids
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", {"city": "Lisbon"})]


def _shared_end(engine, messages, ids) -> int:
    from flashmoe_backend.generation.prompt_cache import shared_prefix_end

    return shared_prefix_end(engine.tokenizer, messages, ids, [WEATHER_TOOL])


@pytest.mark.parametrize("value", [5, ""], ids=["not-a-path", "empty"])
def test_a_bad_prompt_cache_dir_is_refused_before_loading(value):
    from flashmoe_backend import ParameterError

    with pytest.raises(ParameterError, match="prompt_cache_dir must be a directory path or None"):
        FlashMoE.load(MODEL, prompt_cache_dir=value)


def test_a_prompt_cache_dir_that_is_a_file_is_refused(tmp_path):
    from flashmoe_backend import ParameterError

    (tmp_path / "file").write_text("")
    with pytest.raises(ParameterError, match="prompt_cache_dir .*file"):
        FlashMoE.load(MODEL, prompt_cache_dir=tmp_path / "file")
