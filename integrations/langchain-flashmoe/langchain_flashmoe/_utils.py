"""Translation helpers of ``ChatFlashMoE``: LangChain messages and requests to the engine's, the
engine's results back to ``AIMessage(Chunk)``. The shared glue (usage, tool-call dicts, settings)
is ``flashmoe_backend.chat``'s."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from flashmoe_backend import chat
from flashmoe_backend.generation.params import Chunk, GenerationResult
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.runnables import RunnableGenerator
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel

PROVIDER = "flashmoe"

# Content blocks of an assistant message that are carried elsewhere (tool calls, reasoning).
_NON_TEXT_ASSISTANT_BLOCKS = {
    "tool_use",
    "tool_call",
    "tool_call_chunk",
    "invalid_tool_call",
    "function_call",
    "reasoning",
    "thinking",
    "redacted_thinking",
}

# -- LangChain messages -> engine messages -------------------------------------------------------


def _content(content: str | list, *, assistant: bool = False) -> str | list:
    """A message's content as the engine's: a string, or a list of content parts (text blocks as
    ``{"type": "text", "text": ...}``; other blocks are passed on for the engine to refuse). An
    assistant's tool-call and reasoning blocks are left out: they travel as ``tool_calls`` and
    ``reasoning_content``."""
    if isinstance(content, str):
        return content
    parts: list = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if isinstance(block, str):
            parts.append({"type": "text", "text": block})
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text") or ""})
        elif not (assistant and kind in _NON_TEXT_ASSISTANT_BLOCKS):
            parts.append(block)
    return parts


def _reasoning(message: AIMessage) -> str | None:
    reasoning = message.additional_kwargs.get("reasoning_content")
    if reasoning:
        return reasoning
    if isinstance(message.content, list):
        parts = [
            b.get("reasoning") or ""
            for b in message.content
            if isinstance(b, dict) and b.get("type") == "reasoning"
        ]
        return "".join(parts) or None
    return None


def _assistant_message(message: AIMessage) -> dict:
    out: dict[str, Any] = {"role": "assistant", "content": _content(message.content, assistant=True)}
    # A malformed call of an earlier turn is shown as the model wrote it, so that the tool
    # message answering it (typically an error) still has its call.
    calls = [
        chat.engine_tool_call(tc["name"] or "", tc["args"], tc["id"])
        for tc in [*message.tool_calls, *message.invalid_tool_calls]
    ]
    if calls:
        out["tool_calls"] = calls
    reasoning = _reasoning(message)
    if reasoning:
        out["reasoning_content"] = reasoning
    return out


def convert_messages(messages: Sequence[BaseMessage]) -> list[dict]:
    """LangChain messages as the engine's OpenAI-style chat messages (one per message, in order,
    so the engine's errors name the caller's message index)."""
    out: list[dict] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append({"role": "system", "content": _content(m.content)})
        elif isinstance(m, HumanMessage):
            out.append({"role": "user", "content": _content(m.content)})
        elif isinstance(m, AIMessage):
            out.append(_assistant_message(m))
        elif isinstance(m, ToolMessage):
            msg = {"role": "tool", "content": _content(m.content), "tool_call_id": m.tool_call_id}
            if m.name:
                msg["name"] = m.name
            out.append(msg)
        elif isinstance(m, ChatMessage):  # the engine refuses a role it does not know
            role = {"human": "user", "ai": "assistant"}.get(m.role, m.role)
            out.append({"role": role, "content": _content(m.content, assistant=role == "assistant")})
        else:
            raise TypeError(f"ChatFlashMoE cannot send a {type(m).__name__}")
    return out


# -- requests ------------------------------------------------------------------------------------


def is_pydantic_class(obj: Any) -> bool:
    """Whether ``obj`` is a Pydantic model class (v1 or v2)."""
    return isinstance(obj, type) and is_basemodel_subclass(obj)


def to_engine_response_format(response_format: Any) -> Any:
    """An OpenAI-style / LangChain response format as the engine takes it (``None``: free text)."""
    if isinstance(response_format, dict) or response_format is None:
        return chat.engine_response_format(response_format)
    if is_pydantic_class(response_format) and issubclass(response_format, BaseModel):
        return response_format  # the engine parses into the model
    if isinstance(response_format, type):
        return convert_to_json_schema(response_format)  # TypedDict, Pydantic v1 model, ...
    return response_format  # anything else: the engine says whether it is a format


def to_engine_tool_choice(tool_choice: Any) -> Any:
    """LangChain's boolean tool choices as the engine's (``True``: a call is required)."""
    if tool_choice is True:
        return "required"
    if tool_choice is False:
        return "auto"
    return tool_choice


# -- engine results -> LangChain messages --------------------------------------------------------


def _usage(result: GenerationResult) -> UsageMetadata:
    counts = chat.usage(result)
    usage = UsageMetadata(
        input_tokens=counts.prompt_tokens,
        output_tokens=counts.completion_tokens,
        total_tokens=counts.total_tokens,
    )
    if counts.cached_tokens:
        usage["input_token_details"] = {"cache_read": counts.cached_tokens}
    return usage


def _metadata(model: str, result: GenerationResult) -> dict:
    return {
        "model_name": model,
        "model_provider": PROVIDER,
        "finish_reason": result.finish_reason,
        "stats": result.stats.to_dict(),
    }


def _additional_kwargs(result: GenerationResult) -> dict:
    return {"reasoning_content": result.reasoning} if result.reasoning else {}


def ai_message(model: str, result: GenerationResult) -> AIMessage:
    """The whole result of a generation as an ``AIMessage``."""
    return AIMessage(
        content=result.text,
        tool_calls=[tool_call(name=c.name, args=c.arguments, id=c.id) for c in result.tool_calls],
        invalid_tool_calls=[
            invalid_tool_call(name=c["name"], args=c["arguments"], id=c["id"], error=c["error"])
            for c in chat.invalid_tool_calls(result)
        ],
        additional_kwargs=_additional_kwargs(result),
        response_metadata=_metadata(model, result),
        usage_metadata=_usage(result),
    )


def is_reasoning(chunk: Chunk) -> bool:
    """Whether a streamed piece is reasoning (text inside ``<think>``)."""
    return getattr(chunk, "kind", "content") == "reasoning"


def ai_message_chunk(chunk: Chunk) -> AIMessageChunk:
    """A streamed piece: content, or reasoning (``additional_kwargs`` strings concatenate)."""
    if is_reasoning(chunk):
        return AIMessageChunk(content="", additional_kwargs={"reasoning_content": chunk.text})
    return AIMessageChunk(content=chunk.text)


def last_chunk(model: str, result: GenerationResult, streamed_reasoning: bool) -> AIMessageChunk:
    """The closing chunk: tool calls, usage and metadata, once per response (and the reasoning,
    when it was not streamed)."""
    calls = [
        (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in chat.openai_tool_calls(result)
    ]
    calls += [(c["id"], c["name"], c["arguments"]) for c in chat.invalid_tool_calls(result)]
    chunks = [
        tool_call_chunk(name=name, args=args, id=call_id, index=i)
        for i, (call_id, name, args) in enumerate(calls)
    ]
    return AIMessageChunk(
        content="",
        tool_call_chunks=chunks,
        additional_kwargs={} if streamed_reasoning else _additional_kwargs(result),
        response_metadata=_metadata(model, result),
        usage_metadata=_usage(result),
        chunk_position="last",
    )


# -- structured output ---------------------------------------------------------------------------


def _check_complete(message: BaseMessage) -> BaseMessage:
    if message.response_metadata.get("finish_reason") == "incomplete":
        raise OutputParserException(
            "the structured output is incomplete: generation stopped (max_tokens?) before the "
            "structure was closed",
            llm_output=message.content if isinstance(message.content, str) else None,
        )
    return message


def _complete_only(messages: Iterator[BaseMessage]) -> Iterator[BaseMessage]:
    for message in messages:
        yield _check_complete(message)


async def _acomplete_only(messages: AsyncIterator[BaseMessage]) -> AsyncIterator[BaseMessage]:
    async for message in messages:
        yield _check_complete(message)


#: Passes messages (or streamed chunks) through, raising on an ``incomplete`` one: LangChain's JSON
#: parsers would otherwise repair a cut-off structure into a plausible but truncated value.
COMPLETE_ONLY = RunnableGenerator(_complete_only, _acomplete_only, name="flashmoe_complete_only")
