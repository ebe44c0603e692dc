"""The embedded demo model: a valid store in the package, and `flashmoe demo` does its job offline."""

from __future__ import annotations

from flashmoe_backend.cli.commands import main
from flashmoe_backend.store.format import read_manifest, verify_store
from flashmoe_backend.store.source import default_store


def test_embedded_store_is_intact():
    store = default_store()
    assert verify_store(store).ok
    assert read_manifest(store).model_type == "qwen3_5_moe"


def test_embedded_tokenizer_is_the_one_every_loader_builds():
    # transformers (and so mlx-lm) builds a qwen3_5_moe tokenizer with Qwen3.5's own pre-tokenizer
    # whatever tokenizer.json says; the model must have been trained on exactly those tokens.
    from mlx_lm.utils import load_tokenizer
    from tokenizers import Tokenizer

    store = default_store()
    as_written = Tokenizer.from_file(str(store / "tokenizer.json"))
    as_loaded = load_tokenizer(store)
    text = "Ana moves to 13 Liostetaurk Avenue on Sunday 23 July 1991; it's 16:00, call 032 7899 6150."
    assert as_loaded.encode(text, add_special_tokens=False) == as_written.encode(text).ids


def test_demo_answers_from_the_document_and_calls_the_tool(capsys):
    assert main(["demo"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].strip() == "pharmacist"  # the answer, copied from the document
    assert 'tool call: get_weather({"city": "Lisbon"})' in err
    assert "hit rate" in err and "MiB read" in err


MAGIC = {"type": "function", "function": {
    "name": "magic_function", "description": "Apply a magic function to an input.",
    "parameters": {"type": "object", "properties": {"input": {"type": "integer"}}, "required": ["input"]}}}


def test_forced_call_ends_in_time_when_the_model_would_open_another():
    # The demo model follows its call with a second, parallel one; with 64 tokens the second
    # cannot finish, so the constraint must end after the first (a regression: it used to stop
    # constraining on the first full match and return one invalid, truncated call).
    from flashmoe_backend import FlashMoE

    engine = FlashMoE.load(default_store(), cache_gb=0.01)
    ask = [{"role": "user", "content": "What is the value of magic_function(3)? Use the tool."}]
    result = engine.generate(ask, tools=[MAGIC], tool_choice="required", max_tokens=64,
                             enable_thinking=False)
    assert result.finish_reason == "tool_calls", result.raw_text
    assert [c.name for c in result.tool_calls] == ["magic_function"]
    assert isinstance(result.tool_calls[0].arguments["input"], int)
    assert not result.invalid_tool_calls
    # With room for both, the second call is the model's choice and stays allowed.
    roomy = engine.generate(ask, tools=[MAGIC], tool_choice="required", max_tokens=160,
                            enable_thinking=False)
    assert roomy.finish_reason == "tool_calls" and not roomy.invalid_tool_calls
