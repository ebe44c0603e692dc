"""Generation: prompts to token ids, and mlx-lm's sampling loop with stop strings on top.

Sampling, logits processors, KV caches and detokenization are mlx-lm's (``stream_generate``);
this module adds what an application needs around them: chat messages through the
tokenizer's chat template, stop strings that never reach the output, finish reasons, and a
store's own generation defaults (:class:`GenerationDefaults`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .errors import ParameterError, PromptError, StoreError, UnknownArgumentError
from .stats import Stats
from .validation import (
    check_bool,
    check_int,
    check_number,
    check_processors,
    check_seed,
    check_stop,
)

Prompt = str | Sequence[int] | Sequence[dict]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
FinishReason = Literal["stop", "length", "tool_calls", "incomplete"]

GENERATION_CONFIG = "generation_config.json"
#: flashmoe's key in ``generation_config.json``: keyword arguments of the chat template, e.g.
#: ``{"enable_thinking": false}`` for a model that answers without thinking first.
CHAT_TEMPLATE_KWARGS = "chat_template_kwargs"


@dataclass
class GenerationParams:
    """Sampling and stopping options of one generation (mlx-lm's meanings).

    ``max_tokens=None`` generates up to the end of the model's context window. Every value is
    checked here: a bad one raises ``ParameterError`` naming it.
    """

    max_tokens: int | None = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    logits_processors: Sequence[LogitsProcessor] = ()
    enable_thinking: bool | None = None

    def __post_init__(self) -> None:
        check_int("max_tokens", self.max_tokens, 1, none_means="up to the context window")
        check_number("temperature", self.temperature, 0.0)
        check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_int("top_k", self.top_k, 0)
        check_number("min_p", self.min_p, 0.0, 1.0)
        check_number("repetition_penalty", self.repetition_penalty, 0.0, low_open=True, optional=True)
        check_seed(self.seed)
        self.stop = check_stop(self.stop)
        self.logits_processors = check_processors(self.logits_processors)
        check_bool("enable_thinking", self.enable_thinking, optional=True)


PARAM_NAMES: frozenset[str] = frozenset(f.name for f in fields(GenerationParams))
#: The parameters a front end keeps as settings of its model object (``stop`` and the logits
#: processors travel with each call).
SETTING_NAMES: tuple[str, ...] = ("max_tokens", "temperature", "top_p", "top_k", "min_p",
                                  "repetition_penalty", "seed", "enable_thinking")


def generation_params(defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> GenerationParams:
    """The parameters of one call: ``defaults`` (a store's), overridden by the caller's ``kwargs``.

    Raises ``UnknownArgumentError`` (a ``TypeError``) for a keyword that is no parameter, and
    ``ParameterError`` for a bad value.
    """
    unknown = set(kwargs) - PARAM_NAMES
    if unknown:
        raise UnknownArgumentError(
            f"unknown generation argument(s): {', '.join(sorted(unknown))}; "
            f"expected {', '.join(sorted(PARAM_NAMES))}"
        )
    return GenerationParams(**{**defaults, **kwargs})


@dataclass(frozen=True)
class GenerationDefaults:
    """A store's generation defaults, read from its ``generation_config.json``.

    ``params`` are Hugging Face's sampling keys as :class:`GenerationParams` values, with
    transformers' meanings: ``do_sample`` false or absent is greedy decoding; with
    ``do_sample: true``, ``temperature`` (default 1.0), ``top_p`` (1.0), ``top_k`` (50) and
    ``min_p`` sample; ``repetition_penalty`` and ``max_new_tokens`` (as ``max_tokens``) apply
    either way. ``chat_template_kwargs`` (flashmoe's key, :data:`CHAT_TEMPLATE_KWARGS`) are passed
    to the chat template, e.g. ``{"enable_thinking": false}``. A caller's own values win.
    """

    params: Mapping[str, Any] = field(default_factory=dict)
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any]) -> GenerationDefaults:
        """Defaults of a parsed ``generation_config.json`` (``ParameterError`` on a bad value)."""
        params: dict[str, Any] = {}
        if config.get("do_sample"):
            params["temperature"] = config.get("temperature", 1.0)
            params["top_p"] = config.get("top_p", 1.0)
            params["top_k"] = config.get("top_k", 50)
            if config.get("min_p") is not None:
                params["min_p"] = config["min_p"]
        else:
            params["temperature"] = 0.0
        if config.get("repetition_penalty") not in (None, 1.0):
            params["repetition_penalty"] = config["repetition_penalty"]
        if config.get("max_new_tokens") is not None:
            params["max_tokens"] = config["max_new_tokens"]
        GenerationParams(**params)  # every value checked once, at load
        template_kwargs = config.get(CHAT_TEMPLATE_KWARGS) or {}
        if not isinstance(template_kwargs, Mapping) or not all(isinstance(k, str) for k in template_kwargs):
            raise ParameterError(
                f"{CHAT_TEMPLATE_KWARGS} must be an object of keyword arguments, got {template_kwargs!r}"
            )
        check_bool(
            f"{CHAT_TEMPLATE_KWARGS}.enable_thinking", template_kwargs.get("enable_thinking"), optional=True
        )
        return cls(params, dict(template_kwargs))


def read_generation_defaults(store: Path) -> GenerationDefaults:
    """The generation defaults of a store (or checkpoint) directory; none without a
    ``generation_config.json``. Raises ``StoreError`` naming the file and the bad value."""
    path = Path(store) / GENERATION_CONFIG
    if not path.is_file():
        return GenerationDefaults()
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise StoreError(f"{path}: expected a JSON object")
    try:
        return GenerationDefaults.from_generation_config(config)
    except ParameterError as e:
        raise StoreError(f"{path}: {e}") from e


@dataclass
class Chunk:
    """A piece of streamed text and the token ids that produced it. ``kind`` is "content" or
    "reasoning" (text inside ``<think>``); tool-call markup is never streamed."""

    text: str
    token_ids: list[int]
    kind: Literal["content", "reasoning"] = "content"


@dataclass
class GenerationResult:
    """What a generation produced. ``text`` is the content: no stop string, no tool-call or
    reasoning markup (those are in ``tool_calls`` and ``reasoning``)."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stats: Stats
    prompt_token_ids: list[int] = field(default_factory=list)
    raw_text: str = ""
    reasoning: str | None = None
    tool_calls: list[Any] = field(default_factory=list)
    invalid_tool_calls: list[Any] = field(default_factory=list)
    parsed: Any = None


def encode_prompt(
    tokenizer: TokenizerWrapper,
    prompt: Prompt,
    *,
    tools: Sequence[dict] | None = None,
    enable_thinking: bool | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of a prompt: a string, token ids, or chat messages (rendered by the template
    with ``template_kwargs``; ``enable_thinking``, when given, overrides theirs).

    A conversation whose last message is from the assistant is continued, not answered. The
    prompt's shape is the engine's to check (``validation.check_prompt``); this raises
    ``PromptError`` for what only the tokenizer can tell: no chat template, a template that
    refuses the messages, a string that encodes to nothing.
    """
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        ids = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
        if not ids:
            raise PromptError(f"the prompt {prompt!r} encodes to no tokens")
        return ids
    prompt = list(prompt)
    if not prompt:
        raise PromptError("the prompt is an empty list: pass at least one message or token id")
    if all(isinstance(t, int) for t in prompt):
        return prompt
    if not all(isinstance(m, dict) and "role" in m for m in prompt):
        raise PromptError(
            "prompt must be a string, a list of token ids, or a list of messages "
            "(dicts with 'role' and 'content')"
        )
    if tokenizer.chat_template is None:
        raise PromptError("this model's tokenizer has no chat template; pass a string prompt")
    continue_final = prompt[-1]["role"] == "assistant"
    extra = dict(template_kwargs or {})
    if enable_thinking is not None:
        extra["enable_thinking"] = enable_thinking
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            prompt,
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
            **extra,
        )
    except TemplateError as e:  # the template's own checks (e.g. roles must alternate)
        raise PromptError(f"the chat template cannot render these messages: {e}") from e
    return tokenizer.encode(text, add_special_tokens=False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still become a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


@dataclass
class TokenStream:
    """Iterates ``Chunk``s; afterwards holds the finish reason, token ids and timings."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    prompt_ids: list[int]
    params: GenerationParams
    prefill_step_size: int = 2048
    prompt_cache: list | None = None  # the model's caches, already holding the earlier prompt
    context_ids: Sequence[int] = ()  # prompt tokens already in prompt_cache (processors see them)
    extra_processors: Sequence[LogitsProcessor] = ()
    finish_reason: FinishReason = "length"
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0

    def __iter__(self) -> Iterator[Chunk]:
        p = self.params
        if p.seed is not None:
            mx.random.seed(p.seed)
        sampler = make_sampler(p.temperature, p.top_p, p.min_p, top_k=p.top_k)
        processors = make_logits_processors(repetition_penalty=p.repetition_penalty)
        processors += list(p.logits_processors) + list(self.extra_processors)
        if self.context_ids:
            processors = [_WithContext(f, self.context_ids) for f in processors]
        stops = list(p.stop)
        emitted = 0  # characters of self.text already yielded
        pending: list[int] = []
        start = time.perf_counter()
        first = None
        responses = stream_generate(
            self.model,
            self.tokenizer,
            mx.array(self.prompt_ids),
            max_tokens=p.max_tokens,
            sampler=sampler,
            logits_processors=processors or None,
            prefill_step_size=self.prefill_step_size,
            prompt_cache=self.prompt_cache,
        )
        try:
            for response in responses:
                if first is None:
                    first = time.perf_counter()
                if response.finish_reason != "stop" or response.token not in self._eos:
                    self.token_ids.append(response.token)
                    pending.append(response.token)
                self.text += response.text
                if stops:
                    cut = min(
                        (i for s in stops if (i := self.text.find(s, max(0, emitted - len(s)))) >= 0),
                        default=-1,
                    )
                    if cut >= 0:
                        self.text = self.text[:cut]
                        self.finish_reason = "stop"
                        if cut > emitted:
                            yield Chunk(self.text[emitted:], pending)
                        return
                if response.finish_reason is not None:
                    self.finish_reason = response.finish_reason
                hold = _held_back(self.text, stops) if response.finish_reason is None else 0
                if len(self.text) - hold > emitted or (pending and response.finish_reason):
                    yield Chunk(self.text[emitted : len(self.text) - hold], pending)
                    emitted, pending = len(self.text) - hold, []
        finally:
            responses.close()
            end = time.perf_counter()
            first = first or end
            self.prompt_seconds = first - start
            self.generation_seconds = end - first

    @property
    def _eos(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)


class _WithContext:
    """Gives a logits processor the whole prompt, also the part a prompt cache already holds
    (mlx-lm only passes the tokens it was asked to process)."""

    def __init__(self, processor: LogitsProcessor, context: Sequence[int]):
        self.processor = processor
        self.context = mx.array(list(context), dtype=mx.uint32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        return self.processor(mx.concatenate([self.context, tokens.astype(mx.uint32)]), logits)


def finish_stats(stats: Stats, stream: TokenStream) -> Stats:
    """Fill the token counts and timings of a finished stream into ``stats``."""
    stats.prompt_tokens = len(stream.prompt_ids)
    stats.generated_tokens = len(stream.token_ids)
    stats.prompt_seconds = stream.prompt_seconds
    stats.generation_seconds = stream.generation_seconds
    stats.compute_seconds = stream.prompt_seconds + stream.generation_seconds - stats.io_seconds
    return stats
