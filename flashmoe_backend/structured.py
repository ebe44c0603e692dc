"""Constrained decoding on outlines-core, portable to every MLX backend (CPU, CUDA, Metal).

What this module does, in the order a request meets it:

1. :func:`response_format_to_regex` / :meth:`Constraint.from_response_format` turn what the user
   asked for (a Pydantic model, a JSON-schema dict, an OpenAI ``response_format`` dict, an
   ``outlines.types.Regex``, a list of choices, ``Literal``/``Enum`` and the other Python types
   outlines understands) into one regular expression. JSON schemas go through
   ``outlines_core.json_schema.build_regex_from_schema`` with a tight whitespace pattern
   (``[ ]?``: at most one space where JSON allows whitespace, no runaway newlines), after a pass of
   our own that rejects malformed schemas with a clear :class:`ValueError` and fills in what
   outlines-core 0.2.14 leaves out: integer and number ``minimum``/``maximum`` (exclusive too) and
   JSON-safe ``email``/``uri``/``ipv4``/``hostname`` formats.
2. :func:`compile_index` compiles the regex against the tokenizer's vocabulary into an
   ``outlines_core.Index``, the slow step, cached in memory and on disk.
3. :meth:`Constraint.logits_processor` hands out a fresh stateful mlx-lm logits processor
   (``processor(tokens, logits) -> logits``) per generation; it walks an ``outlines_core.Guide``
   over the generated tokens and masks the disallowed ones to ``-inf``.
4. :meth:`Constraint.parse` turns the generated text into the Pydantic instance / dict / str, and
   raises :class:`IncompleteOutputError` when generation stopped mid-structure.

:func:`from_mlxlm` gives an ``outlines`` model object (a subclass of ``outlines.models.MLXLM``)
that uses this machinery, so ``model(prompt, PydanticModel)`` works on CPU and CUDA too (stock
outlines 1.3.3 applies its masks with a Metal-only kernel).
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import math
import os
import re
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import outlines_core
from outlines_core import Guide, Index
from outlines_core import Vocabulary as CoreVocabulary
from outlines_core.json_schema import build_regex_from_schema

__all__ = [
    "DEFAULT_WHITESPACE",
    "Constraint",
    "ConstrainedLogitsProcessor",
    "IncompleteOutputError",
    "StructuredOutputError",
    "Vocabulary",
    "clear_index_cache",
    "compile_index",
    "from_mlxlm",
    "index_cache_dir",
    "index_cache_stats",
    "integer_range_regex",
    "number_range_regex",
    "regex_escape",
    "response_format_to_regex",
    "schema_to_regex",
]

#: Whitespace allowed wherever JSON allows whitespace: at most one space.
DEFAULT_WHITESPACE = r"[ ]?"


class StructuredOutputError(ValueError):
    """The generated text does not satisfy the requested structure."""


class IncompleteOutputError(StructuredOutputError):
    """The generated text is a valid prefix of the structure but stops before its end
    (typically: ``max_tokens`` was reached mid-structure)."""


# =============================================================================================
# Vocabulary
# =============================================================================================


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

# outlines-core builds its DFA with leftmost-first semantics and reports matches one byte late,
# so at the *end* of a regex it drops continuations: ``0(\.[0-9]+)?`` never gets past "0",
# ``(ab|abc)`` never gives "abc", and after a first tool call no second one can start. We
# therefore compile ``(?:REGEX)`` followed by a sentinel character that no real token can
# produce, with a sentinel token added to the vocabulary: the structure is complete exactly
# when the sentinel token is allowed, and that is when the processor allows EOS.
_SENTINEL = "\U0010ffff"
_SENTINEL_BYTES = _SENTINEL.encode("utf-8")
_FORMAT_VERSION = 2
_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside an mlx-lm ``TokenizerWrapper`` (or the argument)."""
    try:
        from mlx_lm.tokenizer_utils import TokenizerWrapper
    except ImportError:  # pragma: no cover
        TokenizerWrapper = ()  # type: ignore[assignment]
    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer._tokenizer
    if isinstance(tokenizer, Vocabulary):
        raise TypeError("expected a tokenizer, got a Vocabulary")
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


class Vocabulary:
    """The token vocabulary as outlines-core needs it, built from token *bytes*.

    Token strings are mapped to the bytes they stand for (GPT-2 byte map for byte-level BPE,
    ``▁``/``<0xNN>`` for sentencepiece), never by decoding single tokens (which mangles tokens that
    hold part of a UTF-8 character). Special tokens (``<|im_start|>``, ...) are left out so the
    constraint can never produce them, except EOS, which is allowed exactly when the structure is
    complete. Added tokens that are *not* special (Qwen's ``<tool_call>``, ``<think>``, ...) are
    kept, as the text they stand for: they are ordinary text to the grammar, and a tool-call
    grammar should let the model write ``<tool_call>`` as the single token it was trained on.

    Build with :meth:`from_tokenizer` (cached per tokenizer object).
    """

    core: CoreVocabulary
    fingerprint: str
    eos_token_id: int
    eos_token_ids: tuple[int, ...]
    #: bytes each id stands for when generated (special tokens: their text), ``b""`` if unknown.
    token_bytes: list[bytes]
    #: ids the grammar may use (everything but special and EOS tokens).
    allowed_ids: frozenset[int]
    #: ``byte -> id`` of a single-byte token, for walking a guide over arbitrary text.
    byte_token_ids: dict[int, int]
    #: 1 + the largest token id.
    size: int
    #: id of the end-of-structure sentinel token (see :func:`compile_index`); == ``size``.
    sentinel_id: int
    kind: str

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _cache_lock = threading.Lock()

    def __init__(
        self,
        token_bytes: Sequence[bytes],
        eos_token_ids: Iterable[int],
        *,
        eos_token_id: int | None = None,
        excluded_ids: Iterable[int] = (),
        kind: str = "custom",
    ):
        eos = sorted({int(i) for i in eos_token_ids})
        if eos_token_id is None:
            if not eos:
                raise ValueError("the tokenizer has no EOS token: constrained decoding needs one")
            eos_token_id = eos[0]
        eos_token_id = int(eos_token_id)
        if eos_token_id not in eos:
            eos.insert(0, eos_token_id)
        excluded = set(int(i) for i in excluded_ids) | set(eos)
        self.token_bytes = [bytes(b) for b in token_bytes]
        self.size = len(self.token_bytes)
        self.eos_token_id = eos_token_id
        self.eos_token_ids = tuple([eos_token_id] + [i for i in eos if i != eos_token_id])
        self.kind = kind
        mapping: dict[bytes, list[int]] = {}
        allowed = set()
        for tid, b in enumerate(self.token_bytes):
            # Tokens holding byte 0xF4 (only ever the lead byte of the private-use plane-16
            # characters U+100000..U+10FFFF) are left out so that no real token can spell the
            # sentinel U+10FFFF.
            if tid in excluded or not b or 0xF4 in b:
                continue
            mapping.setdefault(b, []).append(tid)
            allowed.add(tid)
        self.sentinel_id = self.size
        mapping[_SENTINEL_BYTES] = [self.sentinel_id]
        self.allowed_ids = frozenset(allowed)
        self.byte_token_ids = {}
        for b, ids in mapping.items():
            if len(b) == 1:
                self.byte_token_ids[b[0]] = min(ids)
        h = hashlib.sha256()
        h.update(
            f"outlines_core={outlines_core_version()};eos={eos_token_id};v={_FORMAT_VERSION}\n"
            .encode()
        )
        for b in sorted(mapping):
            h.update(len(b).to_bytes(4, "little") + b)
            h.update(",".join(map(str, sorted(mapping[b]))).encode() + b"\n")
        self.fingerprint = h.hexdigest()[:32]
        self.core = CoreVocabulary(eos_token_id, mapping)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> Vocabulary:
        """The vocabulary of an mlx-lm ``TokenizerWrapper`` or a Hugging Face tokenizer.

        EOS ids are the wrapper's ``eos_token_ids`` (which mlx-lm stops on) plus the tokenizer's
        ``eos_token_id``; the latter is outlines-core's EOS. Cached per tokenizer object.
        """
        if isinstance(tokenizer, Vocabulary):
            return tokenizer
        hf = _hf_tokenizer(tokenizer)
        raw_eos = getattr(tokenizer, "eos_token_ids", None)
        if isinstance(raw_eos, int):
            eos_ids = {raw_eos}
        else:
            eos_ids = {int(i) for i in (raw_eos or ()) if i is not None}
        key_obj = hf
        try:
            with cls._cache_lock:
                cached = cls._cache.get(key_obj)
            if cached is not None and set(cached.eos_token_ids) >= eos_ids:
                return cached
        except TypeError:  # not weak-referenceable
            cached = None
        vocab = cls._build(hf, eos_ids)
        try:
            with cls._cache_lock:
                cls._cache[key_obj] = vocab
        except TypeError:  # pragma: no cover
            pass
        return vocab

    @classmethod
    def _build(cls, hf: Any, extra_eos: set[int]) -> Vocabulary:
        vocab: dict[str, int] = hf.get_vocab()
        added = dict(getattr(hf, "added_tokens_decoder", {}) or {})
        special_ids = set(getattr(hf, "all_special_ids", []) or [])
        for tid, tok in added.items():
            if getattr(tok, "special", False):
                special_ids.add(int(tid))
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
        return cls(
            token_bytes,
            eos_ids,
            eos_token_id=eos_token_id,
            excluded_ids=special_ids,
            kind=kind,
        )

    # -- helpers --------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        tb, n = self.token_bytes, self.size
        return b"".join(tb[i] if 0 <= i < n else b"" for i in ids)

    def __repr__(self) -> str:
        return (
            f"Vocabulary(size={self.size}, kind={self.kind!r}, eos={self.eos_token_ids}, "
            f"fingerprint={self.fingerprint})"
        )


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


def outlines_core_version() -> str:
    try:
        from importlib.metadata import version

        return version("outlines_core")
    except Exception:  # pragma: no cover
        return getattr(outlines_core, "__version__", "unknown")


# =============================================================================================
# Index compilation + cache
# =============================================================================================

# Indexes over a 248k-token vocabulary can take hundreds of MB each: keep few in memory.
_MEMORY_CACHE_SIZE = int(os.environ.get("FLASHMOE_INDEX_MEMORY_CACHE", "16"))
_memory_cache: OrderedDict[str, Index] = OrderedDict()
_memory_lock = threading.Lock()
_key_locks: dict[str, threading.Lock] = {}
_stats = {"memory_hits": 0, "disk_hits": 0, "compiles": 0, "compile_s": 0.0, "disk_load_s": 0.0}
_DISK_MAGIC = b"FLASHMOE-OCIDX1\n"


def index_cache_dir() -> Path:
    """Where compiled indexes are kept: ``$FLASHMOE_CACHE_DIR/index`` if that variable is set,
    else ``~/.cache/flashmoe/index``."""
    root = os.environ.get("FLASHMOE_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "flashmoe"
    return base / "index"


def index_cache_stats() -> dict[str, float]:
    """Counters: memory hits, disk hits, compiles and the seconds spent compiling / loading."""
    return dict(_stats)


def clear_index_cache(memory: bool = True, disk: bool = False) -> None:
    """Forget compiled indexes (in this process and/or on disk)."""
    if memory:
        with _memory_lock:
            _memory_cache.clear()
    if disk:
        d = index_cache_dir()
        if d.is_dir():
            for f in d.glob("*.idx"):
                try:
                    f.unlink()
                except OSError:
                    pass


def _index_key(regex: str, vocab: Vocabulary) -> str:
    h = hashlib.sha256()
    h.update(vocab.fingerprint.encode() + b"\0" + regex.encode("utf-8"))
    return h.hexdigest()[:40]


def compile_index(
    regex: str,
    tokenizer: Any,
    *,
    memory_cache: bool = True,
    disk_cache: bool | None = None,
) -> Index:
    """Compile ``regex`` against the tokenizer's :class:`Vocabulary` into an ``outlines_core.Index``.

    What is compiled is :func:`wrap_regex(regex) <wrap_regex>` (the regex followed by the
    end-of-structure sentinel), to be used with :class:`ConstrainedLogitsProcessor`.
    Cached in memory (LRU, keyed by the regex and the vocabulary's fingerprint) and on disk under
    :func:`index_cache_dir` (the Index's own binary serialisation, written atomically).
    ``disk_cache=None`` means on unless ``FLASHMOE_INDEX_DISK_CACHE=0``. An invalid regex, or one
    no token sequence can complete, raises :class:`ValueError`.
    """
    vocab = Vocabulary.from_tokenizer(tokenizer)
    regex = wrap_regex(regex)
    key = _index_key(regex, vocab)
    if disk_cache is None:
        disk_cache = os.environ.get("FLASHMOE_INDEX_DISK_CACHE", "1") not in ("0", "false", "no")
    if memory_cache:
        with _memory_lock:
            idx = _memory_cache.get(key)
            if idx is not None:
                _memory_cache.move_to_end(key)
                _stats["memory_hits"] += 1
                return idx
            lock = _key_locks.setdefault(key, threading.Lock())
    else:
        lock = threading.Lock()
    with lock:  # one compile per key at a time
        if memory_cache:
            with _memory_lock:
                idx = _memory_cache.get(key)
            if idx is not None:
                _stats["memory_hits"] += 1
                return idx
        idx = _load_from_disk(key) if disk_cache else None
        if idx is None:
            t0 = time.perf_counter()
            try:
                idx = Index(regex, vocab.core)
            except BaseException as exc:  # pyo3 panics are BaseException
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                raise ValueError(
                    f"cannot compile the constraint regex against the vocabulary: {exc}"
                ) from None
            _stats["compiles"] += 1
            _stats["compile_s"] += time.perf_counter() - t0
            if disk_cache:
                _save_to_disk(key, idx)
        if memory_cache:
            with _memory_lock:
                _memory_cache[key] = idx
                _memory_cache.move_to_end(key)
                while len(_memory_cache) > _MEMORY_CACHE_SIZE:
                    old, _ = _memory_cache.popitem(last=False)
                    _key_locks.pop(old, None)
        return idx


def wrap_regex(regex: str) -> str:
    """The regex actually compiled: ``(?:REGEX)`` + the end-of-structure sentinel (top-level
    ``^``/``$`` anchors are dropped: matches are always anchored at both ends)."""
    if regex.endswith(_SENTINEL):
        return regex
    if regex.startswith("^"):
        regex = regex[1:]
    if regex.endswith("$") and not regex.endswith("\\$"):
        regex = regex[:-1]
    return f"(?:{regex}){_SENTINEL}"


def _index_binary(idx: Index) -> bytes:
    fn, args = idx.__reduce__()[:2]
    if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], bytes)):
        raise TypeError("unexpected outlines_core.Index serialisation")  # pragma: no cover
    return args[0]


def _load_from_disk(key: str) -> Index | None:
    path = index_cache_dir() / f"{key}.idx"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    t0 = time.perf_counter()
    if not data.startswith(_DISK_MAGIC):
        return None
    body = data[len(_DISK_MAGIC) :]
    digest, body = body[:32], body[32:]
    if hashlib.sha256(body).digest() != digest:
        return None
    try:
        idx = Index.from_binary(body)
    except BaseException as exc:  # corrupt / other version
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return None
    _stats["disk_hits"] += 1
    _stats["disk_load_s"] += time.perf_counter() - t0
    return idx


def _save_to_disk(key: str, idx: Index) -> None:
    d = index_cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        body = _index_binary(idx)
        tmp = d / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(_DISK_MAGIC + hashlib.sha256(body).digest() + body)
        os.replace(tmp, d / f"{key}.idx")
    except OSError as exc:  # a read-only home must not break generation
        warnings.warn(f"flashmoe: cannot write the index cache in {d}: {exc}", stacklevel=3)


# =============================================================================================
# Regex helpers: escaping, integer and number ranges
# =============================================================================================

_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def regex_escape(text: str) -> str:
    """Escape ``text`` for outlines-core's (Rust) regex syntax; also valid for Python's ``re``."""
    out = []
    for c in text:
        if c in _REGEX_META:
            out.append("\\" + c)
        elif c == "\n":
            out.append(r"\n")
        elif c == "\t":
            out.append(r"\t")
        elif c == "\r":
            out.append(r"\r")
        else:
            out.append(c)
    return "".join(out)


def _grp(r: str) -> str:
    return f"({r})" if "|" in r else r


def _digit_class(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"[{lo}-{hi}]"


def _same_length_range(a: str, b: str) -> str:
    """Regex for the decimal strings of the same length as ``a`` and ``b`` with a <= s <= b."""
    if a == b:
        return a
    if a[0] == b[0]:
        return a[0] + _grp(_same_length_range(a[1:], b[1:]))
    n = len(a) - 1
    lo, hi = int(a[0]), int(b[0])
    if n == 0:
        return _digit_class(lo, hi)
    alts = []
    if a[1:] == "0" * n:
        full_lo = lo
    else:
        alts.append(a[0] + _grp(_same_length_range(a[1:], "9" * n)))
        full_lo = lo + 1
    tail = None
    if b[1:] == "9" * n:
        full_hi = hi
    else:
        full_hi = hi - 1
        tail = b[0] + _grp(_same_length_range("0" * n, b[1:]))
    if full_lo <= full_hi:
        rest = "[0-9]" if n == 1 else f"[0-9]{{{n}}}"
        alts.append(_digit_class(full_lo, full_hi) + rest)
    if tail:
        alts.append(tail)
    return "|".join(alts)


def _nonneg_int_range(lo: int, hi: int | None) -> str | None:
    """Regex for canonical decimal integers n with lo <= n <= hi (``hi=None``: no bound), lo >= 0."""
    if hi is not None and lo > hi:
        return None
    # Longest numbers first: outlines-core compiles regexes with leftmost-first semantics, so
    # at the end of a regex an alternative whose match is a prefix of a later one's hides it
    # ("[0-9]|[1-9][0-9]" would never produce "12").
    alts = []
    dlo = len(str(lo))
    if hi is None:
        alts.append(f"[1-9][0-9]{{{dlo},}}")
        alts.append(_same_length_range(str(lo), "9" * dlo))
    else:
        for d in range(len(str(hi)), dlo - 1, -1):
            a = max(lo, 10 ** (d - 1) if d > 1 else 0)
            b = min(hi, 10**d - 1)
            alts.append(_same_length_range(str(a), str(b)))
    return "|".join(alts)


def integer_range_regex(lo: int | None, hi: int | None) -> str:
    """Regex for the JSON integers n with lo <= n <= hi (``None``: unbounded on that side)."""
    parts = []
    if lo is None or lo < 0:
        m_lo = -hi if hi is not None and hi < 0 else 1
        m_hi = None if lo is None else -lo
        r = _nonneg_int_range(m_lo, m_hi)
        if r:
            parts.append("-" + _grp(r))
    if hi is None or hi >= 0:
        r = _nonneg_int_range(max(lo, 0) if lo is not None else 0, hi)
        if r:
            parts.append(r)
    if not parts:
        raise ValueError(f"empty integer range [{lo}, {hi}]")
    return "|".join(parts)


def _split_decimal(x: Decimal) -> tuple[int, str]:
    """(integer part, fraction digits without trailing zeros) of a non-negative decimal."""
    s = format(x, "f")
    if "." in s:
        i, f = s.split(".")
        return int(i), f.rstrip("0")
    return int(s), ""


def _frac_range(
    lo: str, lo_incl: bool, hi: str | None, hi_incl: bool
) -> tuple[str | None, bool]:
    """Digit strings s (the fraction 0.s) with 0.lo <=/< 0.s <=/< 0.hi (``hi=None``: below 1).

    Returns (regex for the non-empty such strings or None, whether the empty string -- the value
    0, i.e. no fraction at all -- is in range)."""
    if hi == "":
        if hi_incl and lo == "" and lo_incl:
            return "0+", True
        return None, False
    if lo == "" and lo_incl and hi is None:
        return "[0-9]+", True
    if lo == "" and not lo_incl and hi is None:
        return "0*[1-9][0-9]*", False
    empty_ok = lo == "" and lo_incl  # hi is non-empty here, so 0 < 0.hi
    l0, lrest = (int(lo[0]), lo[1:]) if lo else (0, "")
    h0, hrest = (int(hi[0]), hi[1:]) if hi else (9, "")
    alts = []
    free_lo = free_hi = None
    for d in range(l0, h0 + 1):
        lower_tight = d == l0 and not (lo == "" and lo_incl)
        upper_tight = hi is not None and d == h0
        if not lower_tight and not upper_tight:
            free_lo = d if free_lo is None else free_lo
            free_hi = d
            continue
        sub = _frac_range(
            lrest if lower_tight else "",
            lo_incl if lower_tight else True,
            hrest if upper_tight else None,
            hi_incl if upper_tight else False,
        )
        ne, e = sub
        if ne is None and not e:
            continue
        if ne is None:
            alts.append(str(d))
        else:
            alts.append(str(d) + f"({ne})" + ("?" if e else ""))
    if free_lo is not None:
        alts.append(_digit_class(free_lo, free_hi) + "[0-9]*")
    return ("|".join(alts) if alts else None), empty_ok


def _nonneg_number_range(
    lo: Decimal, lo_incl: bool, hi: Decimal | None, hi_incl: bool
) -> str | None:
    ia, fa = _split_decimal(lo)
    alts = []

    def add(int_re: str, frac: tuple[str | None, bool]) -> None:
        ne, empty_ok = frac
        if ne is None and not empty_ok:
            return
        if ne is None:
            alts.append(int_re)
        else:
            alts.append(int_re + rf"(\.({ne}))" + ("?" if empty_ok else ""))

    if hi is not None:
        ib, fb = _split_decimal(hi)
        if hi < lo or (hi == lo and not (lo_incl and hi_incl)):
            return None
        if ia == ib:
            add(str(ia), _frac_range(fa, lo_incl, fb, hi_incl))
            return "|".join(alts) or None
    # Longer integer parts first (see _nonneg_int_range).
    if hi is not None:
        add(str(ib), _frac_range("", True, fb, hi_incl))
    mid = _nonneg_int_range(ia + 1, (ib - 1) if hi is not None else None)
    if mid:
        add(_grp(mid), ("[0-9]+", True))
    add(str(ia), _frac_range(fa, lo_incl, None, False))
    return "|".join(alts) or None


def number_range_regex(
    lo: float | Decimal | None,
    hi: float | Decimal | None,
    *,
    lo_inclusive: bool = True,
    hi_inclusive: bool = True,
) -> str:
    """Regex for JSON numbers (no exponent) x with lo <=/< x <=/< hi (``None``: unbounded)."""
    dlo = None if lo is None else _to_decimal(lo)
    dhi = None if hi is None else _to_decimal(hi)
    parts = []
    zero = Decimal(0)
    if dlo is None or dlo < 0:
        if dhi is not None and dhi < 0:
            y_lo, y_lo_incl = -dhi, hi_inclusive
        else:
            y_lo, y_lo_incl = zero, False
        y_hi, y_hi_incl = (None, False) if dlo is None else (-dlo, lo_inclusive)
        r = _nonneg_number_range(y_lo, y_lo_incl, y_hi, y_hi_incl)
        if r:
            parts.append("-" + _grp(r))
    if dhi is None or dhi >= 0:
        x_lo, x_lo_incl = (dlo, lo_inclusive) if dlo is not None and dlo >= 0 else (zero, True)
        r = _nonneg_number_range(x_lo, x_lo_incl, dhi, hi_inclusive)
        if r:
            parts.append(r)
    if not parts:
        raise ValueError(f"empty number range ({lo}, {hi})")
    return "|".join(parts)


def _to_decimal(x: Any) -> Decimal:
    if isinstance(x, bool) or not isinstance(x, (int, float, Decimal)):
        raise ValueError(f"bound {x!r} is not a number")
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"bound {x!r} is not finite")
    try:
        return Decimal(repr(x)) if isinstance(x, float) else Decimal(x)
    except InvalidOperation:  # pragma: no cover
        raise ValueError(f"bound {x!r} is not a number") from None


# =============================================================================================
# JSON schema -> regex
# =============================================================================================

# JSON-safe (no '"', '\\' or control characters) regexes for string formats that outlines-core
# lacks or renders unsafely (its email/uri regexes can emit raw quotes inside the JSON string).
_IPV4_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_HOST_LABEL = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?"
FORMAT_REGEXES: dict[str, str] = {
    "email": r"[a-zA-Z0-9][a-zA-Z0-9._%+-]{0,39}@" + _HOST_LABEL + r"(\." + _HOST_LABEL
    + r"){0,3}\.[a-zA-Z]{2,10}",
    "uri": r"(https?|ftp)://" + _HOST_LABEL + r"(\." + _HOST_LABEL + r"){0,4}(:[1-9][0-9]{0,4})?"
    r"(/[a-zA-Z0-9._~%!$&'()*+,;=:@-]{0,40}){0,6}(\?[a-zA-Z0-9._~%!$&'()*+,;=:@/?-]{0,60})?",
    "ipv4": rf"{_IPV4_OCTET}(\.{_IPV4_OCTET}){{3}}",
    "hostname": _HOST_LABEL + r"(\." + _HOST_LABEL + r"){0,4}",
}
_YEAR = r"[1-9][0-9]{3}"
_LEAP_YEAR = r"([1-9][0-9](0[48]|[2468][048]|[13579][26])|([2468][048]|[13579][26])00)"
# Calendar-valid dates only (outlines-core's regex allows 2023-02-31, which validators reject).
FORMAT_REGEXES["date"] = (
    rf"({_YEAR}-(0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])"
    rf"|{_YEAR}-(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    rf"|{_YEAR}-02-(0[1-9]|1[0-9]|2[0-8])"
    rf"|{_LEAP_YEAR}-02-29)"
)
# RFC 3339 full-time: the UTC offset is required.
FORMAT_REGEXES["time"] = (
    r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
)
FORMAT_REGEXES["date-time"] = FORMAT_REGEXES["date"] + "T" + FORMAT_REGEXES["time"]
FORMAT_REGEXES["url"] = FORMAT_REGEXES["uri"]
_OUTLINES_FORMATS = {"uuid"}
_PLACEHOLDER = "FLASHMOEPLACEHOLDER{}Q"
_SCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_DICT_KEYS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_SINGLE_KEYS = ("items", "additionalProperties", "not", "contains", "additionalItems")
_NUMERIC_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _check_schema_meta(schema: dict) -> None:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover
        return
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ValueError(f"malformed JSON schema at {where}: {exc.message}") from None


class _SchemaRewriter:
    """Checks a schema for problems outlines-core would silently get wrong, and replaces the
    sub-schemas we render ourselves (numeric ranges, formats) by placeholders."""

    def __init__(self, root: dict) -> None:
        self.subst: dict[str, str] = {}
        self.root = root

    def check_ref(self, ref: Any, path: str) -> None:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ValueError(
                f"unsupported JSON schema at {path}: only local $refs ('#/...') are supported, "
                f"got {ref!r}"
            )
        node: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"malformed JSON schema at {path}: unresolvable $ref {ref!r}")
            node = node[part]

    def placeholder(self, regex: str) -> dict:
        name = _PLACEHOLDER.format(len(self.subst))
        self.subst[name] = regex
        return {"const": name}

    def rewrite(self, node: Any, path: str) -> Any:
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            raise ValueError(f"malformed JSON schema at {path}: expected an object, got {node!r}")
        node = dict(node)
        for k in _SCHEMA_LIST_KEYS:
            if k in node:
                if not isinstance(node[k], list) or (k != "prefixItems" and not node[k]):
                    raise ValueError(f"malformed JSON schema at {path}/{k}: expected a list")
                node[k] = [self.rewrite(s, f"{path}/{k}/{i}") for i, s in enumerate(node[k])]
        for k in _SCHEMA_DICT_KEYS:
            if k in node:
                if not isinstance(node[k], dict):
                    raise ValueError(f"malformed JSON schema at {path}/{k}: expected an object")
                node[k] = {n: self.rewrite(s, f"{path}/{k}/{n}") for n, s in node[k].items()}
        for k in _SCHEMA_SINGLE_KEYS:
            if k in node and not isinstance(node[k], list):
                node[k] = self.rewrite(node[k], f"{path}/{k}")
        self._check(node, path)
        if "$ref" in node:
            self.check_ref(node["$ref"], path)
        if "enum" in node or "const" in node or "$ref" in node:
            return node
        types = node.get("type")
        if isinstance(types, list):
            if len(types) > 1 and (
                any(k in node for k in _NUMERIC_KEYS)
                or ("string" in types and node.get("format") in FORMAT_REGEXES)
            ):
                rest = {k: v for k, v in node.items() if k != "type"}
                return {"anyOf": [self.rewrite({**rest, "type": t}, path) for t in types]}
            if len(types) == 1:
                types = types[0]
        if types == "integer" and any(k in node for k in _NUMERIC_KEYS):
            lo, lo_incl, hi, hi_incl = _bounds(node, path)
            lo_i = None if lo is None else _ceil_int(lo, lo_incl)
            hi_i = None if hi is None else _floor_int(hi, hi_incl)
            if lo_i is not None and hi_i is not None and lo_i > hi_i:
                raise ValueError(f"malformed JSON schema at {path}: no integer within the bounds")
            return self.placeholder(integer_range_regex(lo_i, hi_i))
        if types == "number" and any(k in node for k in _NUMERIC_KEYS):
            lo, lo_incl, hi, hi_incl = _bounds(node, path)
            try:
                r = number_range_regex(lo, hi, lo_inclusive=lo_incl, hi_inclusive=hi_incl)
            except ValueError as exc:
                raise ValueError(f"malformed JSON schema at {path}: {exc}") from None
            return self.placeholder(r)
        if types == "string" and "format" in node and "pattern" not in node:
            fmt = node["format"]
            if fmt in FORMAT_REGEXES:
                return self.placeholder('"' + FORMAT_REGEXES[fmt] + '"')
            if fmt not in _OUTLINES_FORMATS:
                warnings.warn(
                    f"flashmoe: string format {fmt!r} at {path} is not enforced by constrained "
                    "decoding (any string is allowed)",
                    stacklevel=4,
                )
                node.pop("format")
        return node

    @staticmethod
    def _check(node: dict, path: str) -> None:
        props = node.get("properties")
        req = node.get("required")
        if req is not None:
            if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
                raise ValueError(f"malformed JSON schema at {path}/required: expected names")
            missing = [r for r in req if not isinstance(props, dict) or r not in props]
            if missing:
                raise ValueError(
                    f"malformed JSON schema at {path}: required propert"
                    f"{'y' if len(missing) == 1 else 'ies'} {missing} not defined in 'properties'"
                )
        for a, b in (("minItems", "maxItems"), ("minLength", "maxLength"),
                     ("minProperties", "maxProperties")):
            if a in node and b in node and node[a] > node[b]:
                raise ValueError(
                    f"malformed JSON schema at {path}: {a}={node[a]} > {b}={node[b]}"
                )
        if "pattern" in node:
            try:
                re.compile(node["pattern"])
            except re.error as exc:
                raise ValueError(
                    f"malformed JSON schema at {path}/pattern: invalid regex: {exc}"
                ) from None


def _bounds(node: dict, path: str) -> tuple[Any, bool, Any, bool]:
    lo, lo_incl, hi, hi_incl = node.get("minimum"), True, node.get("maximum"), True
    emin, emax = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if isinstance(emin, bool):  # draft 4
        lo_incl = not emin
    elif emin is not None and (lo is None or _to_decimal(emin) >= _to_decimal(lo)):
        lo, lo_incl = emin, False
    if isinstance(emax, bool):
        hi_incl = not emax
    elif emax is not None and (hi is None or _to_decimal(emax) <= _to_decimal(hi)):
        hi, hi_incl = emax, False
    try:
        dlo = None if lo is None else _to_decimal(lo)
        dhi = None if hi is None else _to_decimal(hi)
    except ValueError as exc:
        raise ValueError(f"malformed JSON schema at {path}: {exc}") from None
    if dlo is not None and dhi is not None and (dlo > dhi or (dlo == dhi and not (lo_incl and hi_incl))):
        raise ValueError(f"malformed JSON schema at {path}: minimum {lo} > maximum {hi}")
    return dlo, lo_incl, dhi, hi_incl


def _ceil_int(x: Decimal, incl: bool) -> int:
    i = int(x.to_integral_value(rounding="ROUND_CEILING"))
    return i + 1 if (not incl and i == x) else i


def _floor_int(x: Decimal, incl: bool) -> int:
    i = int(x.to_integral_value(rounding="ROUND_FLOOR"))
    return i - 1 if (not incl and i == x) else i


def _load_schema(schema: Any) -> dict:
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
    if isinstance(schema, bool):
        raise ValueError("a boolean JSON schema does not describe a structure to generate")
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object (dict), got {type(schema).__name__}")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the JSON schema is not JSON-serialisable: {exc}") from None
    return schema


def schema_to_regex(
    schema: dict | str, whitespace_pattern: str | None = DEFAULT_WHITESPACE
) -> str:
    """Regex for the JSON documents valid under ``schema`` (as far as a regex can say).

    Raises :class:`ValueError` naming the problem for malformed or unsupported schemas.
    Supported beyond outlines-core: integer/number ``minimum``/``maximum``/``exclusive*``,
    formats ``email``, ``uri``, ``ipv4``, ``hostname``; ignored (warned): other unknown formats.
    Not enforced: ``multipleOf``, ``uniqueItems``, ``not``, ``if``/``then``; ``oneOf`` is treated
    as ``anyOf``.
    """
    schema = _load_schema(schema)
    _check_schema_meta(schema)
    rw = _SchemaRewriter(schema)
    rewritten = rw.rewrite(copy.deepcopy(schema), "#")
    try:
        regex = build_regex_from_schema(json.dumps(rewritten), whitespace_pattern)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        msg = str(exc).split("\n")[0]
        raise ValueError(f"unsupported or malformed JSON schema: {msg}") from None
    for name, sub in rw.subst.items():
        regex = regex.replace(f'"{name}"', f"({sub})")
        if name in regex:  # pragma: no cover - defensive
            raise ValueError("internal error while rendering the JSON schema")
    return regex


# =============================================================================================
# response_format normalisation
# =============================================================================================


@dataclass
class _Spec:
    kind: str  # "json" | "regex" | "choice" | "type"
    regex: str
    schema: dict | None = None
    parser: Callable[[str], Any] | None = None
    description: str = ""


def _is_pydantic_model(obj: Any) -> bool:
    try:
        from pydantic import BaseModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _cfg_error() -> NotImplementedError:
    return NotImplementedError(
        "context-free grammars are not supported by flashmoe's constrained decoding: outlines "
        "1.3 compiles them only with llguidance/xgrammar, whose mask kernels are Metal-only or "
        "not installed here. Express the output as a JSON schema (Pydantic model or dict) or a "
        "regular expression (outlines.types.Regex / {'type': 'regex', 'pattern': ...}) instead."
    )


def _json_parser(schema: dict, model: Any = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if model is not None:
            try:
                return model.model_validate_json(text)
            except ValueError as exc:
                raise StructuredOutputError(f"output does not validate: {exc}") from exc
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StructuredOutputError(f"output is not valid JSON: {exc}") from None
        try:
            import jsonschema
        except ImportError:  # pragma: no cover
            return value
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            raise StructuredOutputError(f"output does not validate: {exc.message}") from None
        return value

    return parse


def _choice_spec(values: Sequence[Any], mapping: dict[str, Any] | None = None) -> _Spec:
    if not values:
        raise ValueError("a choice needs at least one option")
    strs = []
    for v in values:
        if isinstance(v, enum.Enum):
            v = v.value
        if isinstance(v, bool) or v is None or not isinstance(v, (str, int, float)):
            raise ValueError(f"choice options must be strings or numbers, got {v!r}")
        strs.append(str(v))
    mapping = mapping or {}

    def parse(text: str) -> Any:
        if text not in strs:
            raise StructuredOutputError(f"output {text!r} is not one of the choices {strs}")
        return mapping.get(text, text)

    # Longest first: with outlines-core's leftmost-first semantics "(ab|abc)" never gives "abc".
    ordered = sorted(dict.fromkeys(strs), key=len, reverse=True)
    return _Spec("choice", "(" + "|".join(regex_escape(s) for s in ordered) + ")", parser=parse,
                 description=f"one of {strs}")


def _normalize(response_format: Any, whitespace_pattern: str | None) -> _Spec:
    """Turn any supported response format into a regex plus a parser."""
    rf = response_format
    if rf is None:
        raise ValueError("no response format given")
    if _is_pydantic_model(rf):
        schema = rf.model_json_schema()
        return _Spec("json", schema_to_regex(schema, whitespace_pattern), schema,
                     _json_parser(schema, rf), rf.__name__)
    if isinstance(rf, dict):
        t = rf.get("type")
        if t == "regex" and "pattern" in rf:
            return _regex_spec(rf["pattern"])
        if t == "json_schema" and isinstance(rf.get("json_schema"), dict):  # OpenAI style
            inner = rf["json_schema"]
            schema = inner.get("schema")
            if schema is None:
                raise ValueError("response_format json_schema has no 'schema'")
            return _json_spec(schema, whitespace_pattern)
        if t == "json_object" and len(rf) == 1:
            return _json_spec({"type": "object"}, whitespace_pattern)
        if t in ("grammar", "cfg", "lark", "ebnf"):
            raise _cfg_error()
        if t == "choice" and isinstance(rf.get("choices"), (list, tuple)):
            return _choice_spec(list(rf["choices"]))
        return _json_spec(rf, whitespace_pattern)
    if isinstance(rf, (list, tuple)):
        return _choice_spec(list(rf))
    if isinstance(rf, enum.EnumMeta):
        members = list(rf)
        return _choice_spec([m.value for m in members], {str(m.value): m for m in members})
    try:
        from outlines.types import dsl
    except ImportError:  # pragma: no cover
        dsl = None
    if dsl is not None:
        if isinstance(rf, dsl.Regex):
            return _regex_spec(rf.pattern)
        if isinstance(rf, dsl.CFG):
            raise _cfg_error()
        if isinstance(rf, dsl.JsonSchema):
            ws = rf.whitespace_pattern if rf.whitespace_pattern is not None else whitespace_pattern
            return _json_spec(json.loads(rf.schema), ws)
        if isinstance(rf, dsl.Choice):
            return _choice_spec(list(rf.items))
    import typing

    if typing.get_origin(rf) is typing.Literal:
        args = typing.get_args(rf)
        return _choice_spec(list(args), {str(a): a for a in args})
    if isinstance(rf, str):
        raise ValueError(
            "a plain string is ambiguous as a response format: pass a JSON schema dict, "
            "{'type': 'regex', 'pattern': ...} or outlines.types.Regex(...)"
        )
    if dsl is not None:
        try:
            term = dsl.python_types_to_terms(rf)
        except (TypeError, RecursionError) as exc:
            raise ValueError(f"unsupported response format {rf!r}: {exc}") from None
        if isinstance(term, dsl.CFG):
            raise _cfg_error()
        if isinstance(term, dsl.JsonSchema):
            schema = json.loads(term.schema)
            spec = _json_spec(schema, whitespace_pattern)
            try:
                from pydantic import TypeAdapter

                adapter = TypeAdapter(rf)

                def parse(text: str) -> Any:
                    try:
                        return adapter.validate_json(text)
                    except ValueError as exc:
                        raise StructuredOutputError(f"output does not validate: {exc}") from exc

                spec.parser = parse
            except Exception:  # pragma: no cover
                pass
            return spec
        regex = dsl.to_regex(term)
        return _Spec("type", regex, parser=_python_type_parser(rf), description=repr(rf))
    raise ValueError(f"unsupported response format {rf!r}")  # pragma: no cover


def _regex_spec(pattern: Any) -> _Spec:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a regex response format needs a non-empty pattern string")
    return _Spec("regex", pattern, description=f"regex {pattern!r}")


def _json_spec(schema: Any, whitespace_pattern: str | None) -> _Spec:
    schema = _load_schema(schema)
    return _Spec("json", schema_to_regex(schema, whitespace_pattern), schema,
                 _json_parser(schema), schema.get("title", "JSON"))


def _python_type_parser(ptype: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if ptype is bool:
            return text == "True"
        if ptype in (int, float):
            return ptype(text)
        return text

    return parse


def response_format_to_regex(
    response_format: Any, whitespace_pattern: str | None = DEFAULT_WHITESPACE
) -> str:
    """The regex a response format stands for (see :meth:`Constraint.from_response_format`)."""
    return _normalize(response_format, whitespace_pattern).regex


# =============================================================================================
# Constraint and its logits processor
# =============================================================================================


class Constraint:
    """A compiled output constraint: the regex, its index, a processor factory and a parser.

    Build with :meth:`from_response_format` (or :meth:`from_regex`); both compile the index
    eagerly, so every problem with the format surfaces before generation starts.
    """

    def __init__(
        self,
        regex: str,
        tokenizer: Any,
        *,
        kind: str = "regex",
        schema: dict | None = None,
        parser: Callable[[str], Any] | None = None,
        description: str = "",
        index: Index | None = None,
    ):
        self.regex = regex
        self.kind = kind
        self.schema = schema
        self.description = description or kind
        self.vocabulary = Vocabulary.from_tokenizer(tokenizer)
        self.index = index if index is not None else compile_index(regex, self.vocabulary)
        self._parser = parser

    @classmethod
    def from_response_format(
        cls,
        response_format: Any,
        tokenizer: Any,
        *,
        whitespace_pattern: str | None = DEFAULT_WHITESPACE,
    ) -> Constraint:
        """Accepts a Pydantic model class, a JSON-schema dict (or JSON string of one), an OpenAI
        ``{"type": "json_schema", "json_schema": {"schema": ...}}`` or ``{"type": "json_object"}``,
        ``{"type": "regex", "pattern": ...}`` or ``outlines.types.Regex``, a list/tuple of string
        choices, ``Literal[...]``, an ``Enum`` class, and other Python types outlines knows
        (``int``, ``list[int]``, dataclasses, TypedDicts). Context-free grammars raise
        :class:`NotImplementedError`; malformed schemas :class:`ValueError`."""
        if isinstance(response_format, Constraint):
            return response_format
        spec = _normalize(response_format, whitespace_pattern)
        return cls(spec.regex, tokenizer, kind=spec.kind, schema=spec.schema,
                   parser=spec.parser, description=spec.description)

    @classmethod
    def from_regex(cls, regex: str, tokenizer: Any) -> Constraint:
        return cls(regex, tokenizer, kind="regex")

    def logits_processor(self) -> ConstrainedLogitsProcessor:
        """A fresh, stateful mlx-lm logits processor for one generation."""
        return ConstrainedLogitsProcessor(self.index, self.vocabulary)

    # -- checking and parsing -------------------------------------------------------------------

    def status(self, text: str) -> str:
        """``"complete"``, ``"incomplete"`` (a proper prefix of a match) or ``"invalid"``."""
        proc = self.logits_processor()
        if not proc.advance_text(text):
            return "invalid"
        return "complete" if proc.is_complete else "incomplete"

    def parse(self, text: str) -> Any:
        """The generated text as the requested type.

        JSON formats give the Pydantic instance (for a model class) or the decoded value
        (validated with ``jsonschema``); regexes give the string; choices the chosen option.
        Raises :class:`IncompleteOutputError` when the text stops mid-structure and
        :class:`StructuredOutputError` when it does not match.
        """
        st = self.status(text)
        if st == "incomplete":
            raise IncompleteOutputError(
                f"output stops before the end of the {self.description} structure "
                f"(max_tokens reached?): {_clip(text)}"
            )
        if st == "invalid":
            raise StructuredOutputError(
                f"output does not match the {self.description} constraint: {_clip(text)}"
            )
        if self._parser is not None:
            return self._parser(text)
        return text

    def __repr__(self) -> str:
        return f"Constraint({self.description!r}, regex={_clip(self.regex, 80)!r})"


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class ConstrainedLogitsProcessor:
    """mlx-lm logits processor that walks an outlines-core ``Guide`` and masks the logits.

    Called as ``processor(tokens, logits)`` with ``tokens`` all ids so far (the first call sees
    only the prompt, which is skipped) and ``logits`` of shape ``[1, V]``; ``V`` may exceed the
    tokenizer's vocabulary (the extra ids are masked). Each call advances the guide by the tokens
    added since the previous call, then sets every token the guide does not allow to ``-inf``.
    Once the structure is complete and cannot continue, only the EOS token(s) are allowed.

    The mask is applied portably (no Metal kernel): the guide writes its bitmask into a numpy
    buffer (in Rust), which is expanded to a boolean mask -- in numpy when MLX runs on the CPU,
    on the device with MLX ops from the 32x smaller bitmask otherwise -- and applied with
    ``mx.where`` (so NaN/inf logits of disallowed tokens cannot leak through).

    ``is_complete`` / :meth:`is_finished`: the text generated so far is a full match, so a
    generation that stopped at ``max_tokens`` without this is incomplete.
    """

    def __init__(
        self,
        index: Index,
        vocabulary: Vocabulary,
        *,
        sentinel: bool = True,
        max_rollback: int = 32,
    ):
        """``index`` from :func:`compile_index` (``sentinel=True``), or any outlines-core index
        over the same token ids (``sentinel=False``: completeness is the index's final state)."""
        self.index = index
        self.vocabulary = vocabulary
        self._sentinel = vocabulary.sentinel_id if sentinel else None
        # With the sentinel the final states are the few after it: cheap to list.
        self._finals = frozenset(index.get_final_states()) if sentinel else frozenset()
        self.guide = Guide(index, max_rollback)
        self._n_seen: int | None = None
        self._generated: list[int] = []
        self.eos_generated = False
        self._words: np.ndarray | None = None
        self._width = 0
        self._device_path: bool | None = None
        self._eos = vocabulary.eos_token_ids
        self._primary_eos = vocabulary.eos_token_id
        self._extra_eos = [i for i in self._eos if i != self._primary_eos]

    # -- state ----------------------------------------------------------------------------------

    @property
    def is_complete(self) -> bool:
        """True when the text generated so far is a complete match of the constraint."""
        if self.eos_generated:
            return True
        if self._sentinel is None:
            return bool(self.guide.is_finished())
        # The sentinel character is also valid *inside* JSON strings: complete means the
        # sentinel leads to a final state, i.e. it ends the whole regex.
        nxt = self.index.get_next_state(self.guide.get_state(), self._sentinel)
        return nxt is not None and nxt in self._finals

    def is_finished(self) -> bool:
        """Same as :attr:`is_complete` (outlines-core's name)."""
        return self.is_complete

    @property
    def generated_ids(self) -> list[int]:
        return list(self._generated)

    def reset(self) -> None:
        self.guide.reset()
        self._n_seen = None
        self._generated = []
        self.eos_generated = False

    def allowed_token_ids(self) -> list[int]:
        if self.eos_generated:
            return list(self._eos)
        ids = [i for i in self.guide.get_tokens() if i != self._sentinel and i not in self._eos]
        if self.is_complete:
            ids += self._eos
        return ids

    # -- advancing ------------------------------------------------------------------------------

    def advance(self, token_id: int) -> None:
        """Advance by one generated token (raises :class:`StructuredOutputError` if disallowed)."""
        token_id = int(token_id)
        if token_id in self._eos:
            if not self.is_complete:
                raise StructuredOutputError(
                    f"EOS token {token_id} generated before the structure was complete"
                )
            self.eos_generated = True
            self._generated.append(token_id)
            return
        if self.eos_generated:
            raise StructuredOutputError("token generated after EOS")
        try:
            self.guide.advance(token_id, return_tokens=False)
        except ValueError:
            raise StructuredOutputError(
                f"token {token_id} ({self.vocabulary.token_bytes[token_id]!r}) is not allowed "
                "by the constraint here: was the mask bypassed?"
                if 0 <= token_id < self.vocabulary.size
                else f"token {token_id} is outside the vocabulary"
            ) from None
        self._generated.append(token_id)

    def consume(self, token_ids: Iterable[int]) -> None:
        for t in token_ids:
            self.advance(t)

    def advance_text(self, text: str | bytes) -> bool:
        """Walk the guide over ``text`` (byte by byte through single-byte tokens; falls back to
        whole tokens from the grammar's vocabulary). Returns False if the text leaves the
        language (the guide is then left where the text diverged)."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        bt = self.vocabulary.byte_token_ids
        if all(b in bt for b in data):
            for b in data:
                try:
                    self.guide.advance(bt[b], return_tokens=False)
                except ValueError:
                    return False
            return True
        return self._advance_text_greedy(data)  # pragma: no cover - non byte-complete vocabs

    def _advance_text_greedy(self, data: bytes) -> bool:  # pragma: no cover
        # Longest allowed token that is a prefix of the remaining text, with backtracking
        # limited to one step: good enough for vocabularies without all 256 byte tokens.
        tb = self.vocabulary.token_bytes
        pos = 0
        while pos < len(data):
            best = None
            for tid in self.guide.get_tokens():
                b = tb[tid] if tid < len(tb) else b""
                if b and data.startswith(b, pos) and (best is None or len(b) > len(tb[best])):
                    best = tid
            if best is None:
                return False
            self.guide.advance(best, return_tokens=False)
            pos += len(tb[best])
        return True

    def _sync(self, tokens: mx.array) -> None:
        if tokens.ndim == 2:
            tokens = tokens.reshape(-1)
        n = int(tokens.shape[0])
        if self._n_seen is None:
            self._n_seen = n  # the prompt (or whatever came before the first decode step)
            return
        if n < self._n_seen:  # speculative decoding rejected tokens: roll back
            k = self._n_seen - n
            if k > len(self._generated) or k > self.guide.get_allowed_rollback():
                raise StructuredOutputError(f"cannot roll the constraint back by {k} tokens")
            if self.eos_generated:
                self.eos_generated = False
                self._generated.pop()
                k -= 1
            if k:
                self.guide.rollback_state(k)
                del self._generated[-k:]
            self._n_seen = n
            return
        if n > self._n_seen:
            new = _read_new_tokens(tokens, self._n_seen)
            self._n_seen = n
            self.consume(new)

    # -- masking --------------------------------------------------------------------------------

    def _fill_words(self, width: int) -> np.ndarray:
        nwords = (max(width, self.vocabulary.size + 1) + 31) // 32
        if self._words is None or self._words.shape[0] != nwords:
            self._words = np.zeros(nwords, dtype=np.int32)
        words = self._words
        if self.eos_generated:
            words[:] = 0
            complete = True
        else:
            self.guide.write_mask_into(words.ctypes.data, words.size, 4)
            s = self._sentinel
            if s is not None:
                complete = bool((words[s >> 5] >> (s & 31)) & 1) and self.is_complete
                self._clear_bit(words, s)
            else:
                p = self._primary_eos
                complete = bool((words[p >> 5] >> (p & 31)) & 1)
        if complete or not words.any():  # (an empty mask is a dead end: let the model stop)
            for e in self._eos:
                self._set_bit(words, e)
        return words

    @staticmethod
    def _set_bit(words: np.ndarray, tid: int) -> None:
        if 0 <= tid < words.size * 32:
            words[tid >> 5] |= np.uint32(1 << (tid & 31)).view(np.int32)

    @staticmethod
    def _clear_bit(words: np.ndarray, tid: int) -> None:
        if 0 <= tid < words.size * 32:
            words[tid >> 5] &= np.uint32(~(1 << (tid & 31)) & 0xFFFFFFFF).view(np.int32)

    def allowed_mask(self, width: int) -> mx.array:
        """Boolean ``[width]`` array of the tokens allowed in the current state."""
        words = self._fill_words(width)
        if self._device_path is None:
            self._device_path = mx.default_device() != mx.cpu
        if self._device_path:  # ship the 32x smaller bitmask, expand it on the device
            return _expand_bits(mx.array(words), width)
        bits = np.unpackbits(words.view(np.uint8), count=width, bitorder="little")
        return mx.array(bits.view(np.bool_))

    def bias(self, width: int, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The current mask as an additive bias: ``0`` allowed, ``-inf`` not (shape
        ``[width]``)."""
        zero = mx.array(0, dtype=dtype)
        return mx.where(self.allowed_mask(width), zero, mx.array(-math.inf, dtype=dtype))

    def mask_logits(self, logits: mx.array) -> mx.array:
        """``logits`` with every disallowed token set to ``-inf``.

        A select, not an addition, so NaN/+inf logits of disallowed tokens cannot survive; NaN
        logits of allowed tokens become the dtype's lowest finite value, so that a model emitting
        NaNs (seen with a tiny random model on mlx-cuda) still samples an allowed token instead
        of whatever index the sampler's argmax over NaNs lands on."""
        width = int(logits.shape[-1])
        neg = mx.array(-math.inf, dtype=logits.dtype)
        low = float(mx.finfo(logits.dtype).min)
        safe = mx.nan_to_num(logits, nan=low, posinf=None, neginf=low)
        return mx.where(self.allowed_mask(width), safe, neg)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self._sync(tokens)
        return self.mask_logits(logits)


def _read_new_tokens(tokens: mx.array, start: int) -> list[int]:
    """``tokens[start:]`` as Python ints. Waits for the stream first: the newest token comes from
    the previous step's ``async_eval``, and reading it must not race that work (costs nothing
    extra: reading the token has to wait for the same work anyway)."""
    mx.synchronize()
    return tokens[start:].tolist()


_BIT_INDEX: dict[int, tuple[mx.array, mx.array]] = {}


def _expand_bits(words: mx.array, width: int) -> mx.array:
    """int32 bitmask words -> bool[width] (bit i of word w is token 32*w + i), with MLX ops.

    Written as a gather + shift per token (no reshape/slice of a broadcast result, which
    produced wrong trailing bits on mlx-cuda 0.32.4 when ``width`` is not a multiple of 32)."""
    idx = _BIT_INDEX.get(width)
    if idx is None:
        ar = mx.arange(width, dtype=mx.int32)
        idx = _BIT_INDEX[width] = (ar >> 5, ar & 31)
        mx.eval(*idx)
    word_of, bit_of = idx
    return ((mx.take(words, word_of) >> bit_of) & 1).astype(mx.bool_)


# =============================================================================================
# outlines integration
# =============================================================================================


def _portable_mlxlm_class() -> type:
    from outlines.backends.outlines_core import OutlinesCoreLogitsProcessor
    from outlines.models.mlxlm import MLXLM
    from outlines.processors import OutlinesLogitsProcessor

    class PortableMLXLM(MLXLM):
        """``outlines.models.MLXLM`` whose structured generation masks logits portably.

        ``model(prompt, output_type, max_tokens=...)`` and ``model.stream(...)`` build the
        constraint with :class:`Constraint` (cached index, byte-level vocabulary, tight JSON
        whitespace) and return the generated text, like stock outlines. Logits processors made
        by stock outlines (``outlines.Generator(model, T)``, outlines-core backend) are accepted
        too: their index is reused and only the masking is replaced.
        """

        whitespace_pattern: str | None = DEFAULT_WHITESPACE

        def constraint(self, output_type: Any) -> Constraint:
            return Constraint.from_response_format(
                output_type, self.mlx_tokenizer, whitespace_pattern=self.whitespace_pattern
            )

        def _processor(self, output_type: Any) -> Any:
            if output_type is None or isinstance(output_type, ConstrainedLogitsProcessor):
                return output_type
            if isinstance(output_type, OutlinesCoreLogitsProcessor):
                return ConstrainedLogitsProcessor(
                    output_type.index, Vocabulary.from_tokenizer(self.mlx_tokenizer),
                    sentinel=False,
                )
            if isinstance(output_type, OutlinesLogitsProcessor):
                return output_type  # another backend's processor: stock behaviour
            return self.constraint(output_type).logits_processor()

        def __call__(self, model_input: Any, output_type: Any = None, backend: Any = None,
                     **inference_kwargs: Any) -> Any:
            if output_type is None:
                return self.generate(model_input, None, **inference_kwargs)
            _reject_backend(backend)
            return self.generate(model_input, self._processor(output_type), **inference_kwargs)

        def stream(self, model_input: Any, output_type: Any = None, backend: Any = None,
                   **inference_kwargs: Any) -> Any:
            if output_type is not None:
                _reject_backend(backend)
            return self.generate_stream(model_input, self._processor(output_type),
                                        **inference_kwargs)

        def generate(self, model_input: Any, output_type: Any = None, **kwargs: Any) -> str:
            return super().generate(model_input, self._processor(output_type), **kwargs)

        def generate_stream(self, model_input: Any, output_type: Any = None, **kwargs: Any):
            return super().generate_stream(model_input, self._processor(output_type), **kwargs)

    return PortableMLXLM


def _reject_backend(backend: Any) -> None:
    if backend not in (None, "outlines_core"):
        raise NotImplementedError(
            f"backend {backend!r} is not supported by flashmoe's portable outlines model "
            "(only outlines_core is; llguidance/xgrammar masks are Metal-only in outlines 1.3)"
        )


_PORTABLE_CLS: type | None = None


def from_mlxlm(model: Any, tokenizer: Any) -> Any:
    """An outlines model for an mlx-lm model and tokenizer whose structured generation works on
    every MLX backend: ``from_mlxlm(m, t)(prompt, MyPydanticModel, max_tokens=200)`` returns JSON
    text that ``MyPydanticModel.model_validate_json`` accepts. Drop-in for
    ``outlines.from_mlxlm`` (the object is an ``outlines.models.MLXLM``)."""
    global _PORTABLE_CLS
    if _PORTABLE_CLS is None:
        _PORTABLE_CLS = _portable_mlxlm_class()
    return _PORTABLE_CLS(model, tokenizer)
