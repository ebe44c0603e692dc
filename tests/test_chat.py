"""``flashmoe_backend.chat`` (what the front ends share) and ``FlashMoE.shared``, on the demo store:
usage with a cached prompt prefix, tool calls from OpenAI dicts to the engine and back, settings
and tool checks, and the engine registry."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from flashmoe_backend import FlashMoE, GenerationResult, Stats, ToolError, chat
from flashmoe_backend.cli.demo import REQUEST, WEATHER_TOOL
from flashmoe_backend.store.format import read_manifest
from flashmoe_backend.store.source import default_store
from flashmoe_backend.tools.calls import InvalidToolCall, ToolCall

GB = 1024**3
HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello"},
]


@pytest.fixture(scope="module")
def engine() -> FlashMoE:
    engine = FlashMoE.load("demo")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def small_cache_gb() -> float:
    """A quarter of the demo's expert bytes: generating reads experts from disk."""
    return read_manifest(default_store()).expert_bytes / 4 / GB


# -- usage ------------------------------------------------------------------------------------


def test_usage_counts_the_whole_prompt_including_the_cached_prefix(engine: FlashMoE) -> None:
    first = engine.generate(HISTORY, max_tokens=4)
    again = engine.generate(HISTORY, max_tokens=4)  # the prompt cache holds all but its last token
    prompt_len = len(engine.encode(HISTORY))
    assert chat.usage(first).cached_tokens < prompt_len - 1
    usage = chat.usage(again)
    assert usage.cached_tokens == again.stats.prompt_cached_tokens == prompt_len - 1
    # OpenAI's meaning: prompt_tokens is the whole prompt, cached tokens are a part of it.
    assert usage.prompt_tokens == prompt_len == chat.usage(first).prompt_tokens
    assert usage.completion_tokens == len(again.token_ids) == again.stats.generated_tokens
    assert usage.to_dict() == {
        "prompt_tokens": prompt_len,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": prompt_len + usage.completion_tokens,
    }
    assert usage.to_openai()["prompt_tokens_details"] == {"cached_tokens": prompt_len - 1}


def _result(**fields) -> GenerationResult:
    base = {"text": "", "token_ids": [], "finish_reason": "stop", "stats": Stats()}
    return GenerationResult(**{**base, **fields})


def test_usage_precedence_token_ids_then_stats() -> None:
    stats = Stats(prompt_tokens=9, generated_tokens=9)
    both = _result(prompt_token_ids=[1, 2, 3], token_ids=[4], stats=stats)
    assert (chat.usage(both).prompt_tokens, chat.usage(both).completion_tokens) == (3, 1)
    stats_only = _result(stats=Stats(prompt_tokens=5, generated_tokens=2, prompt_cached_tokens=4))
    assert chat.usage(stats_only) == chat.Usage(prompt_tokens=5, completion_tokens=2, cached_tokens=4)
    assert chat.usage(stats_only).total_tokens == 7


def test_openai_finish_reason() -> None:
    assert [chat.openai_finish_reason(r) for r in ("stop", "length", "tool_calls", "incomplete")] == [
        "stop",
        "length",
        "tool_calls",
        "length",
    ]


# -- tool calls -------------------------------------------------------------------------------


def test_tool_call_round_trip_openai_to_engine_to_openai(engine: FlashMoE) -> None:
    result = engine.generate(REQUEST, tools=[WEATHER_TOOL], tool_choice="get_weather", max_tokens=64)
    (call,) = chat.openai_tool_calls(result)
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == result.tool_calls[0].arguments
    # An OpenAI assistant turn with that call, back to the engine: arguments as a dict again.
    (engine_call,) = chat.engine_tool_calls([call])
    assert engine_call == {
        "id": call["id"],
        "type": "function",
        "function": {"name": "get_weather", "arguments": result.tool_calls[0].arguments},
    }
    messages = [
        {"role": "user", "content": REQUEST},
        {"role": "assistant", "content": "", "tool_calls": [engine_call]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 21}'},
    ]
    text = engine.tokenizer.decode(engine.encode(messages, tools=[WEATHER_TOOL]))
    city = result.tool_calls[0].arguments["city"]
    assert f"<function=get_weather>\n<parameter=city>\n{city}\n</parameter>" in text
    assert chat.openai_tool_calls(_result(tool_calls=[ToolCall("f", {"a": [1]}, id="c1")])) == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1]}'}}
    ]


def test_engine_arguments_and_calls_without_ids() -> None:
    assert chat.engine_arguments('{"a": 1}') == {"a": 1}
    assert chat.engine_arguments("") == chat.engine_arguments(None) == {}
    assert chat.engine_arguments("<parameter=a>\nx") == "<parameter=a>\nx"  # as the model wrote it
    assert chat.engine_arguments("[1]") == "[1]"
    assert chat.engine_arguments({"a": 1}) == {"a": 1}
    assert chat.engine_tool_call("add", {"a": 1}) == {
        "id": "add",
        "type": "function",
        "function": {"name": "add", "arguments": {"a": 1}},
    }
    invalid = InvalidToolCall("add", "<parameter=a>\nx", "a: not an integer", id="c2")
    assert chat.invalid_tool_calls(_result(invalid_tool_calls=[invalid])) == [
        {"id": "c2", "name": "add", "arguments": "<parameter=a>\nx", "error": "a: not an integer"}
    ]


# -- settings and requests --------------------------------------------------------------------


def test_generation_settings_keeps_what_is_set() -> None:
    model = SimpleNamespace(
        max_tokens=8, temperature=None, top_p=None, top_k=0, min_p=None, repetition_penalty=None,
        seed=None, enable_thinking=False, stop=["\n"],
    )
    assert chat.generation_settings(model) == {"max_tokens": 8, "top_k": 0, "enable_thinking": False,
                                               "stop": ["\n"]}
    model.stop = []
    assert "stop" not in chat.generation_settings(model)


def test_check_bound_tools_uses_the_engines_checks() -> None:
    chat.check_bound_tools([WEATHER_TOOL, WEATHER_TOOL])  # a repeated schema binds
    chat.check_bound_tools([WEATHER_TOOL], "get_weather")
    with pytest.raises(ToolError, match="nope"):
        chat.check_bound_tools([WEATHER_TOOL], "nope")
    with pytest.raises(ToolError, match="lookup"):
        chat.check_bound_tools([{"type": "function", "function": {"name": "lookup", "description": "x"}}])


def test_engine_response_format() -> None:
    assert chat.engine_response_format({"type": "text"}) is None
    assert chat.engine_response_format(None) is None
    fmt = {"type": "json_object"}
    assert chat.engine_response_format(fmt) is fmt


# -- the registry -----------------------------------------------------------------------------


def test_shared_engine_per_resolved_store_and_options(tmp_path, monkeypatch, small_cache_gb: float) -> None:
    store = default_store()
    engine = FlashMoE.shared(store, small_cache_gb)
    link = tmp_path / "demo-link"
    os.symlink(store, link)
    monkeypatch.chdir(store.parent)
    for same in ("demo", link, store.name, str(store)):
        assert FlashMoE.shared(same, cache_gb=small_cache_gb) is engine, same
    assert FlashMoE.shared(store, small_cache_gb, None, io_threads=8) is engine  # a default, given
    assert FlashMoE.shared(store, small_cache_gb, prompt_cache_entries=2) is not engine
    assert FlashMoE.shared(store, small_cache_gb * 2) is not engine
    with pytest.raises(TypeError):
        FlashMoE.shared(store, no_such_option=1)


def test_release_shared_closes_and_forgets(monkeypatch, small_cache_gb: float) -> None:
    engine = FlashMoE.shared("demo", small_cache_gb)
    closed = []
    close = engine.close
    monkeypatch.setattr(engine, "close", lambda: (closed.append(engine), close()))
    FlashMoE.release_shared()
    assert closed == [engine]
    assert FlashMoE.shared("demo", small_cache_gb) is not engine
    FlashMoE.release_shared()
