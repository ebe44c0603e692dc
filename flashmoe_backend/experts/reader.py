"""Reads experts from a model source: aligned ``preadv``s on a thread pool, many experts at once.

Where an expert's bytes are is the source's business (``store/layout.py``): a packed store gives
one extent per expert (its record), a checkpoint read in place one per tensor slice. Reads run on
a thread pool; ``os.preadv`` and ``zlib.crc32`` release the GIL, so the threads overlap for real.
Each expert is read into a reusable page-aligned staging buffer (a requirement of O_DIRECT), each
extent as its aligned superset (O_DIRECT needs aligned offsets and lengths; the extent is then a
slice of it, no copy), checked through the source, and copied into MLX arrays (one per tensor).
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

from flashmoe_backend.store.format import ALIGNMENT, Manifest, StoreError, TensorSpec, checksum
from flashmoe_backend.store.layout import ExpertSource, as_source

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


def _tensor_to_mlx(data: np.ndarray, t: TensorSpec) -> mx.array:
    """The tensor ``t`` (``t.offset`` into ``data``) as an MLX array (a copy)."""
    carrier = _NUMPY_CARRIER[t.dtype] if t.dtype in _NUMPY_CARRIER else np.dtype(t.dtype)
    array = mx.array(data[t.offset : t.offset + t.nbytes].view(carrier).reshape(t.shape))
    if t.dtype in _NUMPY_CARRIER:
        array = array.view(getattr(mx, t.dtype))
    return array


class ExpertReader:
    """Reads experts of a model source, in parallel, checking their checksums through it.

    ``ExpertReader(store_dir, manifest)`` reads a packed store; ``ExpertReader(source)`` any
    ``ExpertSource`` (a packed store or a checkpoint read in place).
    """

    def __init__(
        self,
        store: Path | ExpertSource,
        manifest: Manifest | None = None,
        config: ReaderConfig = ReaderConfig(),
    ):
        store = as_source(store, manifest)
        self.source: ExpertSource = store
        self.store = store.root
        self.manifest = store.manifest
        self.config = config
        self._fds: list[int] = []
        self._direct: list[bool] = []
        for path in store.files:
            fd, direct = _open(path, config.page_cache)
            self._fds.append(fd)
            self._direct.append(direct)
        self._verified = [np.zeros(layer.num_experts, dtype=bool) for layer in self.manifest.layers]
        self._buffers: dict[int, queue.SimpleQueue] = {}  # buffer size -> idle staging buffers
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

    def _read_extent(self, view: np.ndarray, file: int, start: int, needed: int, expert: int) -> None:
        """Fill ``view`` from ``file`` at byte ``start``; at least ``needed`` bytes must exist (an
        aligned superset may run past the end of the file)."""
        done = 0
        while done < needed:
            n = os.preadv(self._fds[file], [view[done:]], start + done)
            if n == 0:
                raise StoreError(
                    f"{self.source.files[file]}: truncated, expert {expert} ends past end of file"
                )
            done += n

    def _read_one(self, layer_index: int, expert: int) -> ExpertWeights:
        layer = self.manifest.layers[layer_index]
        if not 0 <= expert < layer.num_experts:
            raise StoreError(
                f"{self.store}: {layer.module}: expert {expert} out of range (0..{layer.num_experts - 1})"
            )
        size = self.source.staging_bytes(layer_index)
        buffer = self._staging(size)
        try:
            verify = self.config.verify == "always" or (
                self.config.verify == "first" and not self._verified[layer_index][expert]
            )
            weights, pos = {}, 0
            for k, x in enumerate(self.source.extents(layer_index, expert)):
                direct = self._direct[x.file]
                # O_DIRECT: read the aligned superset, then slice the extent out of it.
                start = x.offset - x.offset % ALIGNMENT if direct else x.offset
                end = -(-(x.offset + x.nbytes) // ALIGNMENT) * ALIGNMENT if direct else x.offset + x.nbytes
                if pos + (end - start) > size:
                    raise StoreError(
                        f"{self.source.files[x.file]}: expert {expert} of {layer.module} does not fit "
                        f"its staging buffer ({size} bytes)"
                    )
                span = buffer[pos : pos + end - start]
                self._read_extent(span, x.file, start, x.offset + x.nbytes - start, expert)
                data = span[x.offset - start : x.offset - start + x.nbytes]
                if verify:
                    self.source.check(layer_index, expert, k, checksum(data))
                for t in x.tensors:
                    weights[t.name] = _tensor_to_mlx(data, t)
                if self.config.page_cache == "bypass" and not direct and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self._fds[x.file], x.offset, x.nbytes, os.POSIX_FADV_DONTNEED)
                pos += -(-(end - start) // ALIGNMENT) * ALIGNMENT
            if verify:
                self._verified[layer_index][expert] = True
            # mx.array copied the bytes; the re-views are operations of this thread's stream, which
            # another thread cannot evaluate: evaluate them here.
            mx.eval(weights)
            return weights
        finally:
            self._buffers[size].put(buffer)

    def close(self) -> None:
        """Stop the thread pool, close the expert files and let the source persist what it
        learnt (a checkpoint's first-read checksums)."""
        self._pool.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.source.flush()
