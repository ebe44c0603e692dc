"""The generation loop: prompts to token ids, and mlx-lm's sampling loop with stop strings on top.

Sampling, logits processors, KV caches and detokenization are mlx-lm's (``stream_generate``);
this module adds what an application needs around them: chat messages through the
tokenizer's chat template, stop strings that never reach the output, and finish reasons.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from flashmoe_backend.errors import PromptError
from flashmoe_backend.generation.params import (
    Chunk,
    FinishReason,
    GenerationParams,
    LogitsProcessor,
    Prompt,
)
from flashmoe_backend.generation.stats import Stats


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
        ids = _encode(tokenizer, prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
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
    return _encode(tokenizer, text, add_special_tokens=False)


def _encode(tokenizer: TokenizerWrapper, text: str, *, add_special_tokens: bool) -> list[int]:
    # verbose=False: no transformers warning that the ids exceed the tokenizer's
    # model_max_length; the engine checks the context window itself (ContextWindowError).
    return tokenizer.encode(text, add_special_tokens=add_special_tokens, verbose=False)


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
