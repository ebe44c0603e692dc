"""Translation helpers of the LlamaIndex ``FlashMoE``: LlamaIndex messages and tools to the
engine's OpenAI-style ones, the engine's results and streams back to ``ChatResponse`` /
``CompletionResponse``. The shared glue (usage, tool-call dicts) is ``flashmoe_backend.chat``'s."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    AudioBlock,
    CachePoint,
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
    VideoBlock,
)

from flashmoe_backend import chat
from flashmoe_backend.generation.params import Chunk, GenerationResult

# -- LlamaIndex -> engine

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}
_MEDIA_BLOCKS = (ImageBlock, AudioBlock, VideoBlock, DocumentBlock)


def legacy_tool_calls(calls: Sequence[Any]) -> list[dict]:
    """OpenAI-style tool calls (dicts or SDK objects) of ``additional_kwargs['tool_calls']``, as
    the engine's."""
    as_dicts = [
        call if isinstance(call, dict)
        else call.model_dump() if hasattr(call, "model_dump") else dict(vars(call))
        for call in calls
    ]
    return chat.engine_tool_calls(as_dicts)


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict]:
    """LlamaIndex chat messages as the engine's OpenAI-style message dicts.

    Text blocks become ``content``, ``ThinkingBlock``s ``reasoning_content``, ``ToolCallBlock``s
    (or legacy ``additional_kwargs['tool_calls']``) ``tool_calls``; tool results carry
    ``tool_call_id`` and the tool's ``name`` (looked up from the call when not given). Images,
    audio, video and documents become content parts of their type, which the engine refuses
    (``PromptError``: it takes text only).
    """
    out: list[dict] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        role = _ROLES.get(message.role)
        if role is None:  # pragma: no cover - every MessageRole is mapped
            raise ValueError(f"message #{i}: unsupported role {message.role!r}")
        texts: list[str] = []
        media: list[dict] = []
        thinking: list[str] = []
        calls: list[dict] = []
        for block in message.blocks:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ThinkingBlock):
                if block.content:
                    thinking.append(block.content)
            elif isinstance(block, ToolCallBlock):
                calls.append(chat.engine_tool_call(block.tool_name, block.tool_kwargs, block.tool_call_id))
            elif isinstance(block, _MEDIA_BLOCKS):
                media.append({"type": block.block_type})
            elif isinstance(block, CachePoint):
                continue
        if not calls and message.additional_kwargs.get("tool_calls"):
            calls = legacy_tool_calls(message.additional_kwargs["tool_calls"])
        content: str | list[dict] = "\n".join(texts)
        if media:  # the engine names the part it cannot take
            content = [{"type": "text", "text": content}, *media]
        entry: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            if thinking:
                entry["reasoning_content"] = "\n".join(thinking)
            if calls:
                entry["tool_calls"] = calls
                call_names.update((c["id"], c["function"]["name"]) for c in calls)
        elif role == "tool":
            call_id = message.additional_kwargs.get("tool_call_id")
            if call_id is not None:
                entry["tool_call_id"] = call_id
            name = message.additional_kwargs.get("name") or call_names.get(call_id)
            if name:
                entry["name"] = name
        out.append(entry)
    return out


def to_engine_tool(tool: Any) -> dict:
    """A LlamaIndex tool (anything with ``.metadata.to_openai_tool()``) as an OpenAI-style tool
    dict; dicts and Pydantic model classes pass through for the engine to validate."""
    metadata = getattr(tool, "metadata", None)
    if metadata is not None and hasattr(metadata, "to_openai_tool"):
        return metadata.to_openai_tool(skip_length_check=True)
    return tool


# -- engine -> LlamaIndex


def _raw(result: GenerationResult, model: str) -> dict[str, Any]:
    """What the engine said besides the message: usage (for ``TokenCountingHandler``), finish
    reason, the engine's statistics of this generation, and the parsed structured output."""
    return {
        "model": model,
        "finish_reason": result.finish_reason,
        "usage": chat.usage(result).to_dict(),
        "stats": result.stats.to_dict(),
        "parsed": result.parsed,
        "raw_text": result.raw_text,
    }


def _tool_call_blocks(result: GenerationResult) -> list[ToolCallBlock]:
    return [
        ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=dict(c.arguments))
        for c in result.tool_calls
    ]


def _message(result: GenerationResult) -> ChatMessage:
    blocks: list[Any] = []
    if result.reasoning:
        blocks.append(ThinkingBlock(content=result.reasoning))
    if result.text or not (result.reasoning or result.tool_calls):
        blocks.append(TextBlock(text=result.text))
    blocks.extend(_tool_call_blocks(result))
    additional: dict[str, Any] = {}
    invalid = chat.invalid_tool_calls(result)
    if invalid:
        additional["invalid_tool_calls"] = invalid
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=additional)


def chat_response(result: GenerationResult, model: str) -> ChatResponse:
    """The whole result of a chat as a ``ChatResponse``."""
    return ChatResponse(message=_message(result), raw=_raw(result, model))


def completion_response(result: GenerationResult, model: str) -> CompletionResponse:
    """The whole result of a completion as a ``CompletionResponse``."""
    additional: dict[str, Any] = {}
    if result.reasoning:
        additional["thinking"] = result.reasoning
    if result.tool_calls:
        additional["tool_calls"] = [b.model_dump() for b in _tool_call_blocks(result)]
    return CompletionResponse(text=result.text, raw=_raw(result, model), additional_kwargs=additional)


class StreamAccumulator:
    """Turns the engine's stream (``Chunk``s of content or reasoning, then the result) into
    LlamaIndex responses: each holds the text so far and its ``delta``; reasoning arrives as
    ``additional_kwargs["thinking_delta"]`` (with an empty ``delta``) and as a ``ThinkingBlock``.
    The last response is the whole result, with usage and statistics, and an empty delta."""

    def __init__(self, model: str):
        self.model = model
        self.content = ""
        self.reasoning = ""

    def _feed(self, chunk: Chunk) -> tuple[str, dict[str, Any]]:
        if getattr(chunk, "kind", "content") == "reasoning":
            self.reasoning += chunk.text
            return "", {"thinking_delta": chunk.text}
        self.content += chunk.text
        return chunk.text, {}

    def _final_extra(self, result: GenerationResult) -> dict[str, Any]:
        # Reasoning that was not streamed (none was) is handed over with the last response.
        if result.reasoning and not self.reasoning:
            return {"thinking_delta": result.reasoning}
        return {}

    def _raw(self, chunk: Chunk) -> dict[str, Any]:
        return {"model": self.model, "token_ids": list(chunk.token_ids)}

    def chat(self, item: Chunk | GenerationResult) -> ChatResponse:
        if isinstance(item, GenerationResult):
            response = chat_response(item, self.model)
            response.delta = ""
            response.additional_kwargs.update(self._final_extra(item))
            return response
        delta, extra = self._feed(item)
        blocks: list[Any] = [ThinkingBlock(content=self.reasoning)] if self.reasoning else []
        blocks.append(TextBlock(text=self.content))
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks),
            delta=delta,
            raw=self._raw(item),
            additional_kwargs=extra,
        )

    def completion(self, item: Chunk | GenerationResult) -> CompletionResponse:
        if isinstance(item, GenerationResult):
            response = completion_response(item, self.model)
            response.delta = ""
            response.additional_kwargs.update(self._final_extra(item))
            return response
        delta, extra = self._feed(item)
        return CompletionResponse(
            text=self.content, delta=delta, raw=self._raw(item), additional_kwargs=extra
        )
