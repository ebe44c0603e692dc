"""The synthetic mode's decode runs: which configurations (``decode_plan``), and running them in
rounds, each against the floor at the disk bandwidth measured around it and against Belady.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from flashmoe_backend.bench import trace as tr
from flashmoe_backend.bench.bandwidth import floor_per_token, measure_disk, random_records
from flashmoe_backend.bench.common import log
from flashmoe_backend.bench.config import SyntheticConfig
from flashmoe_backend.bench.peers import mmap_run_name, run_mmap
from flashmoe_backend.bench.replay import RunConfig, run_decode
from flashmoe_backend.store.format import Manifest

#: The decode run of the shipped defaults (the targets and decisions compare against it).
DEFAULT_RUN = "lfu, O_DIRECT, own cache (default)"


@dataclass
class Setup:
    """What every run of one synthetic benchmark shares."""

    cfg: SyntheticConfig
    store: Path
    manifest: Manifest
    budget: int  # bytes of our cache
    batch: int  # records per disk read batch (about a layer's misses)
    rng: np.random.Generator  # disk samples
    disk_bw: float = 0.0  # measured at the start
    mem_bw: float = 0.0
    base: tr.TraceSpec | None = None  # the decode trace's spec
    traces: dict = field(default_factory=dict)  # k -> decode trace with k experts per token
    belady: dict = field(default_factory=dict)  # k -> Belady on that trace, after the warm-up

    @property
    def layers(self) -> int:
        return len(self.manifest.layers)

    @property
    def experts(self) -> int:
        return self.manifest.layers[0].num_experts

    @property
    def record_bytes(self) -> int:
        return self.manifest.layers[0].record_bytes

    @property
    def capacity(self) -> int:
        """Our cache's budget in records."""
        return self.budget // self.record_bytes

    def belady_for(self, k: int) -> dict:
        if k not in self.belady:
            steps = list(tr.decode_steps(self.traces[k]))
            self.belady[k] = tr.belady(steps, self.capacity, start=self.cfg.warmup * self.layers)
        return self.belady[k]

    def disk_now(self) -> float:
        """The disk's bandwidth right now (the store's records, a layer's batch): other work on a
        shared machine moves it, so each run's floor uses what was measured around it."""
        n = min(self.layers * self.experts, 8 * self.batch)
        sample = random_records(self.rng, self.layers, self.experts, n)
        return measure_disk(self.store, self.manifest, sample, self.batch, self.cfg.io_threads)["bytes_per_s"]


@dataclass(frozen=True)
class Job:
    """One decode configuration: through our reader and cache (``run``), or else the mmap
    page-fault baseline with ``advice``; on the trace with ``k`` experts per token."""

    name: str
    k: int
    run: RunConfig | None = None
    advice: str = "normal"


def shipped_options(cfg: SyntheticConfig, budget: int) -> dict:
    """``RunConfig`` options of the shipped defaults: our cache at ``budget`` with LFU (``cfg``'s
    half-life and guard), O_DIRECT reads, the compute stand-in as ``cfg`` says."""
    return dict(
        policy="lfu",
        policy_options={"half_life": cfg.half_life, "guard": cfg.guard},
        budget_bytes=budget,
        io_threads=cfg.io_threads,
        touch=cfg.touch,
        seed=cfg.seed,
    )


def decode_plan(cfg: SyntheticConfig, experiments: set[str], budget: int, record_bytes: int) -> list[Job]:
    """The decode runs the selected experiments ask for, in the order they run."""
    K = cfg.k
    ours = shipped_options(cfg, budget)
    jobs: list[Job] = []

    def add(name: str, group: str, k: int = K, **options) -> None:
        jobs.append(Job(name, k, RunConfig(name, group, **options)))

    if "decode" in experiments:
        add("lru, O_DIRECT, own cache", "policy", **{**ours, "policy": "lru", "policy_options": {}})
        add(DEFAULT_RUN, "policy", **ours)
    if "page-cache" in experiments:
        add("lfu, page cache kept too (double caching)", "page_cache", page_cache="keep", **ours)
        one_layer = K * record_bytes  # our cache holds one layer's experts, the page cache the rest
        add(
            "OS page cache only (flash-moe style: buffered reads, no own cache)",
            "page_cache",
            page_cache="keep",
            os_cache_bytes=budget - one_layer,
            **{**ours, "budget_bytes": one_layer, "policy": "lru", "policy_options": {}},
        )
    if "peers" in experiments:
        for advice in ("normal", "random") if cfg.mmap_random else ("normal",):
            jobs.append(Job(mmap_run_name(advice), K, advice=advice))
        add(f"K={min(4, K)} of {K} (changes the model's output)", "peers", k=min(4, K), **ours)
    if "prefetch" in experiments:
        for recall in cfg.prefetch_recalls:
            add(
                f"prefetch recall {recall:.0%}, no compute overlap",
                "prefetch",
                prefetch_recall=recall,
                **ours,
            )
        if cfg.compute_ms:
            ms, recall = cfg.compute_ms, cfg.prefetch_recalls[0]
            add(f"no prefetch, {ms} ms compute/layer", "prefetch", compute_ms=ms, **ours)
            add(
                f"prefetch recall {recall:.0%}, {ms} ms compute/layer",
                "prefetch",
                compute_ms=ms,
                prefetch_recall=recall,
                **ours,
            )
    return jobs


def _against_floor(setup: Setup, r: dict, k: int, before: float, load0: tuple) -> dict:
    """Add to a run's result the floor at the disk bandwidth measured around it, and Belady."""
    after = setup.disk_now()
    rb, mem_bw = setup.record_bytes, setup.mem_bw
    r["disk_bytes_per_s_around_run"] = [before, after]
    r["load_average"] = [load0[0], os.getloadavg()[0]]
    bw = (before + after) / 2
    n = r["tokens_measured"]
    if r.get("floor_terms"):
        miss, hit = r["floor_terms"]["miss_records"] * rb, r["floor_terms"]["hit_records"] * rb
        r["floor_seconds_per_token"] = floor_per_token(n, miss, hit, bw, mem_bw)
        r["measured_over_floor"] = r["seconds_per_token"] / r["floor_seconds_per_token"]
        best = max(setup.disk_bw, before, after)
        r["measured_over_floor_at_best_disk"] = r["seconds_per_token"] / floor_per_token(
            n, miss, hit, best, mem_bw
        )
    belady = setup.belady_for(k)
    r["belady_hit_rate"] = belady["hit_rate_after_start"]
    r["belady_hit_rate_all_tokens"] = belady["hit_rate"]
    if r.get("hit_rate_all_tokens") is not None:
        r["hit_rate_over_belady"] = (
            r["hit_rate_all_tokens"] / belady["hit_rate"] if belady["hit_rate"] else None
        )
    r["floor_at_belady_seconds_per_token"] = floor_per_token(
        n, belady["misses_after_start"] * rb, belady["hits_after_start"] * rb, bw, mem_bw
    )
    floor = r.get("floor_seconds_per_token")
    log(
        f"  {r['name']}: {r['seconds_per_token'] * 1000:.1f} ms/token, hit {r.get('hit_rate') or 0:.3f}, "
        f"disk {bw / 1e9:.2f} GB/s, floor {floor * 1000 if floor else 0:.1f} ms -> "
        f"x{r.get('measured_over_floor') or 0:.2f}, load {r['load_average']}"
    )
    return r


def run_job(setup: Setup, job: Job) -> dict:
    """One decode run, cold, timed after the warm-up."""
    cfg, trace = setup.cfg, setup.traces[job.k]
    log(f"{'decode' if job.run else 'mmap'} run {job.name} ...")
    before, load0 = setup.disk_now(), os.getloadavg()
    if job.run is not None:
        r = run_decode(setup.store, setup.manifest, trace, job.run, cfg.warmup, before, setup.mem_bw)
    else:
        r = run_mmap(
            setup.store,
            setup.manifest,
            trace,
            job.name,
            setup.budget,
            cfg.io_threads,
            cfg.warmup,
            job.advice,
            before,
            setup.mem_bw,
        )
    return _against_floor(setup, r, job.k, before, load0)


def run_plan(setup: Setup, jobs: list[Job]) -> list[dict]:
    """The jobs in rounds (A B C .. A B C ..) so that every configuration meets the same mix of
    other work on a shared machine; each keeps its fastest round, the others listed with it."""
    for job in jobs:
        if job.k not in setup.traces:
            setup.traces[job.k] = generate(replace(setup.base, k=job.k))
    tries: dict[str, list[dict]] = {}
    for _ in range(max(1, setup.cfg.repeats)):
        for job in jobs:
            tries.setdefault(job.name, []).append(run_job(setup, job))
    runs = []
    for job in jobs:
        best = min(tries[job.name], key=lambda r: r["seconds_per_token"])
        best["rounds_seconds_per_token"] = [r["seconds_per_token"] for r in tries[job.name]]
        best["rounds_measured_over_floor"] = [r.get("measured_over_floor") for r in tries[job.name]]
        runs.append(best)
    return runs


def generate(spec: tr.TraceSpec) -> np.ndarray:
    """A routing trace, logged."""
    tic = time.perf_counter()
    out = tr.generate_trace(spec)
    log(
        f"trace {spec.tokens}x{spec.layers} k={spec.k} spread={spec.spread} drift={spec.drift}: "
        f"{time.perf_counter() - tic:.1f}s"
    )
    return out
