"""The page-fault baseline: how llama.cpp reads a model larger than memory.

The expert files are mmapped and each needed record is touched in place by a thread pool, so its
page faults are the reads; ``PageCacheBudget`` holds the page cache to the same memory our cache
gets. (The other peers run through ``replay.run_decode``: the OS page cache alone, flash-moe's
choice, is a ``RunConfig`` with ``page_cache="keep"`` and a cache of one layer's experts.)
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flashmoe_backend.bench.bandwidth import floor_per_token
from flashmoe_backend.bench.pagecache import (
    PageCacheBudget,
    evict_page_cache,
    process_read_bytes,
    store_files,
    store_resident_bytes,
)
from flashmoe_backend.store.format import Manifest


def mmap_run_name(advice: str) -> str:
    return f"mmap page faults (llama.cpp style), madvise {advice}"


def run_mmap(
    store: Path,
    manifest: Manifest,
    trace: np.ndarray,
    name: str,
    budget_bytes: int | None,
    threads: int,
    warmup: int,
    advice: str,
    disk_bw: float,
    mem_bw: float,
) -> dict:
    """The page-fault baseline (llama.cpp-style): the expert files mmapped, each needed record
    touched in place by ``threads`` threads (its page faults are the reads), the page cache held to
    ``budget_bytes`` by ``PageCacheBudget``; ``advice`` is "normal" (the kernel's read-around) or
    "random" (MADV_RANDOM)."""
    files = store_files(store, manifest)
    evict_page_cache(files)
    fds = [os.open(p, os.O_RDONLY) for p in files]
    maps = [mmap.mmap(fd, 0, prot=mmap.PROT_READ) for fd in fds]
    if advice == "random":
        for m in maps:
            m.madvise(mmap.MADV_RANDOM)
    limit = PageCacheBudget(store, manifest, budget_bytes, maps) if budget_bytes is not None else None
    rb = manifest.layers[0].record_bytes
    pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-mmap")

    def fault(layer_expert):
        layer, e = layer_expert
        view = np.frombuffer(maps[layer], dtype=np.uint64, count=rb // 8, offset=e * rb)
        np.bitwise_or.reduce(view)

    T, L, K = trace.shape
    token_seconds = []
    disk0 = None
    snap = (0, 0)
    try:
        for t in range(T):
            if t == warmup:
                disk0 = process_read_bytes()
                snap = (limit.hits, limit.misses) if limit else (0, 0)
            tic = time.perf_counter()
            for layer in range(L):
                experts = trace[t, layer].tolist()
                list(pool.map(fault, [(layer, e) for e in experts]))
                if limit is not None:
                    limit.access(layer, experts)
            token_seconds.append(time.perf_counter() - tic)
    finally:
        pool.shutdown(wait=True)
        resident = store_resident_bytes(store, manifest)
        if limit is not None:
            limit.close()
        for m in maps:
            m.close()
        for fd in fds:
            os.close(fd)
    n = T - warmup
    seconds = sum(token_seconds[warmup:])
    disk1 = process_read_bytes()
    disk_per_token = (disk1 - disk0) / n if disk1 is not None and disk0 is not None else None
    hits = misses = floor = terms = None
    if limit is not None:
        hits, misses = limit.hits - snap[0], limit.misses - snap[1]
        terms = {"miss_records": misses, "hit_records": hits}
        floor = floor_per_token(n, misses * rb, hits * rb, disk_bw, mem_bw)
    evict_page_cache(files)
    return {
        "name": name,
        "group": "page_cache",
        "k": K,
        "layers": L,
        "tokens_measured": n,
        "warmup_tokens": warmup,
        "config": {"threads": threads, "madvise": advice, "page_cache_budget": budget_bytes},
        "seconds_per_token": seconds / n,
        "tokens_per_s": n / seconds,
        "hit_rate": hits / max(1, hits + misses) if limit else None,
        "bytes_read_per_token": disk_per_token,
        "disk_bytes_per_token": disk_per_token,
        "time_shares": {"io_wait": None, "router_sync": 0.0, "expert_compute": None, "rest": None},
        "floor_terms": terms,
        "floor_seconds_per_token": floor,
        "measured_over_floor": (seconds / n) / floor if floor else None,
        "page_cache_resident_bytes_end": resident,
        "memory_bytes": budget_bytes if budget_bytes is not None else resident,
    }
