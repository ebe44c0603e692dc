"""Token vocabulary for outlines-core and the compiled-index cache.

:class:`Vocabulary` maps every token to the bytes it stands for (GPT-2 byte map for byte-level
BPE, ``▁``/``<0xNN>`` for sentencepiece) and adds an end-of-structure sentinel token;
:func:`compile_index` compiles a regex against it into an ``outlines_core.Index``, the slow step,
cached in memory and on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import outlines_core
from outlines_core import Index
from outlines_core import Vocabulary as CoreVocabulary

__all__ = [
    "Vocabulary",
    "clear_index_cache",
    "compile_index",
    "index_cache_dir",
    "index_cache_stats",
    "outlines_core_version",
    "wrap_regex",
]

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
    end-of-structure sentinel), to be used with
    :class:`~flashmoe_backend.structured.ConstrainedLogitsProcessor`.
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
