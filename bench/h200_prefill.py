#!/usr/bin/env python3
"""Where a 2,048-token prefill of Qwen3.5-397B spends its time, one component at a time.

bench/h200_layers.py found the layer-major prefill of a 2,048-token prompt 14.5x slower than one
pass over the experts it needs, nearly all of it waiting for the router's indices, i.e. for the
lazily built compute before each MoE block. This script times that compute in pieces, at the
real shapes (hidden 4096, 512 experts of intermediate 1024, top-10, GatedDeltaNet 16 key heads /
64 value heads of 128, attention 32 heads / 2 KV heads of 256), with every expert in device
memory (no store, no I/O) and an eval barrier around each part:

* the GatedDeltaNet recurrence alone: mlx-lm's per-token ops loop (its fast kernel is Metal-only),
  the project's chunked form and, on CUDA, its kernel; with the largest difference to the loop;
* one GatedDeltaNet layer (projections, conv, recurrence, gated norm), with mlx-lm's recurrence
  and with ``install_fast_gated_delta()``;
* one full-attention layer;
* the MoE block: router and top-k, the experts (``SwitchGLU`` over 4-bit experts: mlx-lm's sorted
  ``gather_qmm`` path, and the streaming layer's expert-by-expert path of
  ``flashmoe_backend/experts/grouped.py``), the shared expert; and the experts' floor (bytes /
  device bandwidth).

    python -m bench.h200_prefill [--tokens 2048] --json $OUT/h200_prefill.json   # on the GPU machine
    python -m bench.h200_prefill --tiny                                           # CPU, seconds

Each part is the median of ``--reps`` warm runs (default 3, at least 2 even for a slow part), with
their min-max spread (``warm_spread_seconds``). Prints a markdown table and the JSON report;
``--json PATH`` also writes the report to PATH and the table beside it (PATH with ``.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from flashmoe_kernels.gated_delta import (
    fast_gated_delta,
    gated_delta_chunked,
    gated_delta_cuda,
    make_inputs,
)
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import gated_delta as mlx_gdn
from mlx_lm.models import qwen3_5
from mlx_lm.models.cache import ArraysCache, KVCache

from bench import h200_model as real
from bench.h200_layers import spread
from flashmoe_backend.experts.grouped import grouped_switch

#: Each timed part's first run (label -> seconds): on CUDA it includes compiling the part's
#: kernels (MLX compiles them with NVRTC on first use, tens of seconds for some), which the
#: warm figures leave out.
FIRST_RUNS: dict[str, float] = {}
#: Each timed part's warm runs (label -> ``spread``: median, min, max, each run's seconds).
SPREADS: dict[str, dict] = {}


def timed(label: str, fn, reps: int, slow: float = 2.0) -> float:
    """Median seconds of ``fn()`` (evaluated) over ``reps`` warm runs, after a first run that
    compiles (recorded in ``FIRST_RUNS``), the runs' spread in ``SPREADS``; past two warm runs, one
    slower than ``slow`` seconds is the last (device time is scarce)."""
    tic = time.perf_counter()
    mx.eval(fn())
    FIRST_RUNS[label] = time.perf_counter() - tic
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
        if times[-1] > slow and len(times) >= 2:
            break
    SPREADS[label] = spread(times)
    return statistics.median(times)


def text_args(s: dict) -> qwen3_5.TextModelArgs:
    return qwen3_5.TextModelArgs.from_dict(real.model_config(s)["text_config"])


def random_experts(block: nn.Module, dtype) -> None:
    """Replace the (lazy, never evaluated) float experts by random 4-bit ones: 512 float experts
    would take 26 GB to create just to quantize them."""
    switch = block.switch_mlp
    nn.quantize(switch, group_size=64, bits=4)
    fresh = []
    for key, value in tree_flatten(switch.parameters()):
        if value.dtype == mx.uint32:
            halves = [mx.random.randint(0, 1 << 16, value.shape).astype(mx.uint32) for _ in range(2)]
            fresh.append((key, (halves[0] << 16) | halves[1]))
        elif key.endswith("scales"):
            fresh.append((key, (0.002 + 0.001 * mx.random.uniform(shape=value.shape)).astype(dtype)))
        else:
            fresh.append((key, (-0.016 * mx.ones(value.shape)).astype(dtype)))
    switch.update(tree_unflatten(fresh))


def recurrence_inputs(s: dict, tokens: int, dtype, seed: int) -> tuple:
    a = text_args(s)
    return make_inputs(1, tokens, a.linear_num_key_heads, a.linear_num_value_heads,
                       a.linear_key_head_dim, a.linear_value_head_dim, seed=seed, dtype=dtype)


def bench_recurrence(s: dict, tokens: int, reps: int, dtype, skip_baselines: bool, seed: int) -> dict:
    inputs = recurrence_inputs(s, tokens, dtype, seed)
    paths = {"mlx_lm_ops": mlx_gdn.gated_delta_ops, "chunked": gated_delta_chunked}
    if mx.default_device() == mx.gpu and mx.cuda.is_available():
        paths["cuda_kernel"] = gated_delta_cuda
    reference = paths["mlx_lm_ops"](*inputs)
    out = {}
    for name, fn in paths.items():
        y, state = fn(*inputs)
        if skip_baselines and (name == "mlx_lm_ops" or (name == "chunked" and "cuda_kernel" in paths)):
            continue
        out[name] = {
            "seconds": timed(f"recurrence_{name}", lambda fn=fn: fn(*inputs), reps),
            "max_abs_diff_y": float(mx.abs(y.astype(mx.float32) - reference[0].astype(mx.float32)).max()),
            "max_abs_diff_state": float(mx.abs(state - reference[1]).max()),
        }
    return out


def bench_layers(s: dict, tokens: int, reps: int, dtype, skip_baselines: bool) -> dict:
    args = text_args(s)
    x = (0.5 * mx.random.normal((1, tokens, args.hidden_size))).astype(dtype)
    mx.eval(x)
    out = {}

    gdn = qwen3_5.GatedDeltaNet(args).eval()  # a module in training mode skips fast paths
    real.quantize_resident(gdn, dtype)
    if not skip_baselines:
        out["gdn_layer_mlx_lm"] = timed("gdn_layer_mlx_lm", lambda: gdn(x, None, ArraysCache(size=2)), reps)
    with fast_gated_delta():
        out["gdn_layer_fast"] = timed("gdn_layer_fast", lambda: gdn(x, None, ArraysCache(size=2)), reps)

    attn = qwen3_5.Attention(args).eval()
    real.quantize_resident(attn, dtype)
    out["attention_layer"] = timed("attention_layer", lambda: attn(x, "causal", KVCache()), reps)

    block = qwen3_5.SparseMoeBlock(args).eval()
    random_experts(block, dtype)
    real.quantize_resident(block, dtype)
    k = args.num_experts_per_tok

    def route():
        gates = mx.softmax(block.gate(x), axis=-1, precise=True)
        return mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]

    inds = route()
    mx.eval(inds)
    out["router_topk"] = timed("router_topk", route, reps)
    host = np.array(inds)
    if not skip_baselines:
        out["experts"] = timed("experts", lambda: block.switch_mlp(x, inds), reps)
        grouped = grouped_switch(block.switch_mlp, x, host)
        out["experts_grouped_max_abs_diff"] = float(mx.abs(grouped - block.switch_mlp(x, inds)).max())
    out["experts_grouped"] = timed("experts_grouped", lambda: grouped_switch(block.switch_mlp, x, host), reps)
    out["shared_expert"] = timed("shared_expert", lambda: block.shared_expert(x), reps)
    if not skip_baselines:  # the block calls mlx-lm's SwitchGLU
        out["moe_block"] = timed("moe_block", lambda: block(x), reps)
    expert_bytes = sum(v.nbytes for _, v in tree_flatten(block.switch_mlp.parameters()))
    used = len(set(inds.reshape(-1).tolist()))
    out["experts_used"] = used
    out["expert_bytes_used"] = expert_bytes * used // args.num_experts
    out["device_bandwidth"] = device_bandwidth(block.switch_mlp.gate_proj.weight, reps)
    out["experts_floor"] = out["expert_bytes_used"] / out["device_bandwidth"]
    return out


def device_bandwidth(a: mx.array, reps: int) -> float:
    """Bytes per second of a full read of ``a`` on the device (a reduction over it)."""
    # uint32 sums wrap around: only the read matters
    seconds = timed("device_bandwidth", lambda: a.sum(), reps)
    return a.nbytes / seconds


def markdown(report: dict) -> str:
    t = report["config"]["tokens"]
    device = report["machine"]["device"]
    first = report["first_run_seconds"]
    spreads = report["warm_spread_seconds"]

    def warm(label: str) -> str:
        s = spreads[label]
        return f"{s['median']:.4f} | {s['min']:.4f}-{s['max']:.4f} ({s['runs']})"

    lines = [f"Prefill of {t} tokens, one component at a time ({device}), median warm seconds with "
             f"their min-max (runs); first run: compiles kernels on CUDA:", "",
             "| part | seconds | min-max (runs) | first run | note |", "|---|---|---|---|---|"]
    for name, r in report["recurrence"].items():
        label = f"recurrence_{name}"
        lines.append(f"| GDN recurrence: {name} | {warm(label)} | {first[label]:.2f} "
                     f"| max abs diff to the loop: y {r['max_abs_diff_y']:.2e}, state "
                     f"{r['max_abs_diff_state']:.2e} |")
    layers = report["layers"]
    for name in ("gdn_layer_mlx_lm", "gdn_layer_fast", "attention_layer", "router_topk", "experts",
                 "experts_grouped", "shared_expert", "moe_block"):
        if name in layers:
            lines.append(f"| {name} | {warm(name)} | {first[name]:.2f} | |")
    gb, bw = layers["expert_bytes_used"] / 1e9, layers["device_bandwidth"] / 1e9
    lines.append(f"| experts' floor | {layers['experts_floor']:.4f} | | | {layers['experts_used']} experts, "
                 f"{gb:.2f} GB at {bw:.0f} GB/s |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, CPU, seconds")
    p.add_argument("--tokens", type=int, default=None, help="prompt tokens (default 2048; tiny 24)")
    p.add_argument("--reps", type=int, default=3, help="warm runs per part (their median and spread)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baselines", action="store_true",
                   help="skip timing mlx-lm's own paths (minutes on CUDA at 2,048 tokens)")
    p.add_argument("--json", type=Path, default=None, help="write the report here, the table beside it (.md)")
    args = p.parse_args(argv)
    s = dict(real.TINY if args.tiny else real.REAL)
    tokens = args.tokens or s["prefill"]
    dtype = mx.float32 if args.tiny else mx.bfloat16
    mx.random.seed(args.seed)
    report = {
        "config": {**s, "tokens": tokens, "reps": args.reps, "tiny": args.tiny, "dtype": str(dtype)},
        "machine": {"device": str(mx.default_device()), "mlx": mx.__version__},
        "recurrence": bench_recurrence(s, tokens, args.reps, dtype, args.skip_baselines, args.seed),
        "layers": bench_layers(s, tokens, args.reps, dtype, args.skip_baselines),
        "first_run_seconds": FIRST_RUNS,
        "warm_spread_seconds": SPREADS,
    }
    print(markdown(report))
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(markdown(report) + "\n")
    return report


if __name__ == "__main__":
    main()
