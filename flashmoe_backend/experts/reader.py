"""Reads expert records from the store: one aligned ``preadv`` per expert, many at once.

Reads run on a thread pool; ``os.preadv`` and ``zlib.crc32`` release the GIL, so the
threads overlap for real. Each record is read into a reusable page-aligned staging buffer
(a requirement of O_DIRECT), checked against its manifest checksum, and copied into MLX
arrays (one per tensor of the record).
"""

from __future__ import annotations

import mmap
import os
import queue
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlx.core as mx
import numpy as np

from flashmoe_backend.store.format import LayerSpec, Manifest, StoreError, checksum

PageCache = Literal["bypass", "keep"]
Verify = Literal["first", "always", "never"]
ExpertWeights = dict[str, mx.array]  # tensor name (relative to the SwitchGLU) -> array

# numpy cannot hold bfloat16: such tensors travel as uint16 and are re-viewed in MLX.
_NUMPY_CARRIER = {"bfloat16": np.uint16}


@dataclass(frozen=True)
class ReaderConfig:
    """How expert records are read.

    page_cache: "bypass" reads with O_DIRECT (F_NOCACHE on macOS) so the OS page cache does
        not hold a second copy of what our own cache holds; "keep" uses ordinary buffered reads.
    verify: when to check a record's checksum: the first time it is read in this process,
        on every read, or never.
    """

    io_threads: int = 8
    page_cache: PageCache = "bypass"
    verify: Verify = "first"


def _open(path: Path, page_cache: PageCache) -> tuple[int, bool]:
    """Open for reading; returns (fd, direct) where direct says O_DIRECT is in effect."""
    if page_cache == "bypass" and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:  # e.g. tmpfs does not support O_DIRECT: fall back below
            pass
    fd = os.open(path, os.O_RDONLY)
    if page_cache == "bypass" and sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        return fd, True
    return fd, False


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zeroed, page-aligned ``uint8`` buffer of ``nbytes`` (an anonymous mmap), as O_DIRECT
    reads into it require; the reader stages each record in one, and so can any other code that
    reads the store's files with O_DIRECT (the benchmarks' raw disk reads)."""
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


def _to_mlx(record: np.ndarray, layer: LayerSpec) -> ExpertWeights:
    weights = {}
    for t in layer.tensors:
        carrier = _NUMPY_CARRIER[t.dtype] if t.dtype in _NUMPY_CARRIER else np.dtype(t.dtype)
        view = record[t.offset : t.offset + t.nbytes].view(carrier).reshape(t.shape)
        array = mx.array(view)
        if t.dtype in _NUMPY_CARRIER:
            array = array.view(getattr(mx, t.dtype))
        weights[t.name] = array
    return weights


class ExpertReader:
    """Reads whole expert records of a store, in parallel, checking checksums."""

    def __init__(self, store: Path, manifest: Manifest, config: ReaderConfig = ReaderConfig()):
        self.store = store
        self.manifest = manifest
        self.config = config
        self._fds: list[int] = []
        self._direct: list[bool] = []
        for layer in manifest.layers:
            fd, direct = _open(store / layer.file, config.page_cache)
            self._fds.append(fd)
            self._direct.append(direct)
        self._verified = [np.zeros(layer.num_experts, dtype=bool) for layer in manifest.layers]
        self._buffers: dict[int, queue.SimpleQueue] = {}  # record size -> idle staging buffers
        self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix="flashmoe-io")

    @property
    def direct_io(self) -> bool:
        """Whether reads bypass the OS page cache."""
        return all(self._direct)

    def read(self, layer: int, experts: list[int]) -> list[ExpertWeights]:
        """Read the given experts of one MoE layer (all at once); returns their weights in order."""
        return list(self.read_iter(layer, experts))

    def read_iter(self, layer: int, experts: list[int]) -> Iterator[ExpertWeights]:
        """Start reading the given experts of one MoE layer (all at once); yields their weights
        in order, each as soon as its own read is done."""
        futures = [self._pool.submit(self._read_one, layer, e) for e in experts]
        return (f.result() for f in futures)

    def _staging(self, nbytes: int) -> np.ndarray:
        idle = self._buffers.setdefault(nbytes, queue.SimpleQueue())
        try:
            return idle.get_nowait()
        except queue.Empty:
            return aligned_buffer(nbytes)

    def _read_one(self, layer_index: int, expert: int) -> ExpertWeights:
        layer = self.manifest.layers[layer_index]
        path = self.store / layer.file
        if not 0 <= expert < layer.num_experts:
            raise StoreError(f"{path}: expert {expert} out of range (0..{layer.num_experts - 1})")
        buffer = self._staging(layer.record_bytes)
        try:
            offset, done = expert * layer.record_bytes, 0
            while done < layer.record_bytes:
                n = os.preadv(self._fds[layer_index], [buffer[done:]], offset + done)
                if n == 0:
                    raise StoreError(f"{path}: truncated, expert {expert} ends past end of file")
                done += n
            if self.config.verify == "always" or (
                self.config.verify == "first" and not self._verified[layer_index][expert]
            ):
                if checksum(buffer) != layer.checksums[expert]:
                    raise StoreError(
                        f"{path}: checksum mismatch in expert {expert} of {layer.module} "
                        f"(record at byte {offset}); the store is corrupt, run `flashmoe verify`"
                    )
                self._verified[layer_index][expert] = True
            weights = _to_mlx(buffer, layer)
            # mx.array copied the bytes; the re-views are operations of this thread's stream, which
            # another thread cannot evaluate: evaluate them here.
            mx.eval(weights)
            if (
                self.config.page_cache == "bypass"
                and not self._direct[layer_index]
                and hasattr(os, "posix_fadvise")
            ):
                os.posix_fadvise(self._fds[layer_index], offset, layer.record_bytes,
                                 os.POSIX_FADV_DONTNEED)
            return weights
        finally:
            self._buffers[layer.record_bytes].put(buffer)

    def close(self) -> None:
        """Stop the thread pool and close the expert files."""
        self._pool.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)
        self._fds = []
