"""``flashmoe bench synthetic``: a Qwen3.5-397B-sized store and a calibrated routing trace.

In order: build (or reuse) the store; evict it from the page cache; measure the disk and memory
bandwidths; generate the traces; the policy study (no I/O); the decode runs
(``experiments.decode_plan``) in rounds; layer-major prefill against one pass; then the targets,
decisions and invariants (``verdicts``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from flashmoe_backend.bench import trace as tr
from flashmoe_backend.bench.bandwidth import measure_disk, measure_memory, random_records
from flashmoe_backend.bench.common import GiB, log
from flashmoe_backend.bench.config import SyntheticConfig
from flashmoe_backend.bench.experiments import (
    DEFAULT_RUN,
    Setup,
    decode_plan,
    generate,
    run_plan,
    shipped_options,
)
from flashmoe_backend.bench.pagecache import (
    drop_caches,
    evict_page_cache,
    store_files,
    store_resident_bytes,
)
from flashmoe_backend.bench.policies import policy_study
from flashmoe_backend.bench.replay import RunConfig, run_prefill
from flashmoe_backend.bench.report import machine_info
from flashmoe_backend.bench.synthetic_store import expert_tensor_bytes, write_synthetic_store
from flashmoe_backend.bench.verdicts import invariants, judge
from flashmoe_backend.store.format import MANIFEST, read_manifest


def run_synthetic(cfg: SyntheticConfig, command: str = "") -> dict:
    """The synthetic benchmark ``cfg`` (resolved: see ``SyntheticConfig.resolved``) describes."""
    experiments = cfg.selected()
    built = False
    if cfg.store and (Path(cfg.store) / MANIFEST).is_file():
        store = Path(cfg.store)
        log(f"using the synthetic store at {store}")
    else:
        store = Path(cfg.store) if cfg.store else Path(tempfile.mkdtemp(prefix="flashmoe-bench-"))
        _build_store(store, cfg)
        built = True
    try:
        return _run(store, cfg, experiments, built, command)
    finally:
        if built and not cfg.keep_store:
            shutil.rmtree(store, ignore_errors=True)
            log(f"deleted {store}")


def _build_store(store: Path, cfg: SyntheticConfig) -> None:
    need = cfg.layers * cfg.experts * expert_tensor_bytes(cfg.hidden, cfg.intermediate)
    free = shutil.disk_usage(store if store.exists() else store.parent).free
    if need > free - 2 * GiB:
        raise SystemExit(f"the store needs {need / GiB:.1f} GiB; only {free / GiB:.1f} GiB free at {store}")
    log(f"writing a synthetic store: {cfg.layers} layers x {cfg.experts} experts, {need / GiB:.2f} GiB")
    tic = time.perf_counter()
    write_synthetic_store(
        store,
        cfg.layers,
        cfg.experts,
        cfg.hidden,
        cfg.intermediate,
        k=cfg.k,
        seed=cfg.seed,
        threads=cfg.write_threads,
    )
    log(f"store written in {time.perf_counter() - tic:.1f}s")


def _run(store: Path, cfg: SyntheticConfig, experiments: set[str], built: bool, command: str) -> dict:
    manifest = read_manifest(store)
    first = manifest.layers[0]
    rb, E = first.record_bytes, first.num_experts
    if any(s.record_bytes != rb or s.num_experts != E for s in manifest.layers):
        raise SystemExit("the synthetic benchmark needs equal layers (one record size, one expert count)")
    budget = int(cfg.budget_frac * manifest.expert_bytes) // rb * rb
    batch = max(1, round(cfg.k * 0.7))
    setup = Setup(cfg, store, manifest, budget, batch, np.random.default_rng([cfg.seed, 99]))
    report: dict = {
        "mode": "synthetic",
        "command": command,
        "machine": machine_info(store),
        "load_average_start": os.getloadavg(),
    }
    report.update(_cold_start(setup, built))
    report["bandwidth"] = _bandwidths(setup)
    calibrated = _traces(setup, report)
    if "policies" in experiments:
        report["policies"] = _policy_rows(setup, *calibrated)
    runs = run_plan(setup, decode_plan(cfg, experiments, budget, rb))
    report["decode"] = runs
    if "prefill" in experiments:
        report["prefill"] = _prefill_rounds(setup)
    default = next((r for r in runs if r["name"] == DEFAULT_RUN), None)
    report["targets"], report["decisions"] = judge(report, default)
    report["invariants"] = invariants(report)
    return report


def _cold_start(setup: Setup, built: bool) -> dict:
    """Evict the store from the page cache; the store's and the cold start's sections."""
    store, manifest, cfg = setup.store, setup.manifest, setup.cfg
    evict_page_cache(store_files(store, manifest))
    dropped = drop_caches() if cfg.drop_caches else None
    out = {
        "store": {
            "path": str(store),
            "built_here": built,
            "layers": setup.layers,
            "experts_per_layer": setup.experts,
            "record_bytes": setup.record_bytes,
            "expert_bytes": manifest.expert_bytes,
            "budget_bytes": setup.budget,
            "budget_fraction": setup.budget / manifest.expert_bytes,
            "k": cfg.k,
        },
        "cold_start": {
            "posix_fadvise_dontneed": hasattr(os, "posix_fadvise"),
            "drop_caches": dropped,
            "resident_bytes_after_evict": store_resident_bytes(store, manifest),
            "reads": "O_DIRECT (our reader, bypass)",
        },
    }
    log(
        f"cold: resident after evict = {out['cold_start']['resident_bytes_after_evict']}, "
        f"drop_caches={dropped}"
    )
    return out


def _bandwidths(setup: Setup) -> dict:
    """The floor's two bandwidths at the start (each decode run re-measures the disk around it)."""
    cfg, L, E, rb = setup.cfg, setup.layers, setup.experts, setup.record_bytes
    n_disk = max(4 * cfg.k, min(L * E, int(cfg.disk_sample_bytes // rb)))
    keys = random_records(setup.rng, L, E, n_disk)
    disk = measure_disk(setup.store, setup.manifest, keys, setup.batch, cfg.io_threads)
    records = max(4, min(L * E, int(cfg.memory_sample_bytes // rb)))
    memory = measure_memory(setup.store, setup.manifest, records=records)
    setup.disk_bw, setup.mem_bw = disk["bytes_per_s"], memory["bytes_per_s"]
    log(
        f"bandwidth: disk {setup.disk_bw / 1e9:.2f} GB/s ({disk['records']} records, batch {setup.batch}), "
        f"memory {setup.mem_bw / 1e9:.2f} GB/s"
    )
    return {"disk": disk, "memory": memory}


def _traces(setup: Setup, report: dict) -> tuple[tr.TraceSpec, np.ndarray]:
    """The decode trace (and Belady on it) into ``setup``, the calibration trace's statistics into
    ``report``; returns the calibration trace (the policy study's)."""
    cfg = setup.cfg
    base = tr.TraceSpec(
        tokens=cfg.warmup + cfg.decode_tokens,
        layers=setup.layers,
        experts=setup.experts,
        k=cfg.k,
        seed=cfg.seed,
    )
    decode_trace = generate(base)
    calib_spec = replace(base, tokens=max(cfg.policy_tokens, 60), seed=cfg.seed + 1)
    calib_trace = generate(calib_spec)
    stats = tr.trace_stats(calib_trace, setup.experts)
    checks = tr.check_stats(stats)
    print(tr.format_stats(stats, checks), file=sys.stderr)
    report["trace"] = {
        "spec": calib_spec.to_dict(),
        "stats": stats,
        "checks": checks,
        "decode_trace": {"spec": base.to_dict(), "stats": tr.trace_stats(decode_trace, setup.experts)},
    }
    setup.base = base
    setup.traces[cfg.k] = decode_trace
    report["belady_decode_trace"] = setup.belady_for(cfg.k)
    return calib_spec, calib_trace


def _policy_rows(setup: Setup, calib_spec: tr.TraceSpec, calib_trace: np.ndarray) -> list[dict]:
    """The policy study: at the run's budget on the calibrated trace (and, unless
    ``quick_policies``, on an undispersed and a drifting one, and at 10% and 50% budgets)."""
    cfg, rb = setup.cfg, setup.record_bytes
    traces = {"calibrated": (calib_spec, calib_trace)}
    if not cfg.quick_policies:
        irm = replace(calib_spec, spread=0.0)
        drift = replace(calib_spec, drift=0.25, drift_every=128)
        traces["no-spread (spread=0)"] = (irm, generate(irm))
        traces["drifting (25% every 128 tok)"] = (drift, generate(drift))
    rows = policy_study(traces, rb, [cfg.budget_frac], cfg.half_lives, cfg.guard)
    if not cfg.quick_policies:
        other = [f for f in (0.10, 0.50) if f != cfg.budget_frac]
        rows += policy_study({"calibrated": traces["calibrated"]}, rb, other, [cfg.half_life], cfg.guard)
    return rows


def _prefill_rounds(setup: Setup) -> dict:
    """A prompt chunk layer-major against one raw pass; the best of ``repeats`` rounds."""
    cfg = setup.cfg
    log(f"prefill of {cfg.prefill_tokens} tokens ...")
    prompt = generate(replace(setup.base, tokens=cfg.prefill_tokens, seed=cfg.seed + 2))
    run = RunConfig("prefill", **shipped_options(cfg, setup.budget))
    rounds = [
        run_prefill(setup.store, setup.manifest, prompt, run, cfg.io_threads)
        for _ in range(max(1, cfg.repeats))
    ]
    best = min(rounds, key=lambda p: p["over_one_pass"])
    best["rounds_over_one_pass"] = [p["over_one_pass"] for p in rounds]
    log(
        f"  prefill {best['seconds']:.1f}s vs one pass {best['one_pass_seconds']:.1f}s"
        f" -> x{best['over_one_pass']:.2f}"
    )
    return best
