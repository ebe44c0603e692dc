"""What a generation takes and gives: its settings, a store's defaults for them, and its results.

:class:`GenerationParams` (checked settings), :class:`GenerationDefaults` (a store's
``generation_config.json``), :class:`Chunk` (a streamed piece) and :class:`GenerationResult`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx

from flashmoe_backend.errors import ParameterError, StoreError, UnknownArgumentError
from flashmoe_backend.generation.stats import Stats
from flashmoe_backend.validation import (
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
