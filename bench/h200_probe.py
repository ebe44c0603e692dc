#!/usr/bin/env python3
"""Why is the end-to-end prefill on the H200 far slower than its parts? A probe.

``h200_layers.py --prefill-only`` takes ~190 s for 2,048 tokens through 4 real-shape layers,
while ``h200_prefill.py`` times the same parts alone at milliseconds. This script times the parts
*on the end-to-end model itself*, at each stage of what the prefill does to the process:

1. fresh: the model's own GatedDeltaNet / attention / router / shared expert on a device-made
   input;
2. after reading one layer's experts with the engine's reader (host-written MLX arrays), stacking
   them and computing them with the grouped path;
3. after those arrays are freed (their buffers go back to MLX's buffer cache);
4. after ``mx.clear_cache()``;
5. a whole prefill with per-layer barriers, then the parts again, then ``--runs`` more whole
   prefills (default 2: ``5_prefill_warm``, their median seconds with min, max and each run's);

and samples the process's CPU time (user / system) and the main thread's Python frame every
second, so a slow stretch can be told apart as GPU work, host work or kernel (system) work.
Each part's warm time is the median of 3 runs, with their spread (``warm_spread``).

    python -m bench.h200_probe --json $OUT/h200_probe.json   # on the GPU machine
    python -m bench.h200_probe --tiny                        # CPU, seconds

``--json PATH`` writes the report there, after each stage too (a run cut short keeps what it did).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

from bench import h200_model as real
from bench import h200_timing as timing
from bench.h200_layers import spread, spread_text
from flashmoe_backend.bench.synthetic_store import write_synthetic_store
from flashmoe_backend.experts.cache import ExpertCache
from flashmoe_backend.experts.grouped import grouped_switch
from flashmoe_backend.experts.switch import StreamCounters, stack_experts

REPORT: dict = {"stages": {}, "samples": []}
T0 = time.perf_counter()
JSON: Path | None = None  # --json: where REPORT is written, after each stage


def log(msg: str) -> None:
    print(f"[probe {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def memory() -> dict:
    return {"active_gb": mx.get_active_memory() / 1e9, "cache_gb": mx.get_cache_memory() / 1e9}


def timed(fn, reps: int = 3) -> dict:
    """First (cold) and median warm seconds of ``fn()`` evaluated (their ``spread`` in
    ``warm_spread``), with the first run's CPU time."""
    c0, tic = os.times(), time.perf_counter()
    mx.eval(fn())
    first, c1 = time.perf_counter() - tic, os.times()
    out = {"first": first, "first_user": c1.user - c0.user, "first_sys": c1.system - c0.system}
    if first < 5.0 and reps:
        warm = []
        for _ in range(reps):
            tic = time.perf_counter()
            mx.eval(fn())
            warm.append(time.perf_counter() - tic)
        out["warm"] = statistics.median(warm)
        out["warm_spread"] = spread(warm)
    return out


def sampler(stop: threading.Event, main_id: int) -> None:
    """Every second: CPU user/system seconds spent since the last sample, and the main
    thread's innermost project frame."""
    last = os.times()
    while not stop.wait(1.0):
        now = os.times()
        frame, where = sys._current_frames().get(main_id), "?"
        while frame is not None:
            code = frame.f_code
            if "site-packages" not in code.co_filename and "/tmp/site" not in code.co_filename:
                where = f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}"
                break
            frame = frame.f_back
        REPORT["samples"].append({
            "t": round(time.perf_counter() - T0, 1),
            "user": round(now.user - last.user, 2),
            "sys": round(now.system - last.system, 2),
            "where": where,
        })
        last = now


def parts(model, x: mx.array, s: dict) -> dict:
    """The model's own parts, each alone, on input ``x``."""
    lm = model
    gdn_layer = next(i for i, layer in enumerate(lm.layers) if layer.is_linear)
    attn_layer = next((i for i, layer in enumerate(lm.layers) if not layer.is_linear), None)
    block = lm.layers[gdn_layer].mlp
    k = s["k"]

    def route():
        gates = mx.softmax(block.gate(x), axis=-1, precise=True)
        return mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]

    out = {"gdn": timed(lambda: lm.layers[gdn_layer].linear_attn(x, None, ArraysCache(size=2))),
           "router": timed(route), "shared_expert": timed(lambda: block.shared_expert(x))}
    if attn_layer is not None:
        out["attention"] = timed(lambda: lm.layers[attn_layer].self_attn(x, "causal", KVCache()))
    out["memory"] = memory()
    return out


def save() -> None:
    if JSON:
        JSON.parent.mkdir(parents=True, exist_ok=True)
        JSON.write_text(json.dumps(REPORT, indent=1, default=str))


def stage(name: str, result: dict) -> None:
    REPORT["stages"][name] = result
    brief = {k: (round(v["first"], 4), round(v.get("warm", -1), 4)) for k, v in result.items()
             if isinstance(v, dict) and "first" in v}
    log(f"{name}: {brief} {result.get('memory', '')}")
    save()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prefill", type=int, default=None)
    p.add_argument("--cache-limit-gb", type=float, default=None,
                   help="mx.set_cache_limit before the second prefill (a candidate fix)")
    p.add_argument("--runs", type=int, default=2,
                   help="whole prefills after each stage's first (which compiles): their median and spread")
    p.add_argument("--json", type=Path, default=None, help="write the report here (after each stage too)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "flashmoe-probe")
    args = p.parse_args(argv)
    global JSON
    JSON = args.json
    s = dict(real.TINY if args.tiny else real.REAL)
    s["layers"] = args.layers
    tokens = args.prefill or s["prefill"]
    dtype = mx.float32 if args.tiny else mx.bfloat16
    REPORT["config"] = {**s, "tokens": tokens, "runs": args.runs, "device": str(mx.default_device()),
                        "mlx": mx.__version__}
    stop = threading.Event()
    threading.Thread(target=sampler, args=(stop, threading.get_ident()), daemon=True).start()
    store = args.workdir / "store"
    shutil.rmtree(store, ignore_errors=True)
    try:
        model = real.build_model(s, 0)
        manifest = write_synthetic_store(store, s["layers"], s["experts"], s["hidden"], s["intermediate"],
                                         k=s["k"], threads=min(s["layers"], os.cpu_count() or 1))
        streamer, budget, _ = real.attach_store(model, store, manifest, 0.25, "lfu", 16, dtype)
        reader = streamer.reader
        log(f"model ready {memory()}")
        x = (0.5 * mx.random.normal((1, tokens, s["hidden"]))).astype(dtype)
        mx.eval(x)
        stage("1_fresh", parts(model, x, s))

        # 2: one layer's experts through the engine's reader, stacked, computed
        switch = model.layers[0].mlp.switch_mlp
        template = switch.template
        host = np.random.default_rng(0).integers(0, s["experts"], size=(1, tokens, s["k"]))
        needed = np.unique(host).tolist()
        tic = time.perf_counter()
        weights = reader.read(0, needed)
        read_s = time.perf_counter() - tic
        tic = time.perf_counter()
        stacked = stack_experts(weights)
        mx.eval(stacked)
        stack_s = time.perf_counter() - tic
        template.update(tree_unflatten(list(stacked.items())))
        slot = np.zeros(s["experts"], dtype=np.int64)
        slot[needed] = np.arange(len(needed))
        r = {"read_seconds": read_s, "stack_seconds": stack_s,
             "grouped": timed(lambda: grouped_switch(template, x, slot[host]))}
        # the same experts copied by the GPU into device-allocated buffers
        device_copy = {k: v + 0 if v.dtype != mx.uint32 else v | 0 for k, v in stacked.items()}
        mx.eval(device_copy)
        template.update(tree_unflatten(list(device_copy.items())))
        r["grouped_on_device_copy"] = timed(lambda: grouped_switch(template, x, slot[host]))
        r.update(parts(model, x, s))
        stage("2_after_read", r)

        # 3: free them: their buffers go back to MLX's buffer cache
        weights = stacked = device_copy = None  # noqa: F841  (frees them)
        template.update(tree_unflatten([(k, mx.zeros((1,))) for k, _ in tree_flatten(template.parameters())]))
        gc.collect()
        stage("3_after_free", parts(model, x, s))

        # 4: empty the buffer cache
        mx.clear_cache()
        stage("4_after_clear_cache", parts(model, x, s))

        # 5: the whole prefill, per-layer barriers
        ids = np.random.default_rng(1).integers(0, s["vocab"], size=tokens).tolist()

        def prefill_once() -> dict:
            streamer.cache = ExpertCache(budget, "lfu")
            streamer.counters = StreamCounters()
            before = timing.mark()
            with timing.prefill_barriers(model, streamer) as choices:
                tic = time.perf_counter()
                mx.eval(model(mx.array(ids)[None], cache=make_prompt_cache(model)))
                seconds = time.perf_counter() - tic
            per = timing.since(before)
            c = streamer.counters
            return {"seconds": seconds, "per_layer": per, "sync": c.sync_seconds, "io": c.io_seconds,
                    "choices": choices, "memory": memory()}

        def prefill(name: str) -> None:
            """A whole prefill (the first compiles what it has not seen), the parts after it, then
            ``--runs`` more whole prefills."""
            stage(name, prefill_once())
            stage(name + "_parts_after", parts(model, x, s))
            if args.runs > 0:
                runs = [prefill_once() for _ in range(args.runs)]
                stage(name + "_warm", {"seconds": spread([r["seconds"] for r in runs]), "runs": runs,
                                       "memory": memory()})

        prefill("5_prefill")
        if args.cache_limit_gb is not None:
            mx.set_cache_limit(int(args.cache_limit_gb * 1e9))
            mx.clear_cache()
            prefill(f"6_prefill_cache_limit_{args.cache_limit_gb:g}gb")
    finally:
        stop.set()
        shutil.rmtree(store, ignore_errors=True)
    counts = collections.Counter(s["where"] for s in REPORT["samples"])
    REPORT["where_counts"] = counts.most_common(15)
    save()
    print(json.dumps({k: v for k, v in REPORT.items() if k != "samples"}, indent=1, default=str))
    for name, r in REPORT["stages"].items():
        if name.endswith("_warm"):
            prefill = name.removesuffix("_warm")
            first = REPORT["stages"][prefill]["seconds"]
            log(f"{prefill}: first {first:.2f} s, then {spread_text(r['seconds'], digits=2)} s")
    return REPORT


if __name__ == "__main__":
    main()
