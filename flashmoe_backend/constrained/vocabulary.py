"""The token vocabulary as the grammar engine (llguidance) sees it.

:class:`Vocabulary` maps every token to the bytes it stands for (GPT-2 byte map for byte-level
BPE, ``▁``/``<0xNN>`` for sentencepiece) and builds, once per tokenizer, the
``llguidance.LLTokenizer`` every grammar of that tokenizer is compiled against.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["Vocabulary"]


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` map (printable stand-ins for all 256 bytes)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _gpt2_byte_decoder()
_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# llguidance's marker for special tokens: a byte that never occurs in UTF-8 text.
_SPECIAL_MARKER = b"\xff"


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside an mlx-lm ``TokenizerWrapper`` (or the argument)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer._tokenizer
    return tokenizer


def _decoder_kind(hf: Any) -> str:
    """``"byte_level"`` (GPT-2 style BPE), ``"sentencepiece"`` (``▁`` + ``<0xNN>``) or ``"text"``."""
    backend = getattr(hf, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        # Slow (python) sentencepiece tokenizers have no backend; guess from the vocabulary.
        vocab = hf.get_vocab()
        if "<0x41>" in vocab or any(t.startswith("▁") for t in list(vocab)[:2000]):
            return "sentencepiece"
        return "text"
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:  # pragma: no cover - exotic decoders
        state = {"type": type(decoder).__name__}
    text = json.dumps(state)
    if '"ByteLevel"' in text:
        return "byte_level"
    if '"ByteFallback"' in text or '"Metaspace"' in text or "▁" in text:
        return "sentencepiece"
    return "text"


def _token_to_bytes(token: str, kind: str) -> bytes:
    if kind == "byte_level":
        try:
            return bytes(_BYTE_DECODER[c] for c in token)
        except KeyError:
            return token.encode("utf-8")
    if kind == "sentencepiece":
        m = _SPM_BYTE.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("▁", " ").encode("utf-8")
    return token.encode("utf-8")


class Vocabulary:
    """Token ids, the bytes they stand for, and the grammar engine's tokenizer over them.

    Token strings are mapped to bytes through the tokenizer's byte map, never by decoding single
    tokens (which mangles tokens holding part of a UTF-8 character). Special tokens
    (``<|im_start|>``, EOS, ...) are special to the grammar too, so a grammar can never produce
    them; EOS is allowed exactly when the structure is complete. Added tokens that are *not*
    special (Qwen's ``<tool_call>``, ``<think>``, ...) are the text they stand for: a tool-call
    grammar lets the model write ``<tool_call>`` as the single token it was trained on.
    (``llguidance.hf.from_tokenizer``, which Outlines uses, marks every added token special, so
    a grammar's ``"<tool_call>"`` would reject that token.)

    Build with :meth:`from_tokenizer` (cached per tokenizer object) or from token bytes.
    """

    _cache: dict[int, tuple[Any, Vocabulary]] = {}
    _cache_lock = threading.Lock()

    def __init__(
        self,
        token_bytes: Sequence[bytes],
        eos_token_ids: Iterable[int],
        *,
        eos_token_id: int | None = None,
        special_ids: Iterable[int] = (),
        encode: Callable[[str], list[int]] | None = None,
        kind: str = "custom",
    ):
        eos = sorted({int(i) for i in eos_token_ids})
        if eos_token_id is None:
            if not eos:
                raise ValueError("the tokenizer has no EOS token: constrained decoding needs one")
            eos_token_id = eos[0]
        eos_token_id = int(eos_token_id)
        #: bytes each id stands for when generated (special tokens: their text).
        self.token_bytes = [bytes(b) for b in token_bytes]
        #: 1 + the largest token id.
        self.size = len(self.token_bytes)
        self.eos_token_id = eos_token_id
        #: every id that ends generation, the primary one first.
        self.eos_token_ids = tuple([eos_token_id] + [i for i in eos if i != eos_token_id])
        self.special_ids = frozenset(int(i) for i in special_ids) | set(self.eos_token_ids)
        self.kind = kind
        #: ``byte -> id`` of a single-byte token, for walking a grammar over arbitrary text.
        self.byte_token_ids: dict[int, int] = {}
        for tid, b in enumerate(self.token_bytes):
            if len(b) == 1 and tid not in self.special_ids:
                self.byte_token_ids.setdefault(b[0], tid)
        self._encode = encode or self._greedy_encode
        self._llg: Any = None
        self._sorted: tuple[list[bytes], np.ndarray] | None = None
        self._llg_lock = threading.Lock()
        h = hashlib.sha256(f"eos={self.eos_token_ids};special={sorted(self.special_ids)}".encode())
        for b in self.token_bytes:
            h.update(len(b).to_bytes(4, "little") + b)
        self.fingerprint = h.hexdigest()[:32]

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> Vocabulary:
        """The vocabulary of an mlx-lm ``TokenizerWrapper`` or a Hugging Face tokenizer.

        EOS ids are the wrapper's ``eos_token_ids`` (which mlx-lm stops on) plus the tokenizer's
        ``eos_token_id`` (the primary one). Cached per tokenizer object.
        """
        if isinstance(tokenizer, Vocabulary):
            return tokenizer
        hf = _hf_tokenizer(tokenizer)
        raw_eos = getattr(tokenizer, "eos_token_ids", None)
        eos_ids = {raw_eos} if isinstance(raw_eos, int) else {int(i) for i in (raw_eos or ())}
        with cls._cache_lock:
            hit = cls._cache.get(id(hf))
        if hit is not None and hit[0] is hf and set(hit[1].eos_token_ids) >= eos_ids:
            return hit[1]
        vocab = cls._build(hf, eos_ids)
        with cls._cache_lock:
            cls._cache[id(hf)] = (hf, vocab)
        return vocab

    @classmethod
    def _build(cls, hf: Any, extra_eos: set[int]) -> Vocabulary:
        vocab: dict[str, int] = hf.get_vocab()
        added = dict(getattr(hf, "added_tokens_decoder", {}) or {})
        special_ids = {int(i) for i in getattr(hf, "all_special_ids", []) or []}
        special_ids |= {int(tid) for tid, tok in added.items() if getattr(tok, "special", False)}
        eos_ids = set(extra_eos)
        eos_token_id = getattr(hf, "eos_token_id", None)
        if eos_token_id is not None:
            eos_ids.add(int(eos_token_id))
        kind = _decoder_kind(hf)
        size = max(vocab.values()) + 1 if vocab else 0
        token_bytes: list[bytes] = [b""] * size
        added_content = {int(i): t.content for i, t in added.items()}
        for token, tid in vocab.items():
            if tid in added_content:
                token_bytes[tid] = added_content[tid].encode("utf-8")
            else:
                token_bytes[tid] = _token_to_bytes(token, kind)

        def encode(text: str) -> list[int]:
            return list(hf.encode(text, add_special_tokens=False))

        return cls(token_bytes, eos_ids, eos_token_id=eos_token_id, special_ids=special_ids,
                   encode=encode, kind=kind)

    # -- the grammar engine's tokenizer ---------------------------------------------------------

    @property
    def llg(self) -> Any:
        """The ``llguidance.LLTokenizer`` over these tokens (built once: ~5 s for 248k tokens)."""
        with self._llg_lock:
            if self._llg is None:
                import llguidance

                self._llg = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(_TokenSource(self)),
                    eos_token=list(self.eos_token_ids),
                )
            return self._llg

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (the tokenizer's own encoding; greedy for a bare vocabulary)."""
        return self._encode(text)

    def _greedy_encode(self, text: str) -> list[int]:
        # Longest known token at each position; a bare vocabulary has no merge rules.
        table = getattr(self, "_by_bytes", None)
        if table is None:
            table = self._by_bytes = {}
            for tid, b in enumerate(self.token_bytes):
                if b and tid not in self.special_ids:
                    table.setdefault(b, tid)
            self._longest = max(map(len, table), default=1)
        data, out, i = text.encode("utf-8"), [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                tid = table.get(data[i : i + n])
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
            else:
                raise ValueError(f"byte {data[i]:#x} has no token in the vocabulary")
        return out

    def ids_with_prefix(self, prefix: bytes) -> np.ndarray:
        """Ids of the tokens whose bytes start with ``prefix`` (an index sorted by bytes, built
        on first use)."""
        if self._sorted is None:
            order = sorted(range(self.size), key=self.token_bytes.__getitem__)
            self._sorted = ([self.token_bytes[i] for i in order], np.asarray(order, np.int64))
        keys, ids = self._sorted
        lo = bisect.bisect_left(keys, prefix)
        end = prefix.rstrip(b"\xff")
        hi = len(keys) if not end else bisect.bisect_left(keys, end[:-1] + bytes([end[-1] + 1]))
        return ids[lo:hi]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        tb, n = self.token_bytes, self.size
        return b"".join(tb[i] if 0 <= i < n else b"" for i in ids)

    def __repr__(self) -> str:
        return (f"Vocabulary(size={self.size}, kind={self.kind!r}, eos={self.eos_token_ids}, "
                f"fingerprint={self.fingerprint})")


class _TokenSource:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes (special ones behind the marker
    byte), EOS/BOS ids and an encoder."""

    def __init__(self, vocab: Vocabulary):
        self.eos_token_id = vocab.eos_token_id
        self.bos_token_id = None
        self.special_token_ids = sorted(vocab.special_ids)
        tokens = []
        for tid, b in enumerate(vocab.token_bytes):
            if tid in vocab.special_ids or not b:
                b = _SPECIAL_MARKER + (b or f"<[{tid}]>".encode())
            tokens.append(b)
        self.tokens = tokens
        self._vocab = vocab

    def __call__(self, text: str) -> list[int]:
        return self._vocab.encode(text)
