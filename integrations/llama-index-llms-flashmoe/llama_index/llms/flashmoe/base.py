"""``FlashMoE``: a LlamaIndex ``FunctionCallingLLM`` over a local flashmoe engine.

The engine (``flashmoe_backend.FlashMoE``) runs a Mixture-of-Experts model whose experts stream
from disk. This module only translates: LlamaIndex messages and tools to the engine's OpenAI-style
chat messages and tool specs, and the engine's results (content, reasoning, tool calls, parsed
structured output, statistics) back to ``ChatResponse`` / ``CompletionResponse``.

* Engines are shared: every ``FlashMoE`` with the same store and load options uses one engine
  (``flashmoe_backend.FlashMoE.shared``, here also :func:`load_engine`), and the engine
  serialises generations with its own lock, so any number of LLM objects, threads and event
  loops can use it at once. The glue every front end shares (settings, tool calls, usage) is
  ``flashmoe_backend.chat``'s; the translation helpers are in ``_utils``.
* Async calls run the engine's iterator in a worker thread and hand its pieces to the event loop
  through an ``asyncio.Queue``; the loop is never blocked, and abandoning an async stream stops
  the generation at the next piece.
* Tool calling, ``tool_required`` and structured output (``structured_predict``,
  ``as_structured_llm``, ...) use the engine's constrained decoding, not prompt-and-parse.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncGenerator, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW, DEFAULT_NUM_OUTPUTS
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection, default_completion_to_prompt
from llama_index.core.prompts import BasePromptTemplate
from llama_index.core.types import Model, PydanticProgramMode
from llama_index.llms.flashmoe._utils import (
    StreamAccumulator,
    chat_response,
    completion_response,
    legacy_tool_calls,
    to_engine_messages,
    to_engine_tool,
)

from flashmoe_backend import Chunk, GenerationResult, chat
from flashmoe_backend import FlashMoE as Engine

if TYPE_CHECKING:
    from llama_index.core.program.utils import FlexibleModel
    from llama_index.core.tools.types import BaseTool

__all__ = ["FlashMoE", "load_engine", "release_engines", "to_engine_messages", "to_engine_tool"]

dispatcher = get_dispatcher(__name__)

#: The shared engine of a store and load options (``Engine.shared``), and closing them all (LLM
#: objects made before cannot generate any more; new ones load their engine again).
load_engine = Engine.shared
release_engines = Engine.release_shared

# ---------------------------------------------------------------------------------------------
# The LLM
# ---------------------------------------------------------------------------------------------


class _Shared:
    """Holds an LLM's engine so that copies of the LLM (shallow or deep) share it."""

    __slots__ = ("engine",)

    def __init__(self, engine: Engine):
        self.engine = engine

    def __copy__(self) -> _Shared:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self


class FlashMoE(FunctionCallingLLM):
    """A local Mixture-of-Experts model run by flashmoe, for LlamaIndex.

    ``model`` is a store directory made by ``flashmoe pack``, an mlx-community checkpoint
    directory (read in place) or a Hugging Face repo id in the local cache. The model must have a chat
    template; its tool-call format (Qwen3.5 XML or Hermes JSON) is handled by the engine.

    Examples:
        ```python
        from llama_index.llms.flashmoe import FlashMoE

        llm = FlashMoE(model="/models/qwen3.5-moe-store", cache_gb=8, max_tokens=512)
        print(llm.complete("What is a mixture of experts?"))
        ```
    """

    # Values are checked by the engine (FlashMoE.load, FlashMoE.generation_params), not by pydantic
    # constraints here, so that both integrations raise the engine's errors for the same mistakes.
    model: str = Field(
        description="A flashmoe store directory (made by `flashmoe pack`), an mlx-community checkpoint "
        "directory (read in place), or a Hugging Face repo id in the local cache."
    )
    cache_gb: float = Field(default=4.0, description="Byte budget of the expert cache, in GiB.")
    experts_per_token: int | None = Field(
        default=None,
        description="Override the model's number of experts per token (None: the model's own).",
    )
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Other keyword arguments of flashmoe_backend.FlashMoE.load (io_threads, "
        "page_cache, verify, policy, prefill_step_size, prompt_cache_entries).",
    )
    temperature: float | None = Field(
        default=None, description="Sampling temperature (0: greedy; None: the store's default)."
    )
    max_tokens: int | None = Field(
        default=None, description="Most tokens to generate per call (None: the store's default)."
    )
    top_p: float | None = Field(default=None, description="Nucleus sampling.")
    top_k: int | None = Field(default=None, description="Top-k sampling (0: off).")
    min_p: float | None = Field(default=None, description="Min-p sampling.")
    repetition_penalty: float | None = Field(default=None, description="Repetition penalty.")
    seed: int | None = Field(default=None, description="Random seed of each generation.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    enable_thinking: bool | None = Field(
        default=None,
        description="Let a reasoning model think first (None: the store's default, else the chat "
        "template's). The reasoning comes back as a ThinkingBlock.",
    )
    context_window: int | None = Field(
        default=None,
        gt=0,
        description="Context window in tokens (None: the model config's max_position_embeddings).",
    )
    is_function_calling_model: bool = Field(
        default=True, description="Whether agents should use native tool calling."
    )
    additional_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for every generation (e.g. logits_processors or a "
        "response_format).",
    )

    _shared: _Shared = PrivateAttr()

    def __init__(
        self, model: str | Path | None = None, *, engine: Engine | None = None, **kwargs: Any
    ) -> None:
        """Load (or reuse) the engine of ``model``; or wrap an already loaded ``engine``."""
        if model is None:
            if engine is None:
                raise ValueError("FlashMoE needs `model` (a flashmoe store directory) or `engine`")
            model = engine.store
        super().__init__(model=str(model), **kwargs)
        self._shared = _Shared(
            engine
            if engine is not None
            else Engine.shared(self.model, self.cache_gb, self.experts_per_token, **self.load_kwargs)
        )
        self.engine.generation_params(**self._settings())  # the engine's checks, now

    @classmethod
    def class_name(cls) -> str:
        return "FlashMoE_llm"

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings, never the engine: unpickling re-runs ``__init__``, which finds
        the shared engine again (or loads it)."""
        clone = copy.copy(self)
        clone.__pydantic_private__.pop("_shared", None)
        return super(FlashMoE, clone).__getstate__()

    @property
    def engine(self) -> Engine:
        """The shared ``flashmoe_backend.FlashMoE`` engine."""
        return self._shared.engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or self.engine.context_window or DEFAULT_CONTEXT_WINDOW,
            num_output=self.max_tokens or self.engine.generation_params().max_tokens or DEFAULT_NUM_OUTPUTS,
            is_chat_model=True,
            is_function_calling_model=self.is_function_calling_model,
            model_name=self.model,
        )

    # -- generation arguments ----------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        """This LLM's generation settings that are set (the others are the store's defaults)."""
        return chat.generation_settings(self)

    def _generation_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The engine's keyword arguments: this LLM's settings, then ``additional_kwargs``, then
        the call's own (unknown ones are left for the engine to reject)."""
        out = self._settings()
        out.update(self.additional_kwargs)
        kwargs = dict(kwargs)
        extra_stop = kwargs.pop("stop", None)
        if extra_stop:
            extra_stop = [extra_stop] if isinstance(extra_stop, str) else list(extra_stop)
            out["stop"] = list(out.get("stop", [])) + extra_stop
        tools = kwargs.pop("tools", None)
        if tools:
            out["tools"] = [to_engine_tool(t) for t in tools]
        elif "tool_choice" in kwargs and kwargs["tool_choice"] in (None, "auto", "none"):
            kwargs.pop("tool_choice")  # no tools: nothing to choose from
        out.update(kwargs)
        return out

    def _generate(self, prompt: Any, kwargs: dict[str, Any]) -> GenerationResult:
        return self.engine.generate(prompt, **self._generation_kwargs(kwargs))

    def _stream(self, prompt: Any, kwargs: dict[str, Any]) -> Iterator[Chunk | GenerationResult]:
        return self.engine.stream(prompt, **self._generation_kwargs(kwargs))

    def _astream(self, prompt: Any, kwargs: dict[str, Any]) -> AsyncGenerator[Any, None]:
        gen_kwargs = self._generation_kwargs(kwargs)
        return self.engine.astream(prompt, **gen_kwargs)

    async def _agenerate(self, prompt: Any, kwargs: dict[str, Any]) -> GenerationResult:
        stream = self._astream(prompt, kwargs)
        try:
            async for item in stream:
                if isinstance(item, GenerationResult):
                    return item
        finally:
            await stream.aclose()
        raise RuntimeError("the engine's stream ended without a result")  # pragma: no cover

    def _completion_prompt(self, prompt: str, formatted: bool) -> Any:
        """Raw text when the caller formatted the prompt (``formatted=True``) or this LLM has a
        ``completion_to_prompt``; otherwise one user message through the chat template."""
        if formatted:
            return prompt
        if self.completion_to_prompt not in (None, default_completion_to_prompt):
            return self.completion_to_prompt(prompt)
        return [{"role": "user", "content": prompt}]

    # -- chat --------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        result = self._generate(to_engine_messages(messages), kwargs)
        return chat_response(result, self.model)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        prompt = to_engine_messages(messages)

        def gen() -> ChatResponseGen:
            acc = StreamAccumulator(self.model)
            for item in self._stream(prompt, kwargs):
                yield acc.chat(item)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        result = await self._agenerate(to_engine_messages(messages), kwargs)
        return chat_response(result, self.model)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        prompt = to_engine_messages(messages)

        async def gen() -> ChatResponseAsyncGen:
            acc = StreamAccumulator(self.model)
            stream = self._astream(prompt, kwargs)
            try:
                async for item in stream:
                    yield acc.chat(item)
            finally:
                await stream.aclose()

        return gen()

    # -- completion --------------------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = self._generate(self._completion_prompt(prompt, formatted), kwargs)
        return completion_response(result, self.model)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        engine_prompt = self._completion_prompt(prompt, formatted)

        def gen() -> CompletionResponseGen:
            acc = StreamAccumulator(self.model)
            for item in self._stream(engine_prompt, kwargs):
                yield acc.completion(item)

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = await self._agenerate(self._completion_prompt(prompt, formatted), kwargs)
        return completion_response(result, self.model)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        engine_prompt = self._completion_prompt(prompt, formatted)

        async def gen() -> CompletionResponseAsyncGen:
            acc = StreamAccumulator(self.model)
            stream = self._astream(engine_prompt, kwargs)
            try:
                async for item in stream:
                    yield acc.completion(item)
            finally:
                await stream.aclose()

        return gen()

    # -- tools -------------------------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Messages plus the engine's ``tools`` / ``tool_choice`` / ``parallel_tool_calls``.

        ``tool_required`` forces a call (``tool_choice="required"``); an explicit ``tool_choice``
        (``"auto"``, ``"none"``, ``"required"``, a tool name or an OpenAI-style dict) wins.
        """
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        prepared: dict[str, Any] = {"messages": messages, **kwargs}
        if tool_choice is None and tool_required:
            tool_choice = "required"
        if tools:
            prepared["tools"] = [to_engine_tool(t) for t in tools]
            prepared["tool_choice"] = tool_choice or "auto"
            prepared["parallel_tool_calls"] = allow_parallel_tool_calls
        elif tool_choice is not None:  # the engine refuses a forced call without tools (ToolError)
            prepared["tool_choice"] = tool_choice
        return prepared

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        """Keep only the first tool call unless parallel calls were allowed."""
        if not allow_parallel_tool_calls:
            blocks, seen_call = [], False
            for block in response.message.blocks:
                if isinstance(block, ToolCallBlock):
                    if seen_call:
                        continue
                    seen_call = True
                blocks.append(block)
            response.message.blocks = blocks
        return response

    def get_tool_calls_from_response(
        self,
        response: ChatResponse,
        error_on_no_tool_call: bool = True,
        **kwargs: Any,
    ) -> list[ToolSelection]:
        """The response's tool calls as ``ToolSelection``s.

        Streamed responses carry their tool calls on the last chunk only; earlier chunks give
        ``[]`` (or raise with ``error_on_no_tool_call=True``).
        """
        selections = [
            ToolSelection(
                tool_id=b.tool_call_id or b.tool_name,
                tool_name=b.tool_name,
                tool_kwargs=chat.engine_arguments(b.tool_kwargs),
            )
            for b in response.message.blocks
            if isinstance(b, ToolCallBlock)
        ]
        if not selections and response.message.additional_kwargs.get("tool_calls"):
            for call in legacy_tool_calls(response.message.additional_kwargs["tool_calls"]):
                selections.append(
                    ToolSelection(
                        tool_id=call["id"],
                        tool_name=call["function"]["name"],
                        tool_kwargs=call["function"]["arguments"],
                    )
                )
        if not selections and error_on_no_tool_call:
            invalid = response.message.additional_kwargs.get("invalid_tool_calls")
            detail = f"; invalid tool calls: {invalid}" if invalid else ""
            raise ValueError(f"Expected at least one tool call, but got 0 tool calls{detail}.")
        return selections

    # -- structured output -------------------------------------------------------------------

    def _structured_messages(self, prompt: BasePromptTemplate, prompt_args: dict) -> list[ChatMessage]:
        return self._get_messages(prompt, **prompt_args)

    @staticmethod
    def _parsed(output_cls: type[Model], response: ChatResponse) -> Model:
        raw = response.raw or {}
        parsed = raw.get("parsed")
        if isinstance(parsed, output_cls):
            return parsed
        text = response.message.content or ""
        try:
            if isinstance(parsed, dict):
                return output_cls.model_validate(parsed)
            return output_cls.model_validate_json(text)
        except ValueError as exc:
            reason = raw.get("finish_reason")
            hint = " (max_tokens was reached: raise it)" if reason in ("length", "incomplete") else ""
            raise ValueError(
                f"FlashMoE did not produce a complete {output_cls.__name__}{hint}: {text[:200]!r}"
            ) from exc

    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """A ``output_cls`` instance, generated under the engine's constrained decoding
        (``response_format=output_cls``). Other ``pydantic_program_mode``s use LlamaIndex's
        programs."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(
            LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args)
        )
        messages = self._structured_messages(prompt, prompt_args)
        response = self.chat(messages, response_format=output_cls, **(llm_kwargs or {}))
        result = self._parsed(output_cls, response)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """Async :meth:`structured_predict`."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(
            LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args)
        )
        messages = self._structured_messages(prompt, prompt_args)
        response = await self.achat(messages, response_format=output_cls, **(llm_kwargs or {}))
        result = self._parsed(output_cls, response)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @staticmethod
    def _partial(output_cls: type[Model], response: ChatResponse, current: Any) -> Model | FlexibleModel:
        from llama_index.core.program.utils import process_streaming_objects

        return process_streaming_objects(
            response, output_cls, cur_objects=[current] if current else None, flexible_mode=True
        )

    def _structured_stream_call(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Generator[Model | FlexibleModel, None, None]:
        """Partial objects (``FlexibleModel``s) while the JSON streams in, then the validated
        ``output_cls`` instance."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super()._structured_stream_call(output_cls, prompt, llm_kwargs, **prompt_args)
        messages = self._structured_messages(prompt, prompt_args)

        def gen() -> Generator[Model | FlexibleModel, None, None]:
            current = None
            stream = self.stream_chat(messages, response_format=output_cls, **(llm_kwargs or {}))
            for response in stream:
                if response.raw and "usage" in response.raw:  # the last chunk: the whole result
                    yield self._parsed(output_cls, response)
                    return
                current = self._partial(output_cls, response, current)
                yield current

        return gen()

    async def _structured_astream_call(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncGenerator[Model | FlexibleModel, None]:
        """Async :meth:`_structured_stream_call`."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super()._structured_astream_call(output_cls, prompt, llm_kwargs, **prompt_args)
        messages = self._structured_messages(prompt, prompt_args)

        async def gen() -> AsyncGenerator[Model | FlexibleModel, None]:
            current = None
            stream = await self.astream_chat(messages, response_format=output_cls, **(llm_kwargs or {}))
            async for response in stream:
                if response.raw and "usage" in response.raw:
                    yield self._parsed(output_cls, response)
                    return
                current = self._partial(output_cls, response, current)
                yield current

        return gen()
