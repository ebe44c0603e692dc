"""``ChatFlashMoE``: a LangChain chat model over a local FlashMoE engine.

The class only translates: LangChain messages to the engine's OpenAI-style dict messages, LangChain
tool / structured-output requests to the engine's ``tools`` / ``tool_choice`` / ``response_format``
arguments, and the engine's ``Chunk`` / ``GenerationResult`` back to ``AIMessage(Chunk)``. Tool-call
parsing, reasoning extraction, constrained decoding and stop strings are the engine's.

Engines are loaded once per (store, load options) and shared by every ``ChatFlashMoE`` that names
them (``FlashMoE.shared``); the engine serialises its own generations, so one model object can be
used from several threads and coroutines at once. The glue every front end shares (settings, tool
calls, usage) is ``flashmoe_backend.chat``'s; the translation helpers are in ``_utils``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from flashmoe_backend import FlashMoE, GenerationResult, chat
from flashmoe_backend.constrained.constraint import check_response_format
from flashmoe_backend.generation.params import SETTING_NAMES
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field, PrivateAttr

from langchain_flashmoe._utils import (
    COMPLETE_ONLY,
    PROVIDER,
    ai_message,
    ai_message_chunk,
    convert_messages,
    is_pydantic_class,
    is_reasoning,
    last_chunk,
    to_engine_response_format,
    to_engine_tool_choice,
)

__all__ = ["ChatFlashMoE", "convert_messages", "get_engine", "release_engines"]

# Per-call keyword arguments that LangChain (or a caller written for another provider) may pass and
# that have no meaning here: constrained decoding is always strict, and streaming is chosen by the
# method called.
_IGNORED_KWARGS = ("strict", "stream", "ls_structured_output_format")

#: The shared engine of a store and load options (``FlashMoE.shared``), and closing them all.
get_engine = FlashMoE.shared
release_engines = FlashMoE.release_shared

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
    """A FlashMoE store directory (made by ``flashmoe pack``), an mlx-community checkpoint
    directory (read in place), or a Hugging Face repo id in the local cache."""
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
        return chat.generation_settings(self)

    def _get_engine(self, model: str | None = None) -> FlashMoE:
        if model is not None and model != self.model:
            return FlashMoE.shared(model, self.cache_gb, self.experts_per_token, **self.load_options)
        if self._engine is None:
            self._engine = FlashMoE.shared(
                self.model, self.cache_gb, self.experts_per_token, **self.load_options
            )
        return self._engine

    @property
    def engine(self) -> FlashMoE:
        """The shared ``FlashMoE`` engine (its ``stats`` hold the cumulative counters)."""
        return self._get_engine()

    def _resolve_model_profile(self) -> ModelProfile | None:
        engine = self._get_engine()
        context = engine.context_window
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
            kwargs["tool_choice"] = to_engine_tool_choice(kwargs["tool_choice"])
        if "response_format" in kwargs:
            kwargs["response_format"] = to_engine_response_format(kwargs["response_format"])
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
            generations=[ChatGeneration(message=ai_message(model, result))], llm_output={"model_name": model}
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
                    yield ChatGenerationChunk(message=last_chunk(model, item, streamed_reasoning))
                elif item.text:
                    streamed_reasoning |= is_reasoning(item)
                    yield ChatGenerationChunk(message=ai_message_chunk(item))
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
            generations=[ChatGeneration(message=ai_message(model, result))], llm_output={"model_name": model}
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
                yield ChatGenerationChunk(message=last_chunk(model, item, streamed_reasoning))
            elif item.text:
                streamed_reasoning |= is_reasoning(item)
                yield ChatGenerationChunk(message=ai_message_chunk(item))

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
        choice = to_engine_tool_choice(tool_choice)
        if formatted or choice is not None:
            chat.check_bound_tools(formatted, choice)
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
        is_pydantic = is_pydantic_class(schema)
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
                response_format = to_engine_response_format(schema)
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
        parser = COMPLETE_ONLY | parser
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")
