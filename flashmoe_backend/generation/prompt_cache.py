"""Prompt caching: reuse the model's state for a prompt prefix seen before.

RAG chains and agents resend the same system prompt and tool list; chats resend the whole
history. GatedDeltaNet state cannot be trimmed back to a shorter prefix, so instead of trimming
we keep snapshots of the caches taken at prefix boundaries (end of the system block, end of
the history before the newest message, the prompt minus its last token) and restore the
longest one that the new prompt extends.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

Cache = list[Any]


class PromptCache:
    """An LRU of cache snapshots keyed by the token ids they have processed."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], Cache] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def restore(self, model: nn.Module, tokens: Sequence[int]) -> tuple[Cache, int]:
        """A cache for ``tokens``: a copy of the longest snapshot of a strict prefix (at least
        one token must remain for the model to process), or a fresh one. Returns (cache, n)
        where n tokens are already processed."""
        best: tuple[int, ...] = ()
        for key in self._entries:
            if len(best) < len(key) < len(tokens) and tuple(tokens[: len(key)]) == key:
                best = key
        if not best:
            return make_prompt_cache(model), 0
        self._entries.move_to_end(best)
        return copy.deepcopy(self._entries[best]), len(best)

    def save(self, tokens: Sequence[int], cache: Cache) -> None:
        """Keep a snapshot of ``cache`` as the state after ``tokens``."""
        if self.max_entries <= 0 or not tokens:
            return
        snapshot = copy.deepcopy(cache)
        mx.eval([c.state for c in snapshot])
        self._entries[tuple(tokens)] = snapshot
        self._entries.move_to_end(tuple(tokens))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def prefill(model: nn.Module, tokens: Sequence[int], cache: Cache, step: int) -> None:
    """Run ``tokens`` through the model into ``cache``, ``step`` tokens (one layer-major chunk)
    at a time."""
    for i in range(0, len(tokens), step):
        model(mx.array(tokens[i : i + step])[None], cache=cache)
        mx.eval([c.state for c in cache])


def message_boundaries(
    tokenizer: TokenizerWrapper,
    messages: Sequence[dict],
    prompt_ids: Sequence[int],
    tools: Sequence[dict] | None = None,
) -> list[int]:
    """Token offsets in ``prompt_ids`` where a reusable prefix ends: after the system block and
    before the newest message. Offsets whose rendering is not a token prefix are dropped."""
    system = _system_messages(messages)
    ends = []
    for n in sorted({system, len(messages) - 1}):
        if n <= 0 and not tools:
            continue
        end = _prefix_end(tokenizer, messages[:n], prompt_ids, tools)
        if end is not None:
            ends.append(end)
    return ends


def shared_prefix_end(
    tokenizer: TokenizerWrapper,
    messages: Sequence[dict],
    prompt_ids: Sequence[int],
    tools: Sequence[dict] | None = None,
) -> int | None:
    """The token offset in ``prompt_ids`` where the system block and the tool list end: the
    prefix that other conversations share (what ``prompt_cache_dir`` keeps), or ``None`` when
    there is neither or its rendering is not a token prefix."""
    system = _system_messages(messages)
    if system == 0 and not tools:
        return None
    return _prefix_end(tokenizer, messages[:system], prompt_ids, tools)


def _system_messages(messages: Sequence[dict]) -> int:
    """How many messages the leading system block has."""
    system = 0
    while system < len(messages) and messages[system]["role"] == "system":
        system += 1
    return system


def _prefix_end(
    tokenizer: TokenizerWrapper,
    head: Sequence[dict],
    prompt_ids: Sequence[int],
    tools: Sequence[dict] | None,
) -> int | None:
    """The length of ``head``'s rendering when it is a strict token prefix of ``prompt_ids``."""
    try:
        text = tokenizer.apply_chat_template(
            list(head), tools=list(tools) if tools else None, tokenize=False,
            add_generation_prompt=False,
        )
    except Exception:  # some templates refuse partial conversations: no boundary there
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if 0 < len(ids) < len(prompt_ids) and list(prompt_ids[: len(ids)]) == ids:
        return len(ids)
    return None
