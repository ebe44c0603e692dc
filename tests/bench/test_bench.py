"""The benchmark harness at tiny size: structure and invariants of its reports, never speed.

The full-size runs and their numbers are in bench/RESULTS.md.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from flashmoe_backend import bench
from flashmoe_backend.bench import pagecache, policies
from flashmoe_backend.bench import trace as tr
from flashmoe_backend.bench.synthetic_store import synthetic_manifest, write_synthetic_store
from flashmoe_backend.experts.cache import ExpertCache
from flashmoe_backend.store.format import StoreError, read_manifest

ROOT = Path(__file__).resolve().parents[2]


# -- the routing trace ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated():
    spec = tr.TraceSpec(tokens=1536, layers=3, seed=3)
    return spec, tr.generate_trace(spec)


def test_trace_shape_and_determinism(calibrated):
    spec, trace = calibrated
    assert trace.shape == (spec.tokens, spec.layers, spec.k)
    assert trace.min() >= 0 and trace.max() < spec.experts
    # distinct experts within each (token, layer) row, sorted
    assert (np.diff(trace, axis=2) > 0).all()
    small = tr.TraceSpec(tokens=50, layers=2, seed=9)
    assert np.array_equal(tr.generate_trace(small), tr.generate_trace(small))
    assert not np.array_equal(tr.generate_trace(small), tr.generate_trace(tr.TraceSpec(50, 2, seed=10)))


def test_trace_statistics_match_the_calibration_targets(calibrated):
    spec, trace = calibrated
    stats = tr.trace_stats(trace, spec.experts)
    checks = tr.check_stats(stats)
    assert all(c["ok"] for c in checks.values()), tr.format_stats(stats, checks)
    # the published repeat rate caps the 30-token coverage: the generator comes within 2 points
    assert stats["window30_coverage_bound"] == pytest.approx(0.419, abs=0.005)
    assert stats["window30_coverage"] > stats["window30_coverage_bound"] - 0.02


def test_independent_draws_undercover_the_window():
    """Why the generator spreads: without it the 30-token coverage falls far short."""
    spec = tr.TraceSpec(tokens=600, layers=2, seed=1, spread=0.0)
    stats = tr.trace_stats(tr.generate_trace(spec), spec.experts)
    assert tr.check_stats(stats)["window30_coverage"]["ok"] is False


def test_belady_textbook_example():
    # 3 frames, 1 2 3 4 1 2 5 1 2 3 4 5: the optimal policy faults 7 times
    steps = [(0, [e]) for e in (1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5)]
    result = tr.belady(steps, capacity=3)
    assert result["misses"] == 7 and result["hits"] == 5


def test_belady_bounds_every_policy():
    spec = tr.TraceSpec(tokens=200, layers=2, experts=64, k=6, seed=2, spread=0.3)
    steps = list(tr.decode_steps(tr.generate_trace(spec)))
    manifest = synthetic_manifest(2, 64, 4096)
    for capacity in (12, 32, 64):
        best = tr.belady(steps, capacity)["hit_rate"]
        rates = {}
        for name, policy, options in (
            ("lru", "lru", {}), ("lfu", "lfu", {}), ("lfu-inf", "lfu", {"half_life": math.inf, "guard": 6}),
            ("oracle-popularity", policies.OraclePolicy(policies.layer_log_popularity(spec), 6), {}),
            ("oracle-generator", policies.GeneratorOracle(spec), {}),
        ):
            got = policies.simulate(steps, manifest, capacity * 4096, policy, **options)
            assert got["hit_rate"] <= best + 1e-12
            assert got["bytes_peak"] <= capacity * 4096
            assert got["bytes_read"] == got["misses"] * 4096
            rates[name] = got["hit_rate"]
        if capacity > 2 * spec.k:  # room beyond the current token's experts: knowing the generator helps
            assert rates["oracle-generator"] > rates["lru"], capacity


# -- cache policies ---------------------------------------------------------------------------


def test_lfu_evicts_the_least_used_outside_the_guard():
    cache = ExpertCache(3 * 10, "lfu", half_life=math.inf, guard=0)
    for key in [(0, 1), (0, 1), (0, 1), (0, 2), (0, 2), (0, 3)]:
        if cache.lookup(key) is None:
            cache.insert(key, "w", 10)
    cache.insert((0, 4), "w", 10)  # no guard: (0, 3), used once, goes first
    assert (0, 3) not in cache and (0, 1) in cache and (0, 2) in cache and (0, 4) in cache


def test_lfu_guard_keeps_the_previous_tokens_experts():
    # plain LFU would evict the new expert (count 1) first; the guard protects it
    cache = ExpertCache(2 * 10, "lfu", half_life=math.inf, guard=2)
    for _ in range(5):
        cache.lookup((0, 1)) or cache.insert((0, 1), "w", 10)
    cache.lookup((0, 2)) or cache.insert((0, 2), "w", 10)
    cache.insert((0, 3), "w", 10)
    assert (0, 2) in cache and (0, 1) not in cache


def test_pinned_entries_are_never_evicted():
    for policy in ("lru", "lfu"):
        cache = ExpertCache(2 * 10, policy)
        cache.insert((0, 1), "a", 10)
        cache.insert((0, 2), "b", 10)
        cache.pin([(0, 1), (0, 2)])
        with pytest.raises(MemoryError):
            cache.insert((0, 3), "c", 10)
        cache.unpin_all()
        cache.pin([(0, 1)])
        cache.insert((0, 3), "c", 10)
        assert (0, 1) in cache and (0, 2) not in cache
        assert cache.bytes <= cache.budget_bytes


def test_lfu_evictions_cost_about_what_lru_evictions_cost():
    """No sort per eviction: LFU stays within a small factor of LRU on 30k accesses (a sort of the
    512 entries on every eviction would be ~100x slower)."""
    import time

    keys = [(e % 8, e) for e in np.random.default_rng(0).integers(0, 4096, size=30_000).tolist()]
    seconds = {}
    for policy in ("lru", "lfu"):
        cache = ExpertCache(512, policy)
        tic = time.perf_counter()
        for key in keys:
            if cache.lookup(key) is None:
                cache.insert(key, None, 1)
        seconds[policy] = time.perf_counter() - tic
        assert len(cache) == 512 and cache.counters.evictions > 20_000
    assert seconds["lfu"] < 6 * seconds["lru"], seconds


# -- the synthetic store ----------------------------------------------------------------------


def test_synthetic_store_is_a_real_store(tmp_path):
    from flashmoe_backend.experts.reader import ExpertReader, ReaderConfig

    manifest = write_synthetic_store(tmp_path / "s", layers=2, experts=8, hidden=128, intermediate=64)
    assert read_manifest(tmp_path / "s").to_json() == manifest.to_json()
    layer = manifest.layers[0]
    assert layer.record_bytes % 4096 == 0 and len(layer.checksums) == 8
    assert {t.name: t.shape for t in layer.tensors}["down_proj.weight"] == (128, 8)
    reader = ExpertReader(tmp_path / "s", manifest, ReaderConfig(verify="always"))
    try:
        (weights,) = reader.read(1, [5])
        assert str(weights["gate_proj.scales"].dtype) == "mlx.core.bfloat16"
        scales = np.asarray(weights["gate_proj.scales"].astype(__import__("mlx.core").core.float32))
        assert np.isfinite(scales).all() and (np.abs(scales) < 2**-5).all()
    finally:
        reader.close()
    path = tmp_path / "s" / layer.file
    data = bytearray(path.read_bytes())
    data[layer.record_bytes * 3 + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = ExpertReader(tmp_path / "s", manifest, ReaderConfig(verify="always"))
    try:
        with pytest.raises(StoreError, match="checksum"):
            reader.read(0, [3])
    finally:
        reader.close()


def test_page_cache_budget_holds_the_store_pages(tmp_path):
    manifest = write_synthetic_store(tmp_path / "s", layers=1, experts=16, hidden=128, intermediate=64)
    store, rb = tmp_path / "s", manifest.layers[0].record_bytes
    pagecache.evict_page_cache(pagecache.store_files(store, manifest))
    limit = pagecache.PageCacheBudget(store, manifest, budget_bytes=4 * rb)
    with open(store / manifest.layers[0].file, "rb") as f:
        for e in range(16):
            f.seek(e * rb)
            f.read(rb)
            limit.access(0, [e])
    limit.close()
    resident = pagecache.store_resident_bytes(store, manifest)
    if resident is not None:  # Linux
        assert resident <= 4 * rb
    assert limit.misses == 16 and limit.hits == 0


# -- the whole synthetic benchmark, tiny --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench.main(
        [
            "synthetic",
            "--tiny",
            "--store",
            str(out / "store"),
            "--out",
            str(out / "r.json"),
            "--markdown",
            str(out / "r.md"),
        ]
    )
    return json.loads((out / "r.json").read_text()), (out / "r.md").read_text(), out


def test_tiny_synthetic_report_structure(tiny_report):
    report, markdown, out = tiny_report
    assert not (out / "store").exists(), "a store the run built is deleted unless --keep-store"
    for key in (
        "machine",
        "store",
        "cold_start",
        "bandwidth",
        "trace",
        "policies",
        "decode",
        "prefill",
        "targets",
        "decisions",
        "invariants",
    ):
        assert key in report, key
    assert report["bandwidth"]["disk"]["bytes_per_s"] > 0 and report["bandwidth"]["memory"]["bytes_per_s"] > 0
    names = [r["name"] for r in report["decode"]]
    assert any(n.startswith("lru") for n in names) and any("(default)" in n for n in names)
    assert any(n.startswith("mmap") for n in names) and any(n.startswith("OS page cache") for n in names)
    assert any(n.startswith("K=4") for n in names) and any(n.startswith("prefetch") for n in names)
    for r in report["decode"]:
        assert r["seconds_per_token"] > 0 and r["floor_seconds_per_token"] > 0
        shares = [v for v in r["time_shares"].values() if v is not None]
        assert all(0 <= v <= 1.0 + 1e-9 for v in shares)
    assert set(report["targets"]) == set(bench.TARGETS)
    # the most an online policy could reach: the better of the two oracles at the target's budget
    oracles = [r["over_belady"] for r in report["policies"] if r["policy"].startswith("oracle")
               and r["trace"] == "calibrated" and r["budget_fraction"] == 0.25]
    assert len(oracles) == 2
    assert report["targets"]["hit_rate_over_belady"]["online_reference_over_belady"] == max(oracles)
    assert set(report["decisions"]) == {"default_policy", "page_cache", "prefetch"}
    for section in ("Routing trace", "Cache policies vs Belady", "Decode", "Prefill", "Targets"):
        assert section in markdown


def test_tiny_synthetic_report_invariants(tiny_report):
    report, _, _ = tiny_report
    failed = {name: checks for name, checks in report["invariants"].items() if not all(checks.values())}
    assert not failed
    budget = report["store"]["budget_bytes"]
    for r in report["decode"]:
        if "counters" in r:  # runs through our reader and cache
            assert r["own_cache_bytes_peak"] <= r["config"]["budget_bytes"] <= budget
            if r["config"]["prefetch_recall"] is None:
                assert r["hit_rate_all_tokens"] <= r["belady_hit_rate_all_tokens"] + 1e-12
    for row in report["policies"]:
        assert row["hit_rate"] <= row["belady_hit_rate"] + 1e-12
    p = report["prefill"]
    assert p["bytes_read"] == p["experts_needed"] * report["store"]["record_bytes"]  # once per chunk
    assert p["seconds"] > 0 and p["one_pass_seconds"] > 0


# -- real-model mode, on the embedded demo store ------------------------------------------------


def test_model_mode_tiny(tmp_path):
    from flashmoe_backend.store.source import default_store

    bench.main(
        [
            "model",
            str(default_store()),
            "--prompt-tokens",
            "40",
            "--max-tokens",
            "6",
            "--prefill-step",
            "16",
            "--out",
            str(tmp_path / "m.json"),
            "--markdown",
            str(tmp_path / "m.md"),
        ]
    )
    report = json.loads((tmp_path / "m.json").read_text())
    assert [r["k"] for r in report["runs"]] == ["model's own", 4]
    for r in report["runs"]:
        assert all(r["consistent"].values()), r["consistent"]
        assert r["hit_rate_all"] <= r["belady_hit_rate_all"] + 1e-12
        assert r["floor_seconds_per_token"] > 0 and r["decode_tokens_per_s"] > 0 and r["prefill_seconds"] > 0
        assert r["engine_stats"]["prompt_tokens"] == 40
        assert 0 <= r["time_shares"]["io_wait"] <= 1 and 0 <= r["time_shares"]["router_sync"] <= 1
    assert report["mlx_lm_in_memory"]["generation_tps"] > 0
    assert "decode tok/s" in (tmp_path / "m.md").read_text()


# -- the H200 script, tiny on CPU ---------------------------------------------------------------


def _load_script(name: str):
    """A bench script, imported as ``python -m bench.NAME`` runs it."""
    return importlib.import_module(f"bench.{name}")


def _check_spread(s: dict, runs: int, median: float | None = None) -> None:
    """A headline figure's median over its runs, with the min-max spread and each run's value."""
    assert s["runs"] == runs == len(s["each"])
    assert s["min"] == min(s["each"]) <= s["median"] <= s["max"] == max(s["each"])
    if median is not None:
        assert s["median"] == median


def test_h200_layers_tiny(tmp_path):
    script = _load_script("h200_layers")
    out = tmp_path / "out" / "h200.json"
    # --grouped-off-cuda: CUDA's expert paths, on CPU
    report = script.main(["--tiny", "--grouped-off-cuda", "--workdir", str(tmp_path / "work"),
                          "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["config"]["tiny"] is True and saved == json.loads(json.dumps(report, default=str))
    assert (tmp_path / "out" / "h200.partial.json").exists()  # written after each step
    # each decode run --runs (default 2) times: the median, its spread and each run's
    assert report["config"]["runs"] == 2
    for r in report["decode_runs"].values():
        _check_spread(r["seconds_per_token_spread"], 2, r["seconds_per_token"])
    ref = report["in_memory"]
    _check_spread(ref["seconds_per_token_spread"], 2, ref["seconds_per_token"])
    assert all(line.startswith(("decode", "prefill")) for line in script.summary(report))
    decode = report["decode"]
    assert decode["tokens"] > 0 and decode["seconds_per_token"] > 0 and decode["floor_seconds_per_token"] > 0
    parts = decode["components_seconds_per_token"]
    for name in ("router_sync", "io_wait", "upload", "expert_compute", "attention_gdn", "rest"):
        assert parts[name] >= 0, name
    assert sum(parts.values()) == pytest.approx(decode["seconds_per_token"], rel=1e-6)
    assert report["upload_methods"] and all(m["ok"] is not None for m in report["upload_methods"])
    assert report["checks"]["outputs_match_in_memory_reference"]
    assert not (tmp_path / "work" / "store").exists()
    # decode: one row per expert keeps gather_qmm, unless the grouped run lowers the threshold;
    # the same tokens either way, so the same cache traffic
    runs = report["decode_runs"]
    assert runs["engine"]["grouped_calls"] == 0 < runs["engine_grouped"]["grouped_calls"]
    assert (runs["engine_grouped"]["hits"], runs["engine_grouped"]["misses"]) == (
        runs["engine"]["hits"], runs["engine"]["misses"])


def test_h200_prefill_tiny(tmp_path):
    script = _load_script("h200_prefill")
    report = script.main(["--tiny", "--reps", "2", "--json", str(tmp_path / "h200_prefill.json")])
    recurrence = report["recurrence"]
    assert set(recurrence) == {"mlx_lm_ops", "chunked"}  # no CUDA here
    assert recurrence["chunked"]["max_abs_diff_y"] < 1e-5
    assert recurrence["chunked"]["max_abs_diff_state"] < 1e-5
    layers = report["layers"]
    assert layers["experts_grouped_max_abs_diff"] < 1e-4
    for name in ("gdn_layer_mlx_lm", "gdn_layer_fast", "attention_layer", "router_topk", "experts",
                 "experts_grouped", "shared_expert", "moe_block", "experts_floor"):
        assert layers[name] > 0, name
    saved = json.loads((tmp_path / "h200_prefill.json").read_text())
    assert saved["config"]["tokens"] == 24 and saved == json.loads(json.dumps(report))
    # each part: the median of its warm runs, with their spread
    spreads = report["warm_spread_seconds"]
    for name, r in recurrence.items():
        _check_spread(spreads[f"recurrence_{name}"], 2, r["seconds"])
    for name in ("gdn_layer_fast", "experts_grouped", "moe_block"):
        _check_spread(spreads[name], 2, layers[name])
    # each part's first (compiling) run is kept apart from the warm median
    assert set(report["first_run_seconds"]) >= {"gdn_layer_fast", "experts_grouped", "recurrence_chunked"}
    markdown = (tmp_path / "h200_prefill.md").read_text()
    assert markdown.startswith("Prefill of 24 tokens") and "| min-max (runs) |" in markdown


def test_h200_layers_prefill_only_tiny(tmp_path):
    script = _load_script("h200_layers")
    report = script.main(["--tiny", "--prefill-only", "--workdir", str(tmp_path / "work")])
    assert report["prefill"]["prompt_tokens"] == 24 and report["prefill"]["seconds"] > 0
    assert set(report["step_seconds"]) == {"write_store", "prefill"}  # the rest skipped
    assert report.get("decode") is None and not report["errors"]
    parts = report["prefill"]["components_seconds"]
    assert set(parts) == {"router_sync", "io_wait_and_upload", "expert_stack", "attention_gdn",
                          "expert_compute", "rest"}
    assert parts["attention_gdn"] > 0 and parts["expert_compute"] > 0
    assert sum(parts.values()) == pytest.approx(report["prefill"]["seconds"], rel=0.05)
    # one expert call per layer; the grouped path is CUDA's only
    assert report["prefill"]["expert_calls"] == 4 and report["prefill"]["grouped_expert_calls"] == 0
    assert len(report["prefill"]["runs"]) == 2 and len(report["prefill"]["per_layer_seconds"]["moe"]) == 4
    # the first run (compiles kernels on CUDA) apart; median and spread of the later ones
    runs = report["prefill"]["runs"]
    assert report["prefill"]["first_run_seconds"] == runs[0]["seconds"]
    _check_spread(report["prefill"]["warm_seconds"], 1, runs[1]["seconds"])
    _check_spread(report["prefill"]["warm_over_one_pass"], 1, runs[1]["over_one_pass"])
    # the three GatedDeltaNet layers take the fast recurrence (on CPU: the chunked form)
    assert report["prefill"]["gated_delta_paths"] == ["chunked"] * 3


def test_h200_layers_prefill_grouped_and_stacked_tiny(tmp_path):
    script = _load_script("h200_layers")
    runs = {}
    for flag in ([], ["--stacked"]):
        argv = ["--tiny", "--prefill-only", "--prefill", "64", "--prefill-runs", "1",
                "--grouped-off-cuda", "--workdir", str(tmp_path / "work"), *flag]  # CUDA's path, on CPU
        runs["stacked" if flag else "grouped"] = script.main(argv)["prefill"]
    grouped, stacked = runs["grouped"], runs["stacked"]
    assert grouped["grouped_expert_calls"] == 4 and stacked["grouped_expert_calls"] == 0
    # the same experts read either way; only the stacked path copies them into a stack
    assert grouped["experts_needed"] == stacked["experts_needed"] > 0
    assert grouped["components_seconds"]["expert_stack"] == 0 < stacked["components_seconds"]["expert_stack"]


def test_h200_probe_tiny(tmp_path):
    script = _load_script("h200_probe")
    out = tmp_path / "probe.json"
    report = script.main(["--tiny", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    stages = report["stages"]
    assert list(stages) == ["1_fresh", "2_after_read", "3_after_free", "4_after_clear_cache",
                            "5_prefill", "5_prefill_parts_after", "5_prefill_warm"]
    for name in ("gdn", "router", "shared_expert", "attention"):
        part = stages["1_fresh"][name]
        assert part["first"] > 0 and part["warm"] > 0, name
        _check_spread(part["warm_spread"], 3, part["warm"])
    # --runs (default 2) whole prefills after the first: their median and spread
    warm = stages["5_prefill_warm"]
    _check_spread(warm["seconds"], 2)
    assert warm["seconds"]["each"] == [r["seconds"] for r in warm["runs"]]
    assert stages["5_prefill"]["choices"]["gated_delta"] == ["chunked"] * 3
    assert len(stages["5_prefill"]["per_layer"]["moe"]) == 4
    saved = json.loads(out.read_text())
    assert saved["stages"].keys() == stages.keys() and saved["config"]["runs"] == 2


def test_router_recall_recomputes_the_engines_own_routing():
    from flashmoe_backend import FlashMoE
    from flashmoe_backend.bench.router_recall import moe_layers, next_layer_recall, record_states, routed
    from flashmoe_backend.store.source import default_store

    engine = FlashMoE.load(default_store(), cache_gb=1.0)
    fetched = []
    engine.streamer.hooks.on_fetch = lambda layer, es: fetched.append(set(es))
    with record_states(engine.model) as passes:
        engine.generate("Who sold the bicycle?", max_tokens=6, temperature=0.0)
    layers = len(moe_layers(engine.model))
    assert len(passes) >= 3 and all(len(p["h"]) == len(p["x"]) == layers for p in passes)
    # each decode pass (after the prompt's) routes exactly what the streaming layers fetched
    decode = passes[1:]
    tail = fetched[len(fetched) - len(decode) * layers:]
    assert routed(engine.model, decode) == [tail[i:i + layers] for i in range(0, len(tail), layers)]
    report = next_layer_recall(engine.model, [passes])
    assert report["chance"] == 4 / 32 and report["layer_pairs"] == layers - 1
    assert all(0.0 <= r <= 1.0 for r in report["recall"].values())
    # the model's recorded state is restored
    assert all(not hasattr(layer.input_layernorm, "inner") for layer in engine.model.layers)


def test_prefetch_recall_script_on_the_demo_model(tmp_path):
    script = _load_script("prefetch_recall")
    report = script.main(["--n", "1", "--max-tokens", "4", "--json", str(tmp_path / "r.json")])
    assert report["prompts"] == 4 and report["sequences"] == 4  # one held-out prompt per demo task
    assert set(report["recall"]) == {"layer_ahead", "attention_ahead", "previous_token"}
    assert json.loads((tmp_path / "r.json").read_text()) == report


def test_inplace_tiny(tmp_path):
    """Issue 18's benchmark at tiny size: both layouts hold the same experts, the same trace
    gives the same hits, and the report has its headline figures."""
    report = _load_script("inplace").main(
        ["--tiny", "--layers", "4", "--tokens", "6", "--warmup", "2", "--runs", "2",
         "--work", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")]
    )
    assert report["same_expert_bytes"] is True
    assert report["hit_rate"]["packed"] == report["hit_rate"]["in_place"]
    assert report["ms_per_token"]["in_place"]["runs"] == 2 and report["in_place_speed_vs_packed"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["checkpoint_shards"] >= 1
