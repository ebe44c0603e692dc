"""Prompt-prefix snapshots on disk, so that a restarted process does not prefill them again.

Agents and RAG chains resend one system prompt and tool list with every request; on a large MoE a
2k-token prefix costs a pass over most experts. ``PromptCacheDir`` keeps the model's cache after
such a prefix in mlx-lm's prompt-cache format (``save_prompt_cache`` / ``load_prompt_cache``: a
``.safetensors`` file), one file per prefix, named by a hash of the store's identity and the
prefix's token ids.

A file is only ever used when it is exactly what a prefill would compute here: its metadata must
name this store identity and these token ids, its cache classes must be the model's, and its
arrays must match the checksum written with them. Anything else (a truncated or corrupt file, one
of another store, version or prefix) is ignored with a ``PromptCacheWarning`` and the prefix is
prefilled as usual, which then replaces the file. Files are written to a temporary name and
renamed, so a reader never sees half a file, also with several processes sharing the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

from flashmoe_backend.errors import PromptCacheWarning

#: Bumped when what a file holds or how it is checked changes: older files are then misses.
FILE_FORMAT = "flashmoe-prompt-cache-1"
#: Snapshot file names: the key, hex. Only these are read or pruned (the directory may hold others).
_NAME = re.compile(r"^[0-9a-f]{64}\.safetensors$")

Cache = list[Any]


def store_identity(store: Path, config: dict, fingerprint: bytes | None = None) -> str:
    """What a snapshot is only valid for: the source's ``fingerprint`` (default: the store's
    manifest, its expert records' checksums; a checkpoint read in place gives its index),
    the model config as loaded (``experts_per_token`` included: it changes the computation), the
    resident weight files (name, size, modification time: hashing gigabytes at every start would
    cost more than it saves), and the mlx / mlx-lm versions that define the cache's layout."""
    from importlib.metadata import version

    h = hashlib.sha256()
    h.update(FILE_FORMAT.encode())
    h.update(fingerprint if fingerprint is not None else (store / "manifest.json").read_bytes())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for path in sorted(store.glob("*.safetensors")):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"mlx={mx.__version__} mlx-lm={version('mlx-lm')}".encode())
    return h.hexdigest()


def _digest(cache: Cache) -> str:
    """A checksum of every array (and scalar) of the caches' state, in ``tree_flatten`` order:
    safetensors has none, and a flipped bit would silently change the model's output."""
    h = hashlib.sha256()
    for name, value in tree_flatten([c.state for c in cache]):
        h.update(name.encode())
        if isinstance(value, mx.array):
            h.update(f"{value.dtype}{value.shape}".encode())
            h.update(memoryview(mx.contiguous(value)))
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


class PromptCacheDir:
    """Prompt-prefix snapshots in ``directory``, for the store of ``identity`` (``store_identity``).

    ``load(model, tokens)`` gives the cache after ``tokens`` or ``None``; ``save(tokens, cache)``
    writes it. At most ``max_files`` snapshots are kept: the least recently used go first (a
    client sending a new system prompt with each request must not fill the disk).
    """

    def __init__(self, directory: str | os.PathLike, identity: str, *, max_files: int = 64):
        self.directory = Path(directory)
        self.identity = identity
        self.max_files = max_files
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, tokens: Sequence[int]) -> Path:
        """The file of the snapshot after ``tokens``."""
        h = hashlib.sha256(self.identity.encode())
        h.update(b"\0" + ",".join(map(str, tokens)).encode())
        return self.directory / f"{h.hexdigest()}.safetensors"

    def load(self, model: nn.Module, tokens: Sequence[int]) -> Cache | None:
        """The model's cache after ``tokens`` from its file, or ``None`` when there is none or it
        is not exactly that (then a ``PromptCacheWarning`` says why)."""
        path = self.path(tokens)
        if not path.is_file():
            return None
        try:
            cache, meta = load_prompt_cache(str(path), return_metadata=True)
            mx.eval([c.state for c in cache])  # arrays load lazily: read (and fail) here
            problem = self._mismatch(model, tokens, cache, meta)
        except Exception as e:  # a damaged file fails in many ways; none may stop the request
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem:
            warnings.warn(f"prompt cache file {path} ignored: {problem}", PromptCacheWarning, stacklevel=2)
            return None
        try:
            os.utime(path)  # recently used: pruned last
        except OSError:
            pass
        return cache

    def _mismatch(self, model: nn.Module, tokens: Sequence[int], cache: Cache, meta: dict) -> str | None:
        if meta.get("format") != FILE_FORMAT:
            return f"format {meta.get('format')!r}, expected {FILE_FORMAT!r}"
        if meta.get("identity") != self.identity:
            return "written for another store, load option or mlx-lm version"
        if meta.get("tokens") != json.dumps(list(tokens)):
            return "its token prefix differs (a hash collision or a renamed file)"
        expected = [type(c).__name__ for c in make_prompt_cache(model)]
        if [type(c).__name__ for c in cache] != expected:
            return f"cache layers {[type(c).__name__ for c in cache]}, the model has {expected}"
        if meta.get("digest") != _digest(cache):
            return "its arrays do not match their checksum (the file is damaged)"
        return None

    def save(self, tokens: Sequence[int], cache: Cache) -> None:
        """Write the snapshot of ``cache`` (the state after ``tokens``), atomically; a failure
        (disk full, read-only directory) is a warning: the cache is an optimisation."""
        path = self.path(tokens)
        meta = {"format": FILE_FORMAT, "identity": self.identity, "tokens": json.dumps(list(tokens))}
        tmp = None
        try:
            mx.eval([c.state for c in cache])
            meta["digest"] = _digest(cache)
            # mx.save_safetensors appends ".safetensors" to a name without it: give it one
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem[:16]}.",
                                       suffix=".tmp.safetensors")
            os.close(fd)
            save_prompt_cache(tmp, cache, meta)
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
            tmp = None
        except Exception as e:
            warnings.warn(f"prompt cache file {path} not written: {type(e).__name__}: {e}",
                          PromptCacheWarning, stacklevel=2)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        self._prune()

    def _prune(self) -> None:
        try:
            files = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
            files.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
            for old in files[self.max_files :]:
                old.unlink(missing_ok=True)
        except OSError:  # another process pruned the same file first
            pass
