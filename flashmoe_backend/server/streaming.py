"""Server-sent events of a streamed completion, in OpenAI's chunk format.

Content and reasoning (``reasoning_content``) stream as the engine yields them. The engine never
streams tool-call markup; its calls come whole with the result, checked against their tools'
schemas, and are sent then in OpenAI's delta format: per call, a first delta with ``index``,
``id``, ``type`` and the function's ``name`` (empty ``arguments``), then the arguments' JSON text
in pieces. Clients that concatenate pieces by ``index`` (openai's, LangChain's, LlamaIndex's)
rebuild exactly the JSON the engine validated.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from flashmoe_backend import chat
from flashmoe_backend.generation.params import Chunk, GenerationResult
from flashmoe_backend.server.protocol import new_id, now

#: Characters of a tool call's arguments per delta.
ARGUMENT_PIECE = 16

#: The last event's data, as OpenAI ends a stream.
DONE = "[DONE]"


def event(data: dict[str, Any]) -> str:
    """The data of one SSE event: ``data`` as one line of JSON (the response writes the
    ``data:`` framing)."""
    return json.dumps(data, ensure_ascii=False)


def tool_call_deltas(calls: list[dict]) -> list[dict]:
    """OpenAI's ``delta.tool_calls`` entries for whole calls: per call its header (index, id,
    type, name), then its arguments in pieces."""
    deltas = []
    for index, call in enumerate(calls):
        function = call["function"]
        deltas.append(
            {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": function["name"], "arguments": ""},
            }
        )
        arguments = function["arguments"]
        for start in range(0, len(arguments), ARGUMENT_PIECE):
            piece = arguments[start : start + ARGUMENT_PIECE]
            deltas.append({"index": index, "function": {"arguments": piece}})
    return deltas


class _Chunks:
    """Chunk objects of one response: same id, created and model in each."""

    def __init__(self, obj: str, prefix: str, model_id: str, include_usage: bool):
        self.base = {"id": new_id(prefix), "object": obj, "created": now(), "model": model_id}
        self.include_usage = include_usage

    def chunk(self, choice: dict[str, Any]) -> str:
        data = {**self.base, "choices": [{"index": 0, "logprobs": None, **choice}]}
        if self.include_usage:  # OpenAI: null in every chunk but the last
            data["usage"] = None
        return event(data)

    def usage(self, result: GenerationResult) -> str:
        return event({**self.base, "choices": [], "usage": chat.usage(result).to_openai()})


async def chat_events(
    items: AsyncIterator[Chunk | GenerationResult], model_id: str, include_usage: bool
) -> AsyncIterator[str]:
    """The ``chat.completion.chunk`` events of a generation, up to (not including) ``[DONE]``."""
    out = _Chunks("chat.completion.chunk", "chatcmpl", model_id, include_usage)
    yield out.chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    async for item in items:
        if isinstance(item, Chunk):
            if item.text:
                key = "reasoning_content" if item.kind == "reasoning" else "content"
                yield out.chunk({"delta": {key: item.text}, "finish_reason": None})
            continue
        for delta in tool_call_deltas(chat.openai_tool_calls(item)):
            yield out.chunk({"delta": {"tool_calls": [delta]}, "finish_reason": None})
        yield out.chunk({"delta": {}, "finish_reason": chat.openai_finish_reason(item.finish_reason)})
        if include_usage:
            yield out.usage(item)


async def completion_events(
    items: AsyncIterator[Chunk | GenerationResult], model_id: str, include_usage: bool
) -> AsyncIterator[str]:
    """The ``text_completion`` events of a generation, up to (not including) ``[DONE]``."""
    out = _Chunks("text_completion", "cmpl", model_id, include_usage)
    async for item in items:
        if isinstance(item, Chunk):
            if item.text and item.kind == "content":
                yield out.chunk({"text": item.text, "finish_reason": None})
            continue
        yield out.chunk({"text": "", "finish_reason": chat.openai_finish_reason(item.finish_reason)})
        if include_usage:
            yield out.usage(item)
