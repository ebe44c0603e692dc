"""The OS page cache: cold starts (eviction), residency (mincore), bytes read from storage, and a
byte budget for the page cache's share of a store (``PageCacheBudget``)."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flashmoe_backend.store.format import Manifest


def store_files(store, manifest: Manifest) -> list[Path]:
    """The files experts are read from: a store's expert files, one per layer; or, for an
    ``ExpertSource`` (``store/layout.py``: a checkpoint read in place), its files."""
    if not isinstance(store, (str, os.PathLike)):
        return list(store.files)
    return [store / layer.file for layer in manifest.layers]


def evict_page_cache(paths: Sequence[Path]) -> None:
    """Drop the files' pages from the OS page cache (posix_fadvise DONTNEED; clean pages only)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_caches() -> bool:
    """Ask the kernel to drop all clean page cache (needs root; Linux). Returns success."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return _libc


def resident_bytes(path: Path) -> int | None:
    """Bytes of a file now in the page cache (mincore), or None where unsupported."""
    if not sys.platform.startswith("linux"):
        return None
    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = _load_libc()
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def store_resident_bytes(store: Path, manifest: Manifest) -> int | None:
    """Bytes of the store's expert files now in the page cache, or None where unsupported."""
    sizes = [resident_bytes(p) for p in store_files(store, manifest)]
    return None if any(s is None for s in sizes) else sum(sizes)


def process_read_bytes() -> int | None:
    """Bytes this process caused to be read from storage (/proc/self/io; counts O_DIRECT reads,
    buffered reads and mmap page faults alike), or None where unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PageCacheBudget:
    """Holds the OS page cache's share of the store to a byte budget, without cgroups.

    Tracks the store's records in LRU order as they are accessed and, past the budget, drops the
    least recently used record's pages (madvise DONTNEED on our mapping if any, then
    posix_fadvise DONTNEED). Pages that kernel readahead brought in around an accessed record
    (neighbouring records not in the LRU) are dropped too, so the page cache holds at most the
    budget. The kernel's own replacement (two-list LRU) is approximated by exact LRU.
    """

    def __init__(
        self, store: Path, manifest: Manifest, budget_bytes: int, mmaps: Sequence[mmap.mmap] | None = None
    ):
        self.manifest = manifest
        self.budget_bytes = budget_bytes
        self.mmaps = mmaps
        self._fds = [os.open(p, os.O_RDONLY) for p in store_files(store, manifest)]
        self._lru: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def _drop(self, layer: int, expert: int) -> None:
        spec = self.manifest.layers[layer]
        offset = expert * spec.record_bytes
        if self.mmaps is not None:
            self.mmaps[layer].madvise(mmap.MADV_DONTNEED, offset, spec.record_bytes)
        os.posix_fadvise(self._fds[layer], offset, spec.record_bytes, os.POSIX_FADV_DONTNEED)

    def access(self, layer: int, experts: Sequence[int]) -> None:
        spec = self.manifest.layers[layer]
        current = set()
        for e in experts:
            key = (layer, e)
            current.add(key)
            if key in self._lru:
                self.hits += 1
                self._lru.move_to_end(key)
            else:
                self.misses += 1
                self._lru[key] = spec.record_bytes
                self.bytes += spec.record_bytes
        while self.bytes > self.budget_bytes:
            victim = next((k for k in self._lru if k not in current), None)
            if victim is None:
                break
            self.bytes -= self._lru.pop(victim)
            self._drop(*victim)
        for e in experts:  # readahead spill into neighbouring records
            for n in (e - 1, e + 1):
                if 0 <= n < spec.num_experts and (layer, n) not in self._lru:
                    self._drop(layer, n)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
