"""``ChatFlashMoE``: a LangChain chat model over a local FlashMoE engine.

The class only translates: LangChain messages to the engine's OpenAI-style dict messages, LangChain
tool / structured-output requests to the engine's ``tools`` / ``tool_choice`` / ``response_format``
arguments, and the engine's ``Chunk`` / ``GenerationResult`` back to ``AIMessage(Chunk)``. Tool-call
parsing, reasoning extraction, constrained decoding and stop strings are the engine's.

Engines are loaded once per (store, load options) and shared by every ``ChatFlashMoE`` that names
them; the engine serialises its own generations, so one model object can be used from several
threads and coroutines at once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

from flashmoe_backend import Chunk, FlashMoE, GenerationResult
from flashmoe_backend.constrained.constraint import check_response_format
from flashmoe_backend.engine import check_tools
from flashmoe_backend.generation.params import SETTING_NAMES
from flashmoe_backend.store.source import find_store
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
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
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableGenerator, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, Field, PrivateAttr

PROVIDER = "flashmoe"

# Per-call keyword arguments that LangChain (or a caller written for another provider) may pass and
# that have no meaning here: constrained decoding is always strict, and streaming is chosen by the
# method called.
_IGNORED_KWARGS = ("strict", "stream", "ls_structured_output_format")
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

# ------------------------------------------------------------------------------------------------
# Engine registry
# ------------------------------------------------------------------------------------------------

_ENGINES: dict[tuple, FlashMoE] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(
    store: str | Path, cache_gb: float = 4.0, experts_per_token: int | None = None, **load_options: Any
) -> FlashMoE:
    """The shared engine of ``store`` with these load options, loaded on first use.

    ``load_options`` are ``FlashMoE.load``'s keyword arguments (io_threads, page_cache, verify,
    policy, prefill_step_size, prompt_cache_entries). The engine's errors come through unchanged:
    ``StoreNotFoundError`` (a ``FileNotFoundError``) for a path without a store, ``ParameterError``
    for a bad option.
    """
    path = find_store(store)
    key = (str(path.resolve()), float(cache_gb), experts_per_token, tuple(sorted(load_options.items())))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = FlashMoE.load(
                path, cache_gb=cache_gb, experts_per_token=experts_per_token, **load_options
            )
            _ENGINES[key] = engine
    return engine


def release_engines() -> None:
    """Close and forget every shared engine (the next use loads them again)."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        with engine.lock:
            engine.close()


# ------------------------------------------------------------------------------------------------
# LangChain messages -> engine messages
# ------------------------------------------------------------------------------------------------


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
    calls = [
        {"id": tc["id"], "type": "function", "function": {"name": tc["name"], "arguments": tc["args"]}}
        for tc in message.tool_calls
    ]
    # A malformed call of an earlier turn is shown as the model wrote it, so that the tool
    # message answering it (typically an error) still has its call.
    calls += [
        {
            "id": tc["id"],
            "type": "function",
            "function": {"name": tc["name"] or "", "arguments": tc["args"] or "{}"},
        }
        for tc in message.invalid_tool_calls
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


# ------------------------------------------------------------------------------------------------
# Request and result translation
# ------------------------------------------------------------------------------------------------


def _is_pydantic_class(obj: Any) -> bool:
    return isinstance(obj, type) and is_basemodel_subclass(obj)


def _engine_response_format(response_format: Any) -> Any:
    """An OpenAI-style / LangChain response format as the engine takes it (``None``: free text)."""
    if response_format is None:
        return None
    if isinstance(response_format, dict):
        # {"type": "text"} is OpenAI's free text; json_schema / json_object dicts and JSON
        # schemas are the engine's to read (and to refuse).
        return None if response_format.get("type") == "text" else response_format
    if _is_pydantic_class(response_format) and issubclass(response_format, BaseModel):
        return response_format  # the engine parses into the model
    if isinstance(response_format, type):
        return convert_to_json_schema(response_format)  # TypedDict, Pydantic v1 model, ...
    return response_format  # anything else: the engine says whether it is a format


def _engine_tool_choice(tool_choice: Any) -> Any:
    if tool_choice is True:
        return "required"
    if tool_choice is False:
        return "auto"
    return tool_choice


def _check_tools(tools: list[dict], tool_choice: Any) -> None:
    """Refuse bad tools and tool choices when they are bound rather than when first called, with
    the engine's checks (``ToolError``).

    Tools are checked one by one: a repeated name is left to the engine, which refuses it when the
    tools are used (LangChain expects binding the same schema twice to succeed).
    """
    specs = {spec.name: spec for t in tools for spec in check_tools([t])[0]}
    if tool_choice is not None:
        check_tools(list(specs.values()), tool_choice)


def _usage(result: GenerationResult) -> UsageMetadata:
    stats = result.stats
    input_tokens = len(result.prompt_token_ids) or stats.prompt_tokens
    output_tokens = len(result.token_ids)
    usage = UsageMetadata(
        input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
    )
    if stats.prompt_cached_tokens:
        usage["input_token_details"] = {"cache_read": stats.prompt_cached_tokens}
    return usage


def _metadata(model: str, result: GenerationResult) -> dict:
    return {
        "model_name": model,
        "model_provider": PROVIDER,
        "finish_reason": result.finish_reason,
        "stats": result.stats.to_dict(),
    }


def _calls(result: GenerationResult) -> tuple[list, list]:
    calls = [tool_call(name=c.name, args=c.arguments, id=c.id) for c in result.tool_calls]
    invalid = [
        invalid_tool_call(name=c.name, args=c.arguments, id=c.id, error=c.error)
        for c in result.invalid_tool_calls
    ]
    return calls, invalid


def _additional_kwargs(result: GenerationResult) -> dict:
    return {"reasoning_content": result.reasoning} if result.reasoning else {}


def _message(model: str, result: GenerationResult) -> AIMessage:
    calls, invalid = _calls(result)
    return AIMessage(
        content=result.text,
        tool_calls=calls,
        invalid_tool_calls=invalid,
        additional_kwargs=_additional_kwargs(result),
        response_metadata=_metadata(model, result),
        usage_metadata=_usage(result),
    )


def _is_reasoning(chunk: Chunk) -> bool:
    return getattr(chunk, "kind", "content") == "reasoning"


def _chunk(chunk: Chunk) -> AIMessageChunk:
    """A streamed piece: content, or reasoning (``additional_kwargs`` strings concatenate)."""
    if _is_reasoning(chunk):
        return AIMessageChunk(content="", additional_kwargs={"reasoning_content": chunk.text})
    return AIMessageChunk(content=chunk.text)


def _last_chunk(model: str, result: GenerationResult, streamed_reasoning: bool) -> AIMessageChunk:
    """The closing chunk: tool calls, usage and metadata, once per response (and the reasoning,
    when it was not streamed)."""
    calls, invalid = _calls(result)
    chunks = [
        tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
        for i, c in enumerate(calls)
    ]
    chunks += [
        tool_call_chunk(name=c["name"], args=c["args"], id=c["id"], index=len(calls) + i)
        for i, c in enumerate(invalid)
    ]
    return AIMessageChunk(
        content="",
        tool_call_chunks=chunks,
        additional_kwargs={} if streamed_reasoning else _additional_kwargs(result),
        response_metadata=_metadata(model, result),
        usage_metadata=_usage(result),
        chunk_position="last",
    )


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
_COMPLETE_ONLY = RunnableGenerator(_complete_only, _acomplete_only, name="flashmoe_complete_only")

# ------------------------------------------------------------------------------------------------
# The chat model
# ------------------------------------------------------------------------------------------------


class ChatFlashMoE(BaseChatModel):
    """Chat model over a FlashMoE store: MoE models larger than memory, experts streamed from SSD.

    Setup:
        ``pip install langchain-flashmoe`` and pack a model with ``flashmoe pack``.

    Example:
        .. code-block:: python

            from langchain_flashmoe import ChatFlashMoE

            llm = ChatFlashMoE(model="/models/qwen3.5-moe-store", cache_gb=8, max_tokens=512)
            llm.invoke("Why is the sky blue?")

    Tool calling (``bind_tools``, with ``tool_choice`` ``"auto"``, ``"none"``, ``"any"`` /
    ``"required"``, a tool name or an OpenAI-style dict) and structured output
    (``with_structured_output`` with ``method="json_schema"`` (default, constrained decoding),
    ``"function_calling"`` or ``"json_mode"``) are enforced by constrained decoding, so they hold
    whatever the model. Reasoning (``<think>``) is returned in
    ``additional_kwargs["reasoning_content"]``, never in the content.
    """

    model: str
    """Path of the FlashMoE store directory (made by ``flashmoe pack``)."""
    cache_gb: float = 4.0
    """Byte budget of the expert cache, in GiB."""
    experts_per_token: int | None = None
    """Override of the model's experts per token (``None``: the model's own routing)."""
    load_options: dict[str, Any] = Field(default_factory=dict)
    """Further ``FlashMoE.load`` options (io_threads, page_cache, verify, policy, ...)."""

    temperature: float | None = None
    """Sampling temperature (``None``: the store's default, from its generation_config.json;
    greedy if it has none)."""
    max_tokens: int | None = None
    """Most tokens to generate (``None``: the store's default, else 256)."""
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    """Stop strings: generation ends before them and they never appear in the output."""
    enable_thinking: bool | None = None
    """Passed to the chat template: ``False`` skips the model's reasoning, ``None`` keeps the
    store's default (its generation_config.json), else the template's."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (so that callbacks see each token)."""

    _engine: FlashMoE | None = PrivateAttr(default=None)

    # -- engine ------------------------------------------------------------------------------

    def __init__(self, **kwargs: Any) -> None:
        """Load (or reuse) the store's engine and check the generation settings with it.

        Done after pydantic's validation, not in a validator, so that the engine's errors reach
        the caller as they are (pydantic would wrap a ``ValueError`` in its ``ValidationError``):
        ``StoreNotFoundError`` for a path without a store, ``ParameterError`` for a bad value.
        """
        super().__init__(**kwargs)
        self._get_engine().generation_params(**self._settings())

    def _settings(self) -> dict[str, Any]:
        """This model's generation settings that are set, as the engine's keyword arguments."""
        params = {f: getattr(self, f) for f in SETTING_NAMES if getattr(self, f) is not None}
        if self.stop:
            params["stop"] = list(self.stop)
        return params

    def _get_engine(self, model: str | None = None) -> FlashMoE:
        if model is not None and model != self.model:
            return get_engine(model, self.cache_gb, self.experts_per_token, **self.load_options)
        if self._engine is None:
            self._engine = get_engine(self.model, self.cache_gb, self.experts_per_token, **self.load_options)
        return self._engine

    @property
    def engine(self) -> FlashMoE:
        """The shared ``FlashMoE`` engine (its ``stats`` hold the cumulative counters)."""
        return self._get_engine()

    def _resolve_model_profile(self) -> ModelProfile | None:
        engine = self._get_engine()
        config = engine.config
        text_config = config.get("text_config") or {}
        context = config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
        template = engine.tokenizer.chat_template or ""
        profile = ModelProfile(
            open_weights=True,
            text_inputs=True,
            text_outputs=True,
            image_inputs=False,
            image_url_inputs=False,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            image_tool_message=False,
            pdf_tool_message=False,
            reasoning_output="<think>" in template or "enable_thinking" in template,
            tool_calling="tools" in template,
            tool_choice="tools" in template,
            tool_call_streaming="tools" in template,
            structured_output=True,
            temperature=True,
        )
        if isinstance(context, int):
            profile["max_input_tokens"] = context
        return profile

    # -- LangChain plumbing --------------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "chat-flashmoe"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        params = {
            "model": self.model,
            "cache_gb": self.cache_gb,
            "experts_per_token": self.experts_per_token,
            **self.load_options,
        }
        params.update({f: getattr(self, f) for f in SETTING_NAMES})
        params["stop"] = self.stop
        return params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs.get("model") or self.model,
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def _request(self, stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[FlashMoE, str, dict]:
        """(engine, model name, engine keyword arguments) of one call."""
        kwargs = {k: v for k, v in kwargs.items() if k not in _IGNORED_KWARGS and v is not None}
        model = kwargs.pop("model", None) or self.model
        params = self._settings()
        stops = stop if stop is not None else kwargs.pop("stop", None)
        if stops is not None:
            params["stop"] = stops
        if not kwargs.get("tools"):
            kwargs.pop("tools", None)
        if "tool_choice" in kwargs:
            kwargs["tool_choice"] = _engine_tool_choice(kwargs["tool_choice"])
        if "response_format" in kwargs:
            kwargs["response_format"] = _engine_response_format(kwargs["response_format"])
            if kwargs["response_format"] is None:
                del kwargs["response_format"]
        params.update(kwargs)
        return self._get_engine(model), model, params

    # -- generation ----------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine, model, params = self._request(stop, kwargs)
        result = engine.generate(convert_messages(messages), **params)
        return ChatResult(
            generations=[ChatGeneration(message=_message(model, result))], llm_output={"model_name": model}
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine, model, params = self._request(stop, kwargs)
        items = engine.stream(convert_messages(messages), **params)
        streamed_reasoning = False
        try:
            for item in items:
                if isinstance(item, GenerationResult):
                    yield ChatGenerationChunk(message=_last_chunk(model, item, streamed_reasoning))
                elif item.text:
                    streamed_reasoning |= _is_reasoning(item)
                    yield ChatGenerationChunk(message=_chunk(item))
        finally:
            items.close()

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine, model, params = self._request(stop, kwargs)
        result: GenerationResult | None = None
        async for item in engine.astream(convert_messages(messages), **params):
            if isinstance(item, GenerationResult):
                result = item
        if result is None:  # pragma: no cover - the engine always ends with a result
            raise RuntimeError("generation ended without a result")
        return ChatResult(
            generations=[ChatGeneration(message=_message(model, result))], llm_output={"model_name": model}
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        engine, model, params = self._request(stop, kwargs)
        streamed_reasoning = False
        async for item in engine.astream(convert_messages(messages), **params):
            if isinstance(item, GenerationResult):
                yield ChatGenerationChunk(message=_last_chunk(model, item, streamed_reasoning))
            elif item.text:
                streamed_reasoning |= _is_reasoning(item)
                yield ChatGenerationChunk(message=_chunk(item))

    # -- tools and structured output -------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (anything ``convert_to_openai_tool`` takes) to the model.

        Args:
            tools: the tools.
            tool_choice: ``"auto"`` (the model decides; the default), ``"none"``, ``"any"`` or
                ``"required"`` or ``True`` (at least one call), a tool name or
                ``{"type": "function", "function": {"name": ...}}`` (that tool).
            kwargs: further call arguments, e.g. ``parallel_tool_calls=False`` or an OpenAI-style
                ``response_format``.

        Raises:
            ValueError: a tool without a usable JSON schema, or a ``tool_choice`` naming no tool.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        choice = _engine_tool_choice(tool_choice)
        if formatted or choice is not None:
            _check_tools(formatted, choice)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Model wrapper that returns outputs formatted to match the given schema.

        Args:
            schema: a Pydantic class, a TypedDict class, a JSON schema or an OpenAI tool schema.
            method: ``"json_schema"`` (default): the answer is decoded under the schema's grammar;
                ``"function_calling"``: a forced call of a tool whose arguments are the schema;
                ``"json_mode"``: any JSON object (the schema, if given, only parses it).
            include_raw: return ``{"raw": AIMessage, "parsed": ..., "parsing_error": ...}``.
            strict: accepted for compatibility; constrained decoding always follows the schema.

        Raises:
            ValueError: an unknown method, a missing schema, or a schema that cannot be compiled.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments: {sorted(kwargs)}")
        is_pydantic = _is_pydantic_class(schema)
        ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        if method == "function_calling":
            if schema is None:
                raise ValueError("method='function_calling' needs a schema")
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=ls_format)
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                if schema is None:
                    raise ValueError("method='json_schema' needs a schema")
                response_format = _engine_response_format(schema)
                check_response_format(response_format)  # refuse a bad schema now, as the engine would
            else:
                response_format = {"type": "json_object"}
                ls_format["kwargs"] = {"method": method}
            llm = self.bind(response_format=response_format, ls_structured_output_format=ls_format)
            parser = (
                PydanticOutputParser(pydantic_object=schema)  # type: ignore[arg-type]
                if is_pydantic
                else JsonOutputParser()
            )
        else:
            raise ValueError(
                f"unknown method {method!r}; expected 'json_schema', 'function_calling' or 'json_mode'"
            )
        parser = _COMPLETE_ONLY | parser
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")
