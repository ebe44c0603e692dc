"""OpenAI's request and response JSON, and their translation to and from the engine.

Requests are pydantic models of the fields this server reads. Fields it does not know (``user``,
``metadata``, ``store``, ``service_tier``, a client's own extensions...) are accepted and
ignored, as OpenAI-compatible servers do, so that clients written for OpenAI work unchanged; but
a known field asking for what the engine cannot do (``n`` > 1, ``logprobs``, penalties other
than 0, ``logit_bias``) is refused with 400 rather than silently ignored. Beyond OpenAI's fields,
the engine's ``top_k``, ``min_p`` and ``repetition_penalty`` are read (as vLLM and mlx-lm's server
do), and ``chat_template_kwargs.enable_thinking``.

Values are checked by the engine (``GenerationParams``, tools, schemas), which names what is
wrong; pydantic only checks the JSON types.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flashmoe_backend import chat
from flashmoe_backend.generation.params import GenerationResult
from flashmoe_backend.server.errors import APIError
from flashmoe_backend.server.settings import ServerSettings

# -- requests ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    logprobs: Any = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # the engine's samplers, beyond OpenAI's (vLLM's and mlx-lm's names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def _refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, f"n={self.n} is not supported: one choice per request (n=1)", param="n")
        if self.logprobs not in (None, False):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(
                    400, f"{name} is not supported (only 0); use repetition_penalty", param=name
                )
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")

    def sampling(
        self, settings: ServerSettings, max_tokens: int | None, max_tokens_name: str = "max_tokens"
    ) -> dict[str, Any]:
        """The engine's generation arguments the request sets (the others are the store's
        defaults); ``max_tokens`` (the request's field ``max_tokens_name``) is checked against the
        server's limit."""
        self._refuse_unsupported()
        if max_tokens is not None and max_tokens > settings.max_tokens_limit:
            raise APIError(
                400,
                f"{max_tokens_name}={max_tokens} is above this server's limit of "
                f"{settings.max_tokens_limit} (--max-tokens-limit)",
                param=max_tokens_name,
            )
        kwargs: dict[str, Any] = {}
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        for name in ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.stop:
            kwargs["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return kwargs

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def engine_arguments(self, settings: ServerSettings) -> tuple[list[dict], dict[str, Any]]:
        """The engine's prompt (messages) and keyword arguments."""
        # max_completion_tokens is OpenAI's newer name; a client sending both means it
        if self.max_completion_tokens is not None:
            kwargs = self.sampling(settings, self.max_completion_tokens, "max_completion_tokens")
        else:
            kwargs = self.sampling(settings, self.max_tokens)
        if self.tools:
            kwargs["tools"] = self.tools
        if self.tool_choice is not None:
            kwargs["tool_choice"] = self.tool_choice
        if self.parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = self.parallel_tool_calls
        response_format = chat.engine_response_format(self.response_format)
        if response_format is not None:
            kwargs["response_format"] = response_format
        thinking = (self.chat_template_kwargs or {}).get("enable_thinking")
        if thinking is not None:
            kwargs["enable_thinking"] = thinking
        return engine_messages(self.messages), kwargs


class CompletionRequest(_Request):
    """``POST /v1/completions``: a raw prompt, no chat template."""

    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def engine_arguments(self, settings: ServerSettings) -> tuple[str | list[int], dict[str, Any]]:
        """The engine's prompt (text or token ids) and keyword arguments."""
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported (only 1)", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of one string)", param="prompt")
            prompt = prompt[0]
        return prompt, self.sampling(settings, self.max_tokens)


def engine_messages(messages: list[dict[str, Any]]) -> list[dict]:
    """OpenAI's messages as the engine's: assistant ``tool_calls`` with their arguments parsed
    (``chat.engine_tool_calls``), ``developer`` as ``system``, fields set to null left out."""
    out = []
    for message in messages:
        m = {k: v for k, v in message.items() if v is not None or k == "content"}
        if m.get("role") == "developer":  # OpenAI's newer name for the system turn
            m["role"] = "system"
        calls = m.get("tool_calls")
        # Only well-formed calls are converted; anything else goes to the engine as sent, whose
        # check names the message and call at fault.
        if isinstance(calls, list) and all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls
        ):
            m["tool_calls"] = chat.engine_tool_calls(calls)
        out.append(m)
    return out


# -- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A response id: ``chatcmpl-...`` or ``cmpl-...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """OpenAI's ``created``: Unix seconds."""
    return int(time.time())


def assistant_message(result: GenerationResult) -> dict[str, Any]:
    """The result as OpenAI's assistant message: content (null beside tool calls, as OpenAI
    writes it), ``tool_calls``, and the reasoning as ``reasoning_content``."""
    calls = chat.openai_tool_calls(result)
    content = result.text if result.text or not calls else None
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    if result.reasoning:
        message["reasoning_content"] = result.reasoning
    return message


def chat_completion(result: GenerationResult, model_id: str) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "message": assistant_message(result),
                "logprobs": None,
                "finish_reason": chat.openai_finish_reason(result.finish_reason),
            }
        ],
        "usage": chat.usage(result).to_openai(),
    }


def text_completion(result: GenerationResult, model_id: str) -> dict[str, Any]:
    """A ``text_completion`` object."""
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "text": result.text,
                "logprobs": None,
                "finish_reason": chat.openai_finish_reason(result.finish_reason),
            }
        ],
        "usage": chat.usage(result).to_openai(),
    }


def model_list(model_id: str, created: int) -> dict[str, Any]:
    """``GET /v1/models``: the one model served."""
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "flashmoe"}],
    }
