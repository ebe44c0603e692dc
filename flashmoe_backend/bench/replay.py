"""Trace-driven decode and prefill through the REAL reader and cache, without the model's compute.

Per token and layer, decode does what the engine does: ``ExpertStreamer.fetch(layer, experts)``
(look up, pin, read every miss of the layer at once on the reader's thread pool, insert), then
``release()``; the expert compute is stood in for by ``touch`` (one read of each needed record
from memory). Options (``RunConfig``): the cache policy and budget, the OS page cache kept and
held to a budget, emulated non-expert compute, and next-layer prefetch with a modelled recall.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flashmoe_backend.bench.bandwidth import cold_read, floor_per_token, touch
from flashmoe_backend.bench.pagecache import (
    PageCacheBudget,
    evict_page_cache,
    process_read_bytes,
    store_files,
    store_resident_bytes,
)
from flashmoe_backend.experts.cache import DEFAULT_POLICY, ExpertCache
from flashmoe_backend.store.format import Manifest


@dataclass
class RunConfig:
    """One decode run over a trace."""

    name: str
    group: str = "decode"
    policy: str = DEFAULT_POLICY
    policy_options: dict = field(default_factory=dict)
    budget_bytes: int = 0  # our cache (MLX arrays)
    page_cache: str = "bypass"  # the reader's mode
    os_cache_bytes: int | None = None  # hold the OS page cache to this (None: unlimited)
    io_threads: int = 8
    verify: str = "first"
    touch: bool = True
    compute_ms: float = 0.0  # emulated non-expert compute per layer (sleep)
    prefetch_recall: float | None = None  # None: no prefetch
    prefetch_threads: int = 4
    seed: int = 0


class TracePrefetcher:
    """Next-layer prefetch with a modelled predictor: it predicts k experts of the next layer, each
    true one with probability ``recall`` (the rest false positives), and reads the predicted ones
    not cached in the background. Finished reads go into the cache at the next layer call."""

    def __init__(self, streamer, recall: float, k: int, threads: int, seed: int):
        self.streamer = streamer
        self.recall = recall
        self.k = k
        self.rng = np.random.default_rng([seed, 7])
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-prefetch")
        self.inflight: dict[tuple[int, int], Future] = {}
        self.issued = 0
        self.useful = 0
        self.wait_seconds = 0.0

    def issue(self, layer: int, true_next: Sequence[int]) -> None:
        spec = self.streamer.manifest.layers[layer]
        kept = [e for e in true_next if self.rng.random() < self.recall]
        others = np.setdiff1d(np.arange(spec.num_experts), true_next)
        false = (
            self.rng.choice(others, self.k - len(kept), replace=False).tolist() if len(kept) < self.k else []
        )
        for e in kept + false:
            key = (layer, e)
            if key in self.streamer.cache or key in self.inflight:
                continue
            self.inflight[key] = self.pool.submit(self.streamer.reader.read, layer, [e])
            self.issued += 1

    def collect(self, layer: int, needed: Sequence[int]) -> None:
        """Before a layer call: wait for its needed in-flight reads; put every finished one in the cache."""
        cache = self.streamer.cache
        wanted = {(layer, e) for e in needed}
        cache.pin(k for k in wanted if k in cache)
        tic = time.perf_counter()
        for key in wanted:
            if key in self.inflight:
                self.inflight[key].result()
        self.wait_seconds += time.perf_counter() - tic
        for key, future in list(self.inflight.items()):
            if future.done():
                del self.inflight[key]
                if key not in cache:
                    cache.insert(key, future.result()[0], self.streamer.manifest.layers[key[0]].record_bytes)
                if key in wanted:
                    self.useful += 1
                    cache.pin([key])
        cache.unpin_all()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def fresh_streamer(store: Path, manifest: Manifest, cfg: RunConfig):
    """A new reader and an empty cache, as ``cfg`` says."""
    from flashmoe_backend.experts.reader import ExpertReader, ReaderConfig
    from flashmoe_backend.experts.switch import ExpertStreamer

    reader = ExpertReader(store, manifest, ReaderConfig(cfg.io_threads, cfg.page_cache, cfg.verify))
    cache = ExpertCache(cfg.budget_bytes, cfg.policy, **cfg.policy_options)
    return ExpertStreamer(manifest, reader, cache)


def release_memory() -> None:
    """Return freed MLX buffers to the system between runs (a full gc pass is too slow here)."""
    try:
        import mlx.core as mx

        mx.clear_cache()
    except Exception:  # pragma: no cover - older MLX
        pass


def _touch_all(weights: Sequence[dict]) -> float:
    """The expert-compute stand-in over a layer's experts; returns its seconds."""
    tic = time.perf_counter()
    for w in weights:
        touch(w)
    return time.perf_counter() - tic


def _snapshot(streamer, limit: PageCacheBudget | None, prefetcher: TracePrefetcher | None, timers: dict):
    """The running totals a decode run reports differences of."""
    return dict(
        hits=streamer.cache.counters.hits,
        misses=streamer.cache.counters.misses,
        os_hits=limit.hits if limit else 0,
        os_misses=limit.misses if limit else 0,
        io=streamer.counters.io_seconds,
        bytes=streamer.counters.bytes_read,
        touch=timers["touch"],
        sleep=timers["sleep"],
        disk=process_read_bytes(),
        issued=prefetcher.issued if prefetcher else 0,
        useful=prefetcher.useful if prefetcher else 0,
        wait=prefetcher.wait_seconds if prefetcher else 0.0,
    )


def _replay_layer(streamer, row: np.ndarray, layer: int, cfg: RunConfig, limit, prefetcher, timers) -> None:
    """One layer of one token: what decode does, with the compute stood in for."""
    experts = row[layer].tolist()
    if prefetcher:
        prefetcher.collect(layer, experts)
    missing = [e for e in experts if (layer, e) not in streamer.cache]
    weights = streamer.fetch(layer, experts)
    if limit is not None and missing:
        limit.access(layer, missing)
    if prefetcher and layer + 1 < len(row):
        prefetcher.issue(layer + 1, row[layer + 1].tolist())
    if cfg.touch:
        timers["touch"] += _touch_all(weights)
    if cfg.compute_ms:
        t0 = time.perf_counter()
        time.sleep(cfg.compute_ms / 1000)
        timers["sleep"] += time.perf_counter() - t0
    streamer.release()


def run_decode(
    store: Path,
    manifest: Manifest,
    trace: np.ndarray,
    cfg: RunConfig,
    warmup: int,
    disk_bw: float,
    mem_bw: float,
) -> dict:
    """Decode a trace through the real reader and cache, cold; time the tokens after ``warmup``."""
    evict_page_cache(store_files(store, manifest))
    streamer = fresh_streamer(store, manifest, cfg)
    limit = None
    if cfg.page_cache == "keep" and cfg.os_cache_bytes is not None:
        limit = PageCacheBudget(store, manifest, cfg.os_cache_bytes)
    T, L, K = trace.shape
    prefetcher = None
    if cfg.prefetch_recall is not None:
        prefetcher = TracePrefetcher(streamer, cfg.prefetch_recall, K, cfg.prefetch_threads, cfg.seed)
    rb = manifest.layers[0].record_bytes
    timers = {"touch": 0.0, "sleep": 0.0}
    token_seconds = []
    start: dict = {}
    read0 = process_read_bytes()
    try:
        for t in range(T):
            if t == warmup:
                start = _snapshot(streamer, limit, prefetcher, timers)
            tic = time.perf_counter()
            for layer in range(L):
                _replay_layer(streamer, trace[t], layer, cfg, limit, prefetcher, timers)
            token_seconds.append(time.perf_counter() - tic)
    finally:
        if prefetcher:
            prefetcher.close()
        streamer.reader.close()
    resident = store_resident_bytes(store, manifest)
    if limit is not None:
        limit.close()
    end = _snapshot(streamer, limit, prefetcher, timers)
    d = {k: None if start[k] is None or end[k] is None else end[k] - start[k] for k in start}
    c = streamer.cache.counters
    n = T - warmup
    hits, misses, useful = d["hits"], d["misses"], d["useful"]
    seconds = sum(token_seconds[warmup:])
    prefetched = d["issued"] * rb
    demand_hits = hits - useful  # hits the cache had before the prefetcher's help
    busy = d["io"] + d["wait"]
    terms = {"miss_records": misses + useful, "hit_records": demand_hits}
    if limit is not None:  # what the page cache served costs memory bandwidth, not disk
        terms = {"miss_records": d["os_misses"] + useful, "hit_records": demand_hits + d["os_hits"]}
    floor = floor_per_token(n, terms["miss_records"] * rb, terms["hit_records"] * rb, disk_bw, mem_bw)
    result = {
        "name": cfg.name,
        "group": cfg.group,
        "config": asdict(cfg),
        "k": K,
        "layers": L,
        "tokens_measured": n,
        "warmup_tokens": warmup,
        "seconds_per_token": seconds / n,
        "tokens_per_s": n / seconds,
        "hit_rate": hits / max(1, hits + misses),
        "hit_rate_all_tokens": c.hits / max(1, c.hits + c.misses),
        "lookups": hits + misses,
        "hits": hits,
        "misses": misses,
        "bytes_read_per_token": (d["bytes"] + prefetched) / n,
        "disk_bytes_per_token": d["disk"] / n if d["disk"] is not None else None,
        "time_shares": {
            "io_wait": busy / seconds,
            "router_sync": 0.0,
            "expert_compute": d["touch"] / seconds,
            "emulated_compute": d["sleep"] / seconds,
            "rest": max(0.0, 1 - (busy + d["touch"] + d["sleep"]) / seconds),
        },
        "floor_terms": terms,
        "floor_seconds_per_token": floor,
        "measured_over_floor": (seconds / n) / floor if floor else None,
        "own_cache_bytes_peak": c.bytes_peak,
        "page_cache_resident_bytes_end": resident,
        "os_cache_budget_bytes": cfg.os_cache_bytes,
        "memory_bytes": cfg.budget_bytes + (cfg.os_cache_bytes or 0),
        "counters": {
            "bytes_read": streamer.counters.bytes_read,
            "experts_read": streamer.counters.experts_read,
            "hits": c.hits,
            "misses": c.misses,
            "evictions": c.evictions,
            "process_read_bytes": end["disk"] - read0 if end["disk"] is not None else None,
        },
    }
    if cfg.page_cache == "keep" and cfg.os_cache_bytes is None:
        result["memory_bytes"] = cfg.budget_bytes + (resident or 0)
    if limit is not None:
        os_hits, os_misses = d["os_hits"], d["os_misses"]
        result["os_cache_hit_rate"] = os_hits / max(1, os_hits + os_misses)
        result["hit_rate_combined"] = (hits + os_hits) / max(1, hits + misses)
    if prefetcher:
        result["prefetch"] = {
            "recall": cfg.prefetch_recall,
            "issued_bytes_per_token": prefetched / n,
            "useful_per_token": useful / n,
            "wasted_per_token": (prefetched / rb - useful) / n,
            "wait_seconds_per_token": d["wait"] / n,
            "demand_hit_rate": demand_hits / max(1, hits + misses),
        }
    del streamer, prefetcher
    release_memory()
    return result


def run_prefill(store: Path, manifest: Manifest, trace: np.ndarray, cfg: RunConfig, threads: int) -> dict:
    """Layer-major prefill of a prompt chunk: per layer, the union of the experts its tokens need,
    through ``plan_groups`` and ``fetch`` (each needed expert read once), cold; against one cold
    raw O_DIRECT pass over the same records."""
    evict_page_cache(store_files(store, manifest))
    streamer = fresh_streamer(store, manifest, cfg)
    T, L, K = trace.shape
    unions = [np.unique(trace[:, layer]).tolist() for layer in range(L)]
    groups = 0
    touch_s = 0.0
    tic = time.perf_counter()
    try:
        for layer in range(L):
            for group in streamer.plan_groups(layer, unions[layer]):
                groups += 1
                weights = streamer.fetch(layer, group)
                if cfg.touch:
                    touch_s += _touch_all(weights)
                streamer.release()
        seconds = time.perf_counter() - tic
    finally:
        streamer.reader.close()
    counters = streamer.counters
    del streamer
    release_memory()
    batches = [[(layer, e) for e in unions[layer]] for layer in range(L)]
    nbytes, one_pass, _ = cold_read(store, manifest, batches, threads)
    needed = sum(len(u) for u in unions)
    return {
        "prompt_tokens": T,
        "layers": L,
        "k": K,
        "experts_needed": needed,
        "experts_needed_share": needed / sum(s.num_experts for s in manifest.layers),
        "bytes_needed": nbytes,
        "groups": groups,
        "seconds": seconds,
        "io_seconds": counters.io_seconds,
        "expert_compute_seconds": touch_s,
        "bytes_read": counters.bytes_read,
        "one_pass_seconds": one_pass,
        "one_pass_bytes_per_s": nbytes / one_pass,
        "over_one_pass": seconds / one_pass,
        "flash_moe_style_estimate_seconds": None,
    }
