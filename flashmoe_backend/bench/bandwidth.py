"""The two bandwidths of the physical floor, measured on the store's own files, and the floor.

* disk: whole records read cold with ``os.preadv`` (O_DIRECT where supported) on a thread pool,
  in batches like a layer's misses (``RawReader``, ``measure_disk``);
* memory: the expert-compute stand-in (``touch``: every byte of an expert's arrays read once)
  over records held in MLX arrays (``measure_memory``).

::

    floor per token = missed bytes / disk bandwidth + (resident + hit bytes) / memory bandwidth
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flashmoe_backend.bench.pagecache import evict_page_cache, store_files
from flashmoe_backend.experts.reader import aligned_buffer
from flashmoe_backend.store.format import ALIGNMENT, Manifest, StoreError

Key = tuple[int, int]  # (layer, expert)


def floor_per_token(
    tokens: int, miss_bytes: float, memory_bytes: float, disk_bw: float, mem_bw: float
) -> float:
    """The physical floor, in seconds per token: ``miss_bytes`` from disk and ``memory_bytes``
    (resident and cache-hit bytes) from memory, over ``tokens`` tokens."""
    return (miss_bytes / disk_bw + memory_bytes / mem_bw) / tokens


def random_records(rng: np.random.Generator, layers: int, experts: int, n: int) -> list[Key]:
    """``n`` distinct (layer, expert) records drawn uniformly from ``layers`` x ``experts``."""
    return [(int(x // experts), int(x % experts)) for x in rng.choice(layers * experts, n, replace=False)]


def open_direct(path: Path) -> tuple[int, bool]:
    """Open for reading with O_DIRECT where the platform and file system allow; returns
    (fd, whether O_DIRECT is in effect)."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), hasattr(os, "O_DIRECT")
    except OSError:
        return os.open(path, os.O_RDONLY), False


def pread_full(fd: int, view: np.ndarray, offset: int, needed: int | None = None) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (``os.preadv`` until done; or until ``needed``
    bytes, where an aligned read may run past the end of the file)."""
    done, needed = 0, len(view) if needed is None else needed
    while done < needed:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise StoreError(f"short read at byte {offset + done}")
        done += n


class RawReader:
    """Whole experts by ``os.preadv`` on a thread pool, nothing else (no checksum, no copy, O_DIRECT
    where supported): the disk's bandwidth for the source's read pattern (a packed store: one
    record per expert; a checkpoint read in place: one aligned read per tensor slice)."""

    def __init__(self, store, manifest: Manifest | None = None, threads: int = 8):
        from flashmoe_backend.store.layout import as_source

        self.source = as_source(store, manifest)
        self.manifest = self.source.manifest
        opened = [open_direct(p) for p in self.source.files]
        self._fds = [fd for fd, _ in opened]
        self.direct = all(direct for _, direct in opened)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-raw")

    def _one(self, layer: int, expert: int) -> int:
        size = self.source.staging_bytes(layer)
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = aligned_buffer(size)
        pos = 0
        for x in self.source.extents(layer, expert):
            start = x.offset - x.offset % ALIGNMENT  # the aligned superset, as the reader reads it
            end = -(-(x.offset + x.nbytes) // ALIGNMENT) * ALIGNMENT
            pread_full(self._fds[x.file], buf[pos : pos + end - start], start, x.offset + x.nbytes - start)
            pos += end - start
        return self.manifest.layers[layer].record_bytes

    def read(self, keys: Sequence[Key]) -> int:
        """Read the records at once; returns their bytes."""
        return sum(f.result() for f in [self._pool.submit(self._one, *k) for k in keys])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)


def cold_read(
    store: Path, manifest: Manifest, batches: Sequence[Sequence[Key]], threads: int
) -> tuple[int, float, bool]:
    """Evict the store's pages, then read ``batches`` one after another (each batch's records at
    once) with ``RawReader``; returns (bytes, seconds, whether O_DIRECT was in effect)."""
    evict_page_cache(store_files(store, manifest))
    raw = RawReader(store, manifest, threads)
    try:
        tic = time.perf_counter()
        nbytes = sum(raw.read(batch) for batch in batches)
        seconds = time.perf_counter() - tic
    finally:
        raw.close()
    return nbytes, seconds, raw.direct


def measure_disk(store: Path, manifest: Manifest, keys: Sequence[Key], batch: int, threads: int) -> dict:
    """Bandwidth of reading ``keys`` cold, ``batch`` records at a time (like a layer's misses)."""
    batches = [keys[i : i + batch] for i in range(0, len(keys), batch)]
    nbytes, seconds, direct = cold_read(store, manifest, batches, threads)
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "bytes_per_s": nbytes / seconds,
        "records": len(keys),
        "batch": batch,
        "threads": threads,
        "o_direct": direct,
    }


def touch(weights: dict) -> int:
    """The expert-compute stand-in: read every byte of one expert's arrays once from memory.

    CPU arrays are reduced in numpy over zero-copy views (mlx[cpu]'s quantized matmul is far
    slower than memory here); other devices reduce in MLX. Returns bytes read.
    """
    import mlx.core as mx

    nbytes = 0
    if mx.default_device() == mx.cpu:
        for a in weights.values():
            raw = np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).reshape(-1).view(np.uint8)
            word = np.uint64 if raw.nbytes % 8 == 0 else np.uint32 if raw.nbytes % 4 == 0 else np.uint8
            np.bitwise_or.reduce(raw.view(word))
            nbytes += raw.nbytes
    else:
        mx.eval([mx.max(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a) for a in weights.values()])
        nbytes = sum(a.nbytes for a in weights.values())
    return nbytes


def measure_memory(store: Path, manifest: Manifest, records: int, repeats: int = 3, seed: int = 0) -> dict:
    """Bandwidth of the compute stand-in over records read by the real reader into MLX arrays."""
    from flashmoe_backend.experts.reader import ExpertReader, ReaderConfig

    rng = np.random.default_rng(seed)
    layers = len(manifest.layers)
    reader = ExpertReader(store, manifest, ReaderConfig(page_cache="bypass", verify="never"))
    try:
        loaded = []
        for layer, spec in enumerate(manifest.layers):
            n = min(records // layers + (layer < records % layers), spec.num_experts)
            if n:
                loaded += reader.read(layer, sorted(rng.choice(spec.num_experts, n, replace=False).tolist()))
    finally:
        reader.close()
    for w in loaded:
        touch(w)
    tic = time.perf_counter()
    nbytes = sum(touch(w) for _ in range(repeats) for w in loaded)
    seconds = time.perf_counter() - tic
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "bytes_per_s": nbytes / seconds,
        "records": len(loaded),
        "repeats": repeats,
        "method": "touch (numpy bitwise_or reduce over MLX arrays' memory)",
    }
