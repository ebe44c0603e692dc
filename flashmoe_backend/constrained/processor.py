"""The logits processor of a compiled grammar: llguidance's mask applied portably with MLX ops,
and structures steered to close within ``max_tokens``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import mlx.core as mx
import numpy as np

from flashmoe_backend.constrained.vocabulary import Vocabulary

__all__ = ["ConstrainedLogitsProcessor", "IncompleteOutputError", "StructuredOutputError",
           "expand_bits", "read_new_tokens"]


class StructuredOutputError(ValueError):
    """The generated text does not satisfy the requested structure."""


class IncompleteOutputError(StructuredOutputError):
    """The generated text is a valid prefix of the structure but stops before its end
    (typically: ``max_tokens`` was reached mid-structure)."""


# Bytes tried first when looking for a short way to finish a structure: closers, then filler.
_CLOSING_BYTES = b'"}],:1@\n</>a0 '
# Whole closing tags tried before single bytes: inside free text (an XML call's raw string value)
# a closer byte is just more text, and only the full tag ends the value or the call.
_CLOSING_PHRASES = (b"</function>\n</tool_call>", b"\n</parameter>\n")
# A byte chosen this often in one finishing walk is tried after the ones it has not.
_OFTEN = 4
# How many tokens before max_tokens the processor starts checking it can still finish, and how
# close to the limit the finishing path may come before the model is held to tokens that keep it.
_CLOSING_WINDOW = 96
_CLOSING_MARGIN = 16
# Before that window, every _PROBE_EVERY tokens within _PROBE_HORIZON of the limit, the length of
# a way to finish is estimated, and the window widened to fit it: a long tail (required
# parameters still to write, a string's minLength) must start steering early enough.
_PROBE_HORIZON = 512
_PROBE_EVERY = 32
_CLOSING_CANDIDATES = 8
# Bytes a finishing walk looks at, best first, for one that moves the grammar on.
_STATE_TRIALS = 24
# Bytes of finishing text looked at per token left (tokens hold ~3-4 bytes of such text).
_BYTES_PER_TOKEN = 4


class ConstrainedLogitsProcessor:
    """mlx-lm logits processor that advances an ``llguidance.LLMatcher`` and masks the logits.

    Called as ``processor(tokens, logits)`` with ``tokens`` all ids so far (the first call sees
    only the prompt, which is skipped) and ``logits`` of shape ``[1, V]``; ``V`` may exceed the
    tokenizer's vocabulary (the extra ids are masked). Each call advances the matcher by the tokens
    added since the previous call, then sets every token it does not allow to ``-inf``. EOS is
    allowed exactly when the structure is complete.

    The mask is applied portably (no Metal kernel): llguidance writes its bitmask into a numpy
    buffer (in Rust), which is expanded to a boolean mask -- in numpy when MLX runs on the CPU,
    on the device with MLX ops from the 32x smaller bitmask otherwise -- and applied with
    ``mx.where`` (so NaN/inf logits of disallowed tokens cannot leak through).

    With ``max_tokens``, from ``_CLOSING_WINDOW`` tokens before the limit (earlier when a probe
    finds the way to finish longer than that) it looks for a short
    way to finish (:meth:`finishing_path`); once that path nearly fills the tokens left, only
    tokens after which the structure can still finish in time stay allowed. A structure that no
    path can finish in time ends incomplete, and is reported so by :meth:`is_complete`.
    """

    def __init__(self, matcher: Any, vocabulary: Vocabulary, *, max_tokens: int | None = None,
                 guard: Any = None):
        """``guard``: an object whose ``banned(text, vocabulary, matcher, allowed)`` names
        tokens to take out of the grammar's mask
        (:class:`~flashmoe_backend.unique_items.UniqueItemsGuard`)."""
        self.matcher = matcher
        self.vocabulary = vocabulary
        self.max_tokens = max_tokens
        self.guard = guard
        self._text = bytearray()  # what was generated, for the guard
        self._n_seen: int | None = None
        self._generated: list[int] = []
        self.eos_generated = False
        self._eos = vocabulary.eos_token_ids
        self._words = np.zeros((vocabulary.size + 31) // 32, dtype=np.int32)
        self._biases: dict[tuple, mx.array] = {}
        self._plans: dict[int, list[int]] = {}  # token -> the way to finish after it
        self._window = _CLOSING_WINDOW
        self._device_path: bool | None = None

    # -- state ----------------------------------------------------------------------------------

    @property
    def is_complete(self) -> bool:
        """True when the text generated so far is a complete match of the constraint."""
        return self.eos_generated or bool(self.matcher.is_accepting())

    def is_finished(self) -> bool:
        """Same as :attr:`is_complete` (outlines' name)."""
        return self.is_complete

    @property
    def generated_ids(self) -> list[int]:
        return list(self._generated)

    def reset(self) -> None:
        self.matcher.reset()
        self._plans = {}
        self._window = _CLOSING_WINDOW
        self._n_seen = None
        self._generated = []
        self._text = bytearray()
        self.eos_generated = False

    def allowed_token_ids(self) -> list[int]:
        words = self._fill_words()
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits).tolist()

    # -- advancing ------------------------------------------------------------------------------

    def advance(self, token_id: int) -> None:
        """Advance by one generated token (raises :class:`StructuredOutputError` if disallowed)."""
        token_id = int(token_id)
        if token_id in self._eos:
            if not self.is_complete:
                raise StructuredOutputError(
                    f"EOS token {token_id} generated before the structure was complete")
            self.eos_generated = True
            self._generated.append(token_id)
            return
        if self.eos_generated:
            raise StructuredOutputError("token generated after EOS")
        if not 0 <= token_id < self.vocabulary.size:
            raise StructuredOutputError(f"token {token_id} is outside the vocabulary")
        if not self.matcher.consume_token(token_id):
            raise StructuredOutputError(
                f"token {token_id} ({self.vocabulary.token_bytes[token_id]!r}) is not allowed by "
                f"the constraint here: was the mask bypassed? ({_first_line(self.matcher)})")
        self._generated.append(token_id)
        self._text += self.vocabulary.token_bytes[token_id]

    def consume(self, token_ids: Iterable[int]) -> None:
        for t in token_ids:
            self.advance(t)

    def advance_text(self, text: str | bytes) -> bool:
        """Walk the matcher over ``text`` (byte by byte through single-byte tokens, else with
        the tokenizer's encoding). Returns False if the text leaves the language."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        bt = self.vocabulary.byte_token_ids
        if all(b in bt for b in data):
            ids = [bt[b] for b in data]
        else:  # pragma: no cover - vocabularies without all 256 byte tokens
            ids = self.vocabulary.encode(data.decode("utf-8", errors="replace"))
        return all(self.matcher.consume_token(t) for t in ids)

    def _sync(self, tokens: mx.array) -> None:
        if tokens.ndim == 2:
            tokens = tokens.reshape(-1)
        n = int(tokens.shape[0])
        if self._n_seen is None:
            self._n_seen = n  # the prompt (or whatever came before the first decode step)
            return
        if n < self._n_seen:  # speculative decoding rejected tokens: roll back
            k = self._n_seen - n
            if k > len(self._generated):
                raise StructuredOutputError(f"cannot roll the constraint back by {k} tokens")
            if self.eos_generated:
                self.eos_generated = False
                self._generated.pop()
                k -= 1
            if k and not self.matcher.rollback(k):
                raise StructuredOutputError(f"cannot roll the constraint back by {k} tokens")
            if k:
                del self._generated[-k:]
                self._text = bytearray(self.vocabulary.decode_bytes(
                    t for t in self._generated if t not in self._eos))
            self._n_seen = n
            return
        if n > self._n_seen:
            new = read_new_tokens(tokens, self._n_seen)
            self._n_seen = n
            self.consume(new)

    # -- finishing in time ----------------------------------------------------------------------

    def finishing_path(self, limit: int, matcher: Any = None,
                       text: bytes | None = None) -> list[int] | None:
        """A short token sequence (at most ``limit`` tokens) that completes the structure from
        the current state, or None if none is found. Not necessarily the shortest: the text is
        built byte by byte (forced bytes, else the first allowed of ``_CLOSING_BYTES``, else the
        lowest allowed byte), then written in the tokenizer's own tokens; the grammar checks
        every step, and the guard, if any, every byte (``text``: what ``matcher`` has read;
        by default the text generated so far)."""
        start = matcher or self.matcher
        text = bytes(self._text) if text is None else text
        # Two walks: one that only avoids repeating a byte lately, one that also avoids bytes
        # chosen often (digits before a unit); the shorter way wins.
        walks = [self._finishing_bytes(start.deep_copy(), _BYTES_PER_TOKEN * limit, text, often)
                 for often in (None, _OFTEN)]
        data = min((w for w in walks if w is not None), key=len, default=None)
        if data is None:
            return None
        if not data:
            return []
        try:
            ids = self.vocabulary.encode(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            ids = []
        if not ids or len(ids) > limit or not start.deep_copy().consume_tokens(ids):
            bt = self.vocabulary.byte_token_ids
            ids = [bt[b] for b in data]
        return ids if len(ids) <= limit else None

    def _finishing_bytes(self, m: Any, limit: int, text: bytes, often: int | None) -> bytes | None:
        bt = self.vocabulary.byte_token_ids
        order = [b for b in _CLOSING_BYTES if b in bt] + [b for b in range(256)
                                                          if b in bt and b not in _CLOSING_BYTES]
        out, recent, chosen = bytearray(), b"", [0] * 256
        while not m.is_accepting():
            if len(out) >= limit or m.is_error():
                return None
            forced = m.compute_ff_bytes() or self._closing_phrase(m)
            if forced:
                if not m.consume_tokens([bt[b] for b in forced]):
                    return None
                out += forced
                continue
            here = self._allowed_bytes(m, order)
            allowed = here if self.guard is None else self._unbanned_bytes(here, text + bytes(out), m)
            if not allowed:
                return None
            # A byte chosen twice lately, or often in this walk, is tried after the others:
            # inside free-form text (a string, an email's local part, digits before a unit)
            # repeating a byte is a loop, not the way out.
            ranked = sorted(allowed, key=lambda b: (recent.count(b) >= 2,
                                                    often is not None and chosen[b] >= often))
            # Better still, a byte after which other bytes are allowed than now: a digit of
            # ``[0-9]+[wdhm]`` leaves the same choice (a loop), the unit moves on.
            pick = self._first_moving_on(m, ranked, here, order)
            if not m.consume_token(bt[pick]):
                return None
            out.append(pick)
            recent = (recent + bytes([pick]))[-8:]
            chosen[pick] += 1
        return bytes(out)

    def _allowed_bytes(self, m: Any, order: list[int]) -> list[int]:
        """The single bytes ``m`` allows next, in ``order``."""
        bt = self.vocabulary.byte_token_ids
        mask = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)
        return [b for b in order if mask[bt[b] >> 3] >> (bt[b] & 7) & 1]

    def _first_moving_on(self, m: Any, ranked: list[int], here: list[int], order: list[int]) -> int:
        """The first of ``ranked`` that is not a loop (else the first): once a digit (a
        letter, ...) loops, the other bytes of its kind are taken to loop too, untried."""
        looping: set[str] = set()
        for b in ranked[:_STATE_TRIALS]:
            kind = _byte_kind(b)
            if kind in looping:
                continue
            if self._moves_on(m, b, here, order):
                return b
            if kind != "other":
                looping.add(kind)
        return ranked[0]

    def _moves_on(self, m: Any, byte: int, here: list[int], order: list[int]) -> bool:
        """Whether ``byte`` is not a loop: a loop byte (a digit of ``[0-9]+``, a letter in a
        string) leaves the same bytes allowed after it, also when taken twice. A closing ``]``
        may leave the same choice once (``,`` or ``]`` one level up) but not twice."""
        token = self.vocabulary.byte_token_ids[byte]
        trial = m.deep_copy()
        if not trial.consume_token(token):
            return False
        for _ in range(2):
            if trial.is_accepting() or self._allowed_bytes(trial, order) != here:
                return True
            if not trial.consume_token(token):
                return True
        return False

    def _closing_phrase(self, m: Any) -> bytes:
        """The first of :data:`_CLOSING_PHRASES` the grammar allows here in full, or ``b""``."""
        bt = self.vocabulary.byte_token_ids
        for phrase in _CLOSING_PHRASES:
            if all(b in bt for b in phrase) and m.deep_copy().consume_tokens([bt[b] for b in phrase]):
                return phrase
        return b""

    def _unbanned_bytes(self, allowed: list[int], text: bytes, m: Any) -> list[int]:
        bt = self.vocabulary.byte_token_ids
        banned = self.guard.banned(text, self.vocabulary, m,
                                   lambda _limit: np.asarray([bt[b] for b in allowed]))
        if banned is None or not banned.size:
            return allowed
        kept = [b for b in allowed if bt[b] not in set(banned.tolist())]
        return kept or allowed

    def _finishing_mask(self, logits: mx.array, words: np.ndarray) -> np.ndarray | None:
        """The tokens that keep the structure finishable within the tokens left, when that
        starts to matter; None while the model is free. Each allowed token comes with its way
        to finish, which the next step follows if the model took that token (recomputing it
        would not shrink: the greedy path starts the same way from every state)."""
        if self.max_tokens is None or self.eos_generated:
            return None
        left = self.max_tokens - len(self._generated)  # including this step's token
        plans, self._plans = self._plans, {}
        if self.matcher.is_accepting():
            return None
        if left > self._window:
            if left <= _PROBE_HORIZON and left % _PROBE_EVERY == 0:
                probe = self.finishing_path(left)
                if probe is not None:
                    self._window = max(self._window, len(probe) + 2 * _CLOSING_MARGIN)
            return None
        path = plans.get(self._generated[-1]) if self._generated else None
        if path is None or len(path) > left:
            path = self.finishing_path(left)
        if not path:
            return None  # cannot finish in time anyway
        allowed = _ids_from_words(words)
        allowed = allowed[allowed < min(self.vocabulary.size, logits.shape[-1])]
        scores = np.array(logits.reshape(-1)[mx.array(allowed)].astype(mx.float32))
        if len(path) < left - _CLOSING_MARGIN:
            # Still room, unless the model's favourite token commits to more than fits (a
            # comma that opens another array item): then it is held to tokens that fit.
            best = int(allowed[int(np.argmax(scores))])
            rest = self._finishing_after(best, left)
            if rest is not None:
                self._plans = {best: rest}
                return None
        self._plans = {path[0]: path[1:]}
        for t in allowed[np.argsort(-scores)[:_CLOSING_CANDIDATES]].tolist():
            if t in self._plans or t in self._eos:
                continue
            rest = self._finishing_after(t, left)
            if rest is not None:
                self._plans[t] = rest
        return np.asarray(sorted(self._plans))

    def _finishing_after(self, token: int, left: int) -> list[int] | None:
        """A way to finish in ``left - 1`` tokens once ``token`` is taken, or None."""
        if token in self._eos:
            return [] if self.matcher.is_accepting() else None
        trial = self.matcher.deep_copy()
        if not trial.consume_token(token):
            return None
        return self.finishing_path(left - 1, trial, bytes(self._text) + self.vocabulary.token_bytes[token])

    # -- masking --------------------------------------------------------------------------------

    def _fill_words(self) -> np.ndarray:
        words = self._words
        if self.eos_generated:
            words[:] = 0
            for e in self._eos:
                words[e >> 5] |= np.uint32(1 << (e & 31)).view(np.int32)
            return words
        self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        if self.matcher.is_error():
            raise StructuredOutputError(f"the constraint failed: {_first_line(self.matcher)}")
        if self.guard is not None:
            banned = self.guard.banned(bytes(self._text), self.vocabulary, self.matcher,
                                       lambda limit: _ids_up_to(words, limit))
            if banned is not None and banned.size:
                _clear_bits(words, banned)
        return words

    def allowed_mask(self, width: int) -> mx.array:
        """Boolean ``[width]`` array of the tokens allowed in the current state."""
        return self._dense_mask(self._fill_words(), width)

    def _dense_mask(self, words: np.ndarray, width: int) -> mx.array:
        if self._device_path is None:
            self._device_path = mx.default_device() != mx.cpu
        if self._device_path:  # ship the 32x smaller bitmask, expand it on the device
            return expand_bits(mx.array(words), width)
        bits = np.unpackbits(words.view(np.uint8), count=min(width, words.size * 32),
                             bitorder="little")
        if width > bits.size:
            bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=bits.dtype)])
        return mx.array(bits.view(np.bool_))

    def bias(self, width: int, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The current mask as an additive bias: ``0`` allowed, ``-inf`` not (``[width]``)."""
        zero = mx.array(0, dtype=dtype)
        return mx.where(self.allowed_mask(width), zero, mx.array(-math.inf, dtype=dtype))

    def mask_logits(self, logits: mx.array) -> mx.array:
        """``logits`` with every disallowed token set to ``-inf``.

        Non-finite logits (NaN, +-inf) become the dtype's lowest finite value first, so that no
        NaN/+inf of a disallowed token survives the mask and a model emitting them still samples
        an allowed token. Few allowed tokens (inside a structure, mostly) are gathered and
        scattered into a row of ``-inf``; many (inside a string, free text) get an additive
        ``0``/``-inf`` bias, kept while the mask repeats (a select over a mixed mask is branchy
        on MLX's CPU). At a 248k-token width each costs a fraction of a millisecond
        (bench/RESULTS.md)."""
        width = int(logits.shape[-1])
        words = self._fill_words()
        keep = self._finishing_mask(logits, words)
        count = len(keep) if keep is not None else int(np.bitwise_count(words.view(np.uint32)).sum())
        if count <= _SPARSE_LIMIT:
            ids = keep if keep is not None else _ids_from_words(words)
            return _scatter_allowed(logits, ids[ids < width])
        return _add_bias(logits, self._dense_bias(words, width, logits.dtype),
                         float(mx.finfo(logits.dtype).min))

    def _dense_bias(self, words: np.ndarray, width: int, dtype: mx.Dtype) -> mx.array:
        """``0``/``-inf`` per token, kept for the last few masks: inside a string or free text
        the mask repeats token after token, and adding a bias is branch-free where MLX's CPU
        select over a mixed mask is not (0.7 ms against 0.2 ms at 248k tokens)."""
        key = (words.tobytes(), width, dtype)
        bias = self._biases.pop(key, None)
        if bias is None:
            bias = mx.where(self._dense_mask(words, width), mx.array(0, dtype=dtype),
                            mx.array(-math.inf, dtype=dtype))
            if len(self._biases) >= _BIAS_CACHE:
                self._biases.pop(next(iter(self._biases)))
        self._biases[key] = bias
        return bias

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self._sync(tokens)
        return self.mask_logits(logits)


#: At most this many allowed tokens are gathered and scattered; more get an additive bias.
_SPARSE_LIMIT = 4096
#: Dense biases a processor keeps (the masks it met last).
_BIAS_CACHE = 4


def _byte_kind(b: int) -> str:
    return "digit" if 48 <= b <= 57 else "letter" if (65 <= b <= 90 or 97 <= b <= 122) else "other"


def _ids_from_words(words: np.ndarray) -> np.ndarray:
    """The set bits of a bitmask, as token ids (only the non-zero words are expanded)."""
    nz = np.flatnonzero(words)
    bits = np.unpackbits(words[nz].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    word, bit = np.nonzero(bits)
    return nz[word] * 32 + bit


def _ids_up_to(words: np.ndarray, limit: int) -> np.ndarray | None:
    """The allowed ids, or None when there are more than ``limit`` (counted, not expanded)."""
    if int(np.bitwise_count(words.view(np.uint32)).sum()) > limit:
        return None
    return _ids_from_words(words)


def _clear_bits(words: np.ndarray, ids: np.ndarray) -> None:
    """Take ``ids`` out of a bitmask, unless that leaves nothing: a guard must never stall
    the grammar (the output is then checked after generation, as without it)."""
    w = words.view(np.uint32)
    kept = w.copy()
    np.bitwise_and.at(w, ids >> 5, ~(np.uint32(1) << (ids & 31).astype(np.uint32)))
    if not w.any():
        w[:] = kept


def _scatter_allowed(logits: mx.array, ids: np.ndarray) -> mx.array:
    flat = logits.reshape(-1)
    out = mx.full(flat.shape, -math.inf, dtype=logits.dtype)
    if ids.size:
        where = mx.array(ids.astype(np.int32))
        out[where] = _finite(mx.take(flat, where), float(mx.finfo(logits.dtype).min))
    return out.reshape(logits.shape)


def _finite(x: mx.array, low: float) -> mx.array:
    """Non-finite values (NaN, +-inf: the ones where x - x is not 0) as ``low``."""
    return mx.where((x - x) == 0, x, low)


@mx.compile
def _add_bias(logits: mx.array, bias: mx.array, low: float) -> mx.array:
    return _finite(logits, low) + bias


def _first_line(matcher: Any) -> str:
    err = matcher.get_error() or "no error"
    return err.strip().splitlines()[0]


def read_new_tokens(tokens: mx.array, start: int) -> list[int]:
    """``tokens[start:]`` as Python ints. Waits for the stream first: the newest token comes from
    the previous step's ``async_eval``, and reading it must not race that work (costs nothing
    extra: reading the token has to wait for the same work anyway)."""
    mx.synchronize()
    return tokens[start:].tolist()


_BIT_INDEX: dict[tuple[int, int], tuple[mx.array, mx.array, mx.array]] = {}


def expand_bits(words: mx.array, width: int) -> mx.array:
    """int32 bitmask words -> bool[width] (bit i of word w is token 32*w + i), with MLX ops;
    tokens past the bitmask are not allowed.

    Written as a gather + shift per token (no reshape/slice of a broadcast result, which
    produced wrong trailing bits on mlx-cuda 0.32.4 when ``width`` is not a multiple of 32)."""
    key = (width, int(words.shape[0]))
    idx = _BIT_INDEX.get(key)
    if idx is None:
        ar = mx.arange(width, dtype=mx.int32)
        word_of = mx.minimum(ar >> 5, words.shape[0] - 1)
        inside = ar < words.shape[0] * 32
        idx = _BIT_INDEX[key] = (word_of, ar & 31, inside)
        mx.eval(*idx)
    word_of, bit_of, inside = idx
    return mx.logical_and(((mx.take(words, word_of) >> bit_of) & 1).astype(mx.bool_), inside)
