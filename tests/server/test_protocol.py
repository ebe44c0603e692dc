"""The translation itself, without a server: OpenAI messages to the engine's, results to OpenAI's
objects, and the streamed chunks of tool calls and reasoning (``protocol``, ``streaming``)."""

from __future__ import annotations

import asyncio
import json

from flashmoe_backend.generation.params import Chunk, GenerationResult
from flashmoe_backend.generation.stats import Stats
from flashmoe_backend.server import protocol, streaming
from flashmoe_backend.tools.calls import ToolCall


def _result(**fields) -> GenerationResult:
    base = dict(text="", token_ids=[5, 6], finish_reason="stop", stats=Stats(), prompt_token_ids=[1, 2, 3])
    return GenerationResult(**{**base, **fields})


def _events(items, include_usage=False) -> list[dict]:
    async def collect():
        async def source():
            for item in items:
                yield item

        return [json.loads(e) async for e in streaming.chat_events(source(), "m", include_usage)]

    return asyncio.run(collect())


def test_engine_messages_parse_tool_call_arguments_and_map_developer():
    messages = protocol.engine_messages([
        {"role": "developer", "content": "Be brief.", "name": None},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
    ])
    assert messages[0] == {"role": "system", "content": "Be brief."}  # null fields left out
    assert messages[1]["tool_calls"] == [{"id": "c1", "type": "function", "function": {
        "name": "f", "arguments": {"x": 1}}}]
    assert messages[1]["content"] is None and messages[2]["tool_call_id"] == "c1"
    # a malformed call is passed on as sent: the engine's check names it
    assert protocol.engine_messages([{"role": "assistant", "tool_calls": ["f"]}])[0]["tool_calls"] == ["f"]


def test_assistant_message_with_calls_has_null_content_and_reasoning_apart():
    call = ToolCall("get_weather", {"city": "Lisbon"}, id="call_1")
    message = protocol.assistant_message(_result(tool_calls=[call], finish_reason="tool_calls",
                                                 reasoning="Need the weather."))
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'}}],
        "reasoning_content": "Need the weather.",
    }
    assert protocol.assistant_message(_result(text="")) == {"role": "assistant", "content": ""}


def test_incomplete_structured_output_is_length():
    completion = protocol.chat_completion(_result(text="{", finish_reason="incomplete"), "m")
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                                   "prompt_tokens_details": {"cached_tokens": 0}}


def test_streamed_reasoning_then_content():
    events = _events([Chunk("hmm", [1], "reasoning"), Chunk("", [2]), Chunk("Hi", [3]), _result(text="Hi")])
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas == [{"role": "assistant", "content": ""}, {"reasoning_content": "hmm"},
                      {"content": "Hi"}, {}]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in e for e in events)  # only with include_usage


def test_streamed_parallel_calls_each_have_their_index():
    calls = [ToolCall("a", {"text": "x" * 40}, id="call_a"), ToolCall("b", {}, id="call_b")]
    events = _events([_result(tool_calls=calls, finish_reason="tool_calls")], include_usage=True)
    deltas = [d for e in events[1:-2] for d in e["choices"][0]["delta"]["tool_calls"]]
    for index, call in enumerate(calls):
        mine = [d for d in deltas if d["index"] == index]
        assert mine[0] == {"index": index, "id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": ""}}
        assert "".join(d["function"]["arguments"] for d in mine[1:]) == json.dumps(call.arguments)
    assert len([d for d in deltas if d["index"] == 0]) > 2  # long arguments come in pieces
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls" and events[-2]["usage"] is None
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 5
