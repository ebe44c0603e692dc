#!/usr/bin/env python3
"""Qwen3.5-397B layers on one GPU: per-token decode time per component against the floor, and
host->device upload paths for expert bytes.

Builds N layers (default 8) of Qwen3.5-397B-A17B at their real shapes with mlx-lm's own model
class (``mlx_lm.models.qwen3_5_moe``: hidden 4096, 512 experts of intermediate 1024, top-10,
shared expert 1024, GatedDeltaNet layers with full attention every 4th, vocabulary 248,320) and
random weights (non-expert weights 4-bit, router and shared-expert gate 8-bit, like the
mlx-community checkpoints), writes the experts straight into a flashmoe store (random 4-bit
records with bf16 scales and biases, group 64: 7,077,888 bytes each, real CRC32s), installs the
project's streaming layer and cache (``install_streaming``, ``ExpertStreamer``, ``ExpertCache``),
and measures:

* upload paths for expert records held in host memory: ``mx.array`` per tensor (what
  ``ExpertReader`` does), one ``mx.array`` per record sliced into its tensors, one per layer
  batch, ``mx.from_dlpack``, and writing straight into MLX-owned memory; each checked byte for
  byte on the device and timed until its first use there;
* greedy decode with the project's ``ExpertReader`` and with a phased reader (disk reads, then
  the fastest correct upload path) so that time splits into router sync, I/O wait, upload,
  expert compute, attention/GatedDeltaNet and the rest (eval barriers around each part:
  "instrumented"; the same tokens again without barriers give the real speed);
* the floor: missed bytes / disk bandwidth + (resident + hit bytes) / memory bandwidth, both
  measured here (O_DIRECT reads of the store's records in layer-sized batches; a device
  reduction over cached experts), and the same plus missed bytes / best upload bandwidth (a
  discrete GPU adds that hop; Apple's unified memory does not);
* K=4 instead of the model's 10; decode with the grouped expert path (each expert computed as
  its read completes, no stack) instead of mlx-lm's ``gather_qmm`` over a stack; layer-major
  prefill of a prompt chunk against one raw pass over the experts it needs (split by barriers
  into its parts, per layer; run twice, cold kernels then warm); and the same layers with every
  expert in device memory (the mlx-lm speed ceiling), which also checks that the streamed layers
  compute the same logits.

Each decode run is repeated ``--runs`` times (default 2), each from a cold cache: its
``seconds_per_token`` is their median, with min, max and each run's in ``seconds_per_token_spread``.
The prefill runs ``--prefill-runs`` times; the first of a process also compiles kernels, so the
median and spread are of the later runs (``warm_seconds``).

On the GPU machine (with MLX's CUDA build; the setup is in bench/RESULTS.md), from the repository
root:

    python -m bench.h200_layers [--layers 8] [--workdir /tmp/h200] --json $OUT/h200.json

Tiny, on CPU (tests/bench/test_bench.py runs this): ``python -m bench.h200_layers --tiny``.
Prints the JSON report (and a summary of the headline figures on stderr); ``--json PATH`` also
writes it to PATH, and what is done so far to PATH's ``.partial.json`` after each step. The store
is deleted at the end unless ``--keep-store``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from bench import h200_timing as timing
from bench.h200_model import REAL, TINY, attach_store, build_model
from bench.h200_upload import PhasedReader, upload_study
from flashmoe_backend.bench.bandwidth import (
    cold_read,
    floor_per_token,
    measure_disk,
    random_records,
)
from flashmoe_backend.bench.pagecache import evict_page_cache, store_files
from flashmoe_backend.bench.replay import release_memory
from flashmoe_backend.bench.synthetic_store import expert_tensor_bytes, write_synthetic_store
from flashmoe_backend.experts.cache import DEFAULT_POLICY, ExpertCache
from flashmoe_backend.experts.grouped import ExpertPath
from flashmoe_backend.experts.reader import ExpertReader, ReaderConfig
from flashmoe_backend.experts.switch import ExpertStreamer, StreamCounters
from flashmoe_backend.store.format import Manifest

GiB = 1024**3


def log(msg: str) -> None:
    print(f"[h200 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spread(values: list[float]) -> dict:
    """A headline figure over its runs: the median, min, max and each run's value."""
    return {"runs": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values), "each": list(values)}


def spread_text(s: dict, scale: float = 1.0, digits: int = 1) -> str:
    """``spread`` in words: ``211.3 (min-max 209.0-214.1, 2 runs)``."""
    f = f"{{:.{digits}f}}"
    return (f"{f.format(s['median'] * scale)} (min-max {f.format(s['min'] * scale)}-"
            f"{f.format(s['max'] * scale)}, {s['runs']} run{'s' * (s['runs'] != 1)})")


# ---------------------------------------------------------------------------------------------
# Instrumented decode
# ---------------------------------------------------------------------------------------------


def decode(
    model,
    streamer: ExpertStreamer,
    prompt: list[int],
    warmup: int,
    tokens: int,
    instrumented: bool,
    drive: list[int] | None = None,
) -> dict:
    """Greedy decode from a cold cache; times the ``tokens`` after ``warmup``. ``drive`` feeds
    given tokens instead of the argmax (to compare two models on the same inputs)."""
    from mlx_lm.models.cache import make_prompt_cache

    timing.instrument(model, instrumented)
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[0, -1]
    tok = int(mx.argmax(logits).item())
    fed, kept_logits, seconds = [], [], []
    snap = None
    reader = streamer.reader
    for i in range(warmup + tokens):
        if i == warmup:
            snap = dict(
                calls=timing.mark(),
                sync=streamer.counters.sync_seconds,
                io=streamer.counters.io_seconds,
                rio=getattr(reader, "io_seconds", 0.0),
                up=getattr(reader, "upload_seconds", 0.0),
                hits=streamer.cache.counters.hits,
                misses=streamer.cache.counters.misses,
            )
        tok = drive[i] if drive is not None else tok
        fed.append(tok)
        tic = time.perf_counter()
        logits = model(mx.array([[tok]]), cache=cache)[0, -1]
        tok = int(mx.argmax(logits).item())
        seconds.append(time.perf_counter() - tic)
        if i < 4:
            kept_logits.append(np.array(logits.astype(mx.float32)))
    timing.instrument(model, False)
    total = sum(seconds[warmup:])
    c = streamer.cache.counters
    out = {
        "tokens": tokens,
        "warmup": warmup,
        "seconds_per_token": total / tokens,
        "fed": fed,
        "logits": kept_logits,
        "hits": c.hits - snap["hits"],
        "misses": c.misses - snap["misses"],
    }
    if instrumented:
        sync = streamer.counters.sync_seconds - snap["sync"]
        if isinstance(reader, PhasedReader):
            io, up = reader.io_seconds - snap["rio"], reader.upload_seconds - snap["up"]
        else:
            io, up = streamer.counters.io_seconds - snap["io"], 0.0
        spent = timing.since(snap["calls"])
        attn, moe = sum(spent["attention_gdn"]), sum(spent["moe"])
        parts = {
            "router_sync": sync,
            "io_wait": io,
            "upload": up,
            "expert_compute": max(0.0, moe - sync - io - up),
            "attention_gdn": attn,
        }
        parts["rest"] = max(0.0, total - sum(parts.values()))
        scale = total / sum(parts.values())  # exact sum (the max(0, .) clamps are tiny)
        out["components_seconds_per_token"] = {k: v * scale / tokens for k, v in parts.items()}
    return out


def combine(runs: list[dict]) -> dict:
    """Repeats of one decode run as one: ``seconds_per_token`` their median (``spread`` in
    ``seconds_per_token_spread``), the time split each part's median scaled to sum to it; the rest
    (tokens fed, logits, cache traffic: the same tokens every run) from the first run."""
    out = dict(runs[0])
    s = spread([r["seconds_per_token"] for r in runs])
    out.update(seconds_per_token=s["median"], seconds_per_token_spread=s)
    if "components_seconds_per_token" in out:
        parts = {k: statistics.median(r["components_seconds_per_token"][k] for r in runs)
                 for k in out["components_seconds_per_token"]}
        scale = s["median"] / (sum(parts.values()) or 1.0)
        out["components_seconds_per_token"] = {k: v * scale for k, v in parts.items()}
    return out


def summary(report: dict) -> list[str]:
    """The headline figures, one line each: decode ms/token and prefill seconds, with spreads."""
    lines = []
    for name, r in (report.get("decode_runs") or {}).items():
        if r:
            lines.append(f"decode {name}: {spread_text(r['seconds_per_token_spread'], 1e3)} ms/token, "
                         f"x{r['measured_over_floor']:.2f} floor")
    ref = report.get("in_memory")
    if ref:
        s = spread_text(ref["seconds_per_token_spread"], 1e3)
        lines.append(f"decode, all experts in memory: {s} ms/token")
    p = report.get("prefill")
    if p:
        line = f"prefill {p['prompt_tokens']} tokens: first run {p['first_run_seconds']:.2f} s"
        if "warm_seconds" in p:
            line += (f"; warm {spread_text(p['warm_seconds'], digits=2)} s, "
                     f"{spread_text(p['warm_over_one_pass'], digits=2)}x one pass")
        lines.append(line)
    return lines


def fresh(streamer: ExpertStreamer, reader, budget: int, policy: str, files) -> None:
    """A cold start: new reader and empty cache, store pages evicted."""
    old = streamer.reader
    if old is not reader:
        old.close()
    streamer.reader = reader
    streamer.cache = ExpertCache(budget, policy)
    streamer.counters = StreamCounters()
    evict_page_cache(files)
    release_memory()


def measure_device_memory(store: Path, manifest: Manifest, records: int, repeats: int = 5) -> dict:
    """Bandwidth of a device reduction over cached experts' bytes (the hit bytes' path), as one
    array: hundreds of small reductions would time kernel launches, not memory."""
    reader = ExpertReader(store, manifest, ReaderConfig(verify="never"))
    try:
        ws = reader.read(0, list(range(min(records, manifest.layers[0].num_experts))))
    finally:
        reader.close()
    flat = mx.concatenate([a.view(mx.uint8).reshape(-1) for w in ws for a in w.values()])
    mx.eval(flat, mx.max(flat))
    tic = time.perf_counter()
    for _ in range(repeats):
        mx.eval(mx.max(flat))
    seconds = time.perf_counter() - tic
    nbytes = repeats * flat.nbytes
    return {"bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / seconds, "records": len(ws)}


def floors(run: dict, rb: int, resident: int, disk_bw: float, mem_bw: float, up_bw: float | None) -> dict:
    n = run["tokens"]
    floor = floor_per_token(n, run["misses"] * rb, resident * n + run["hits"] * rb, disk_bw, mem_bw)
    out = {
        "floor_seconds_per_token": floor,
        "measured_over_floor": run["seconds_per_token"] / floor,
        "hit_rate": run["hits"] / max(1, run["hits"] + run["misses"]),
    }
    if up_bw:
        f2 = floor + run["misses"] * rb / up_bw / n
        out.update(
            floor_with_upload_seconds_per_token=f2,
            measured_over_floor_with_upload=run["seconds_per_token"] / f2,
        )
    return out


def full_experts(model, store: Path, manifest: Manifest, s: dict):
    """Every layer's experts stacked into a quantized SwitchGLU in device memory."""
    from mlx_lm.models.switch_layers import SwitchGLU

    reader = PhasedReader(store, manifest, "per_batch", 16)
    modules = []
    try:
        for i, spec in enumerate(manifest.layers):
            m = SwitchGLU(s["hidden"], s["intermediate"], s["experts"])
            nn.quantize(m, group_size=64, bits=4)
            # In slices: one upload of all 512 records is a single array past MLX's int32 shapes.
            ws = [w for lo in range(0, spec.num_experts, 64)
                  for w in reader.read(i, list(range(lo, min(lo + 64, spec.num_experts))))]
            m.update(tree_unflatten([(t.name, mx.stack([w[t.name] for w in ws])) for t in spec.tensors]))
            mx.eval(m.parameters())
            modules.append(m)
            del ws
    finally:
        reader.close()
    return modules


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, runs on CPU in seconds")
    p.add_argument("--layers", type=int, default=None, help="layers to build (default 8; 29 GB of experts)")
    p.add_argument("--tokens", type=int, default=None, help="decode tokens timed per run")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument(
        "--prefill", type=int, default=None, help="prompt tokens of the prefill measurement (0: skip)"
    )
    p.add_argument("--budget-frac", type=float, default=0.25)
    p.add_argument("--policy", default=DEFAULT_POLICY)
    p.add_argument("--io-threads", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "flashmoe-h200")
    p.add_argument("--keep-store", action="store_true")
    p.add_argument(
        "--no-reference", dest="reference", action="store_false", help="skip the all-experts-in-memory run"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=2,
                   help="repeats of each decode run, each from a cold cache (median and spread reported)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the report here (and what is done so far to PATH's .partial.json)")
    p.add_argument("--prefill-only", action="store_true", help="only write the store and measure prefill")
    p.add_argument("--prefill-runs", type=int, default=2,
                   help="prefill the prompt this many times (the first also compiles kernels)")
    p.add_argument("--stacked", action="store_true",
                   help="prefill with mlx-lm's gather_qmm over the stacked experts, never the grouped path")
    p.add_argument("--grouped-off-cuda", action="store_true",
                   help="let the grouped expert path run off CUDA too, by its rows rule (the tests, on CPU)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    s = dict(TINY if args.tiny else REAL)
    for key in ("layers", "tokens", "warmup", "prefill"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    started = time.perf_counter()
    report: dict = {
        "config": {
            **s,
            "tiny": args.tiny,
            "budget_frac": args.budget_frac,
            "policy": args.policy,
            "io_threads": args.io_threads,
            "stacked": args.stacked,
            "grouped_off_cuda": args.grouped_off_cuda,
            "runs": args.runs,
            "prefill_runs": args.prefill_runs,
        },
        "machine": {"device": str(mx.default_device()), "mlx": mx.__version__, "cpus": os.cpu_count()},
        "errors": {},
    }
    store = args.workdir / "store"
    if store.exists():
        shutil.rmtree(store)
    args.workdir.mkdir(parents=True, exist_ok=True)

    def step(name, fn):
        """Run one part; on the GPU machine keep going after a failure (recorded in the report)."""
        if args.prefill_only and name not in ("write_store", "prefill"):
            return None
        tic = time.perf_counter()
        try:
            return fn()
        except Exception as e:
            if args.tiny:
                raise
            report["errors"][name] = traceback.format_exc()
            log(f"{name} FAILED: {e!r}")
            return None
        finally:
            report.setdefault("step_seconds", {})[name] = time.perf_counter() - tic
            if args.json:  # what is done so far survives a run cut short
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.with_suffix(".partial.json").write_text(json.dumps(report, default=str))

    try:
        # -- model and store ------------------------------------------------------------------
        dtype = mx.bfloat16
        model = build_model(s, args.seed)
        need = s["layers"] * s["experts"] * expert_tensor_bytes(s["hidden"], s["intermediate"])
        free = shutil.disk_usage(args.workdir).free
        if need > free - 4 * GiB:
            raise SystemExit(
                f"{need / GiB:.1f} GiB of experts do not fit in {free / GiB:.1f} GiB free; "
                f"pass fewer --layers"
            )
        log(f"writing {s['layers']} layers x {s['experts']} experts = {need / GiB:.1f} GiB")
        manifest = step(
            "write_store",
            lambda: write_synthetic_store(
                store,
                s["layers"],
                s["experts"],
                s["hidden"],
                s["intermediate"],
                k=s["k"],
                seed=args.seed,
                threads=min(s["layers"], os.cpu_count() or 1),
            ),
        )
        files = store_files(store, manifest)
        rb = manifest.layers[0].record_bytes
        streamer, budget, resident = attach_store(model, store, manifest, args.budget_frac, args.policy,
                                                  args.io_threads, dtype)
        streamer.path = engine_path = ExpertPath(cuda_only=not args.grouped_off_cuda)
        report["store"] = {
            "expert_bytes": manifest.expert_bytes,
            "record_bytes": rb,
            "budget_bytes": budget,
            "resident_bytes_per_token": resident,
        }
        log(f"model ready: resident {resident / GiB:.2f} GiB/token, budget {budget / GiB:.2f} GiB")

        # -- bandwidths and upload paths -------------------------------------------------------
        rng = np.random.default_rng(args.seed)
        E, L = s["experts"], s["layers"]
        n_disk = min(L * E, max(8 * s["k"], int(3e9 // rb)))
        keys = random_records(rng, L, E, n_disk)
        disk = step(
            "disk",
            lambda: measure_disk(store, manifest, keys, max(1, round(0.7 * s["k"])), args.io_threads),
        )
        memory = step("memory", lambda: measure_device_memory(store, manifest, s["upload_records"] * 2))
        uploads = step("uploads", lambda: upload_study(store, manifest, s["upload_records"])) or []
        for row in uploads:
            result = (f"{row['to_first_use_gb_s']:.2f} GB/s to first use, ok={row['ok']}"
                      if "upload_gb_s" in row else row.get("error", ""))
            log(f"upload {row['method']}: {result}")
        report.update(disk=disk, memory=memory, upload_methods=uploads)
        good = [u for u in uploads if u.get("ok")]
        best = max(good, key=lambda u: u["to_first_use_gb_s"]) if good else None
        up_bw = best["to_first_use_gb_s"] * 1e9 if best else None
        if disk and memory:
            log(
                f"disk {disk['bytes_per_s'] / 1e9:.2f} GB/s, memory {memory['bytes_per_s'] / 1e9:.1f} GB/s, "
                f"best upload {best['method'] if best else None}"
            )
        prompt = rng.integers(0, s["vocab"], size=s["prompt"]).tolist()

        # -- decode runs ----------------------------------------------------------------------
        def run(name, reader, instrumented, k=None, drive=None, min_rows=None):
            """One decode run, ``--runs`` times from a cold cache (``combine``); ``min_rows``
            overrides the grouped path's rows-per-expert threshold (0: every call takes it, on CUDA)."""
            if k is not None:
                for layer in model.layers:
                    layer.mlp.top_k = k
            if min_rows is not None:
                streamer.path = replace(engine_path, min_rows_per_expert=min_rows)
            repeats = []
            try:
                for _ in range(args.runs):
                    fresh(streamer, reader, budget, args.policy, files)
                    with timing.recorded_choices(streamer) as choices:
                        r = decode(model, streamer, prompt, s["warmup"], s["tokens"], instrumented, drive)
                    r["grouped_calls"] = sum(choices["grouped"])
                    repeats.append(r)
            finally:
                streamer.path = engine_path
                for layer in model.layers:
                    layer.mlp.top_k = s["k"]
            r = combine(repeats)
            r.update(floors(r, rb, resident, disk["bytes_per_s"], memory["bytes_per_s"], up_bw))
            log(
                f"{name}: {spread_text(r['seconds_per_token_spread'], 1e3)} ms/token, "
                f"hit {r['hit_rate']:.3f}, x{r['measured_over_floor']:.2f} floor"
            )
            return r

        engine_cfg = ReaderConfig(args.io_threads)
        method = best["method"] if best else "per_tensor"
        runs = {}
        runs["engine_instrumented"] = step(
            "engine_instrumented",
            lambda: run("engine reader, instrumented", ExpertReader(store, manifest, engine_cfg), True),
        )
        runs["engine"] = step(
            "engine", lambda: run("engine reader", ExpertReader(store, manifest, engine_cfg), False)
        )
        runs["phased_instrumented"] = step(
            "phased_instrumented",
            lambda: run(
                f"phased reader ({method}), instrumented",
                PhasedReader(store, manifest, method, args.io_threads),
                True,
            ),
        )
        runs["phased"] = step(
            "phased",
            lambda: run(
                f"phased reader ({method})", PhasedReader(store, manifest, method, args.io_threads), False
            ),
        )
        runs["k4"] = step(
            "k4",
            lambda: run(
                "engine reader, K=4", ExpertReader(store, manifest, engine_cfg), False, k=min(4, s["k"])
            ),
        )
        runs["engine_grouped"] = step(
            "engine_grouped",
            lambda: run("engine reader, grouped path", ExpertReader(store, manifest, engine_cfg), False,
                        min_rows=0),
        )
        for r in runs.values():
            if r:
                r.pop("logits", None) if r is not runs.get("engine") else None
        report["decode"] = runs.get("phased_instrumented")
        report["decode_runs"] = {
            k: ({x: y for x, y in v.items() if x not in ("logits", "fed")} if v else None)
            for k, v in runs.items()
        }

        # -- prefill ---------------------------------------------------------------------------
        def prefill_once(ids: list[int]) -> dict:
            from mlx_lm.models.cache import make_prompt_cache

            fresh(streamer, ExpertReader(store, manifest, engine_cfg), budget, args.policy, files)
            calls = []  # each fetch's (layer, experts)
            before = timing.mark()
            with timing.hooked(streamer, on_fetch=lambda layer, experts: calls.append((layer, experts))):
                with timing.prefill_barriers(model, streamer) as choices:
                    tic = time.perf_counter()
                    mx.eval(model(mx.array(ids)[None], cache=make_prompt_cache(model)))
                    seconds = time.perf_counter() - tic
            per_layer = timing.since(before)
            c = streamer.counters
            parts = {"router_sync": c.sync_seconds, "io_wait_and_upload": c.io_seconds,
                     "expert_stack": sum(per_layer["stack"]),
                     "attention_gdn": sum(per_layer["attention_gdn"])}
            # the MoE block's barrier holds the router's sync, the fetch and the stack: the rest of it
            # is the experts' (and the shared expert's) compute
            moe_other = c.sync_seconds + c.io_seconds + parts["expert_stack"]
            parts["expert_compute"] = max(0.0, sum(per_layer["moe"]) - moe_other)
            parts["rest"] = max(0.0, seconds - sum(parts.values()))
            union = {}
            for layer, experts in calls:
                union.setdefault(layer, set()).update(experts)
            batches = [[(layer, e) for e in sorted(es)] for layer, es in union.items()]
            nbytes, one_pass, _ = cold_read(store, manifest, batches, args.io_threads)
            return {
                "prompt_tokens": len(ids),
                "seconds": seconds,
                "io_seconds": c.io_seconds,
                "sync_seconds": c.sync_seconds,
                "experts_needed": sum(map(len, union.values())),
                "groups": len(calls),
                "bytes_needed": nbytes,
                "one_pass_seconds": one_pass,
                "over_one_pass": seconds / one_pass,
                "components_seconds": parts,
                "per_layer_seconds": {"attention_gdn": per_layer["attention_gdn"], "moe": per_layer["moe"]},
                "grouped_expert_calls": sum(choices["grouped"]),
                "expert_calls": len(choices["grouped"]),
                "gated_delta_paths": choices["gated_delta"],
            }

        def prefill() -> dict:
            """The same prompt ``--prefill-runs`` times, each from a cold expert cache: the first
            run also pays each kernel's first use (MLX compiles CUDA kernels on first use), so the
            median and spread (``warm_seconds``, ``warm_over_one_pass``) are of the later runs."""
            ids = rng.integers(0, s["vocab"], size=s["prefill"]).tolist()
            if args.stacked:
                streamer.path = replace(engine_path, grouped=False)
            try:
                runs = [prefill_once(ids) for _ in range(args.prefill_runs)]
            finally:
                streamer.path = engine_path
            out = {**runs[-1], "runs": runs, "first_run_seconds": runs[0]["seconds"]}
            if len(runs) > 1:
                out["warm_seconds"] = spread([r["seconds"] for r in runs[1:]])
                out["warm_over_one_pass"] = spread([r["over_one_pass"] for r in runs[1:]])
            return out

        if s["prefill"]:
            report["prefill"] = step("prefill", prefill)

        # -- every expert in device memory: the speed ceiling, and the same logits -------------
        if args.reference and runs.get("engine"):

            def reference():
                fresh(streamer, ExpertReader(store, manifest, engine_cfg), budget, args.policy, files)
                streaming = [layer.mlp.switch_mlp for layer in model.layers]
                full = full_experts(model, store, manifest, s)
                try:
                    for layer, m in zip(model.layers, full, strict=True):
                        layer.mlp.switch_mlp = m
                    fed = runs["engine"]["fed"]
                    ref = combine([decode(model, streamer, prompt, s["warmup"], s["tokens"], False, fed)
                                   for _ in range(args.runs)])
                finally:
                    for layer, m in zip(model.layers, streaming, strict=True):
                        layer.mlp.switch_mlp = m
                diffs = [
                    float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6))
                    for a, b in zip(runs["engine"]["logits"], ref["logits"], strict=False)
                ]
                return {
                    "seconds_per_token": ref["seconds_per_token"],
                    "seconds_per_token_spread": ref["seconds_per_token_spread"],
                    "max_relative_logit_diff": max(diffs),
                    "streaming_over_in_memory": runs["engine"]["seconds_per_token"]
                    / ref["seconds_per_token"],
                }

            report["in_memory"] = step("in_memory", reference)
        engine_run = runs.get("engine")
        if engine_run:
            engine_run.pop("logits", None)
            report["decode_runs"]["engine"] = {x: y for x, y in engine_run.items() if x != "fed"}
        ref = report.get("in_memory") or {}
        report["checks"] = {
            "outputs_match_in_memory_reference": bool(ref) and ref["max_relative_logit_diff"] < 2e-2,
            "within_budget": streamer.cache.counters.bytes_peak <= budget,
        }
        if report["decode"]:
            report["decode"] = {x: y for x, y in report["decode"].items() if x not in ("logits", "fed")}
    finally:
        if not args.keep_store:
            shutil.rmtree(store, ignore_errors=True)
    report["total_seconds"] = time.perf_counter() - started
    text = json.dumps(report, indent=1, default=str)
    print(text)
    for line in summary(report):
        log(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return json.loads(text)


if __name__ == "__main__":
    main()
