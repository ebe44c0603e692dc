#!/usr/bin/env python3
"""GatedDeltaNet recurrence: mlx-lm's ops loop against flashmoe's chunked form (and CUDA kernel).

Times ``mlx_lm.models.gated_delta.gated_delta_ops`` (the Python loop of T one-token steps that
mlx-lm uses off Apple GPUs) against ``flashmoe_kernels.gated_delta.gated_delta_chunked``
for several prompt lengths, at a small head config and at Qwen3.5-397B's (Hk=16, Hv=64,
Dk=Dv=128). When the default device is a CUDA GPU it adds ``gated_delta_cuda``. Inputs are
realistic: q and k L2-normalized as mlx-lm's ``normalize_qk`` does, g from mlx-lm's
``compute_g``, beta = sigmoid, a random initial state
(``flashmoe_kernels.gated_delta.make_inputs``). Each cell is the median of ``--repeats``
runs after ``--warmup``, synchronized with ``mx.eval``; the max abs differences are against the
ops path.

    python kernels/bench/bench_gated_delta.py [--json results.json] [--lengths 64 512 2048]

Prints a markdown table; ``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from flashmoe_kernels.gated_delta import (
    CPU_CHUNK,
    cuda_available,
    gated_delta_chunked,
    gated_delta_cuda,
    make_inputs,
)
from mlx_lm.models.gated_delta import gated_delta_ops

# name: (B, Hk, Hv, Dk, Dv)
CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "small": (1, 4, 8, 64, 64),
    "qwen3.5-397b": (1, 16, 64, 128, 128),
}


def time_it(fn: Callable[[], tuple], warmup: int, repeats: int) -> tuple[float, tuple]:
    """Median wall time in ms of ``fn`` (evaluated), and its last result."""
    out = ()
    for _ in range(warmup):
        out = fn()
        mx.eval(*out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        mx.eval(*out)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[64, 512, 2048],
                   help="prompt lengths T for the small config (default: 64 512 2048; none to skip)")
    p.add_argument("--qwen-lengths", type=int, nargs="*", default=[512],
                   help="prompt lengths for the Qwen3.5-397B head config (default: 512; none to skip)")
    p.add_argument("--chunk", type=int, default=CPU_CHUNK,
                   help=f"chunk size of the chunked form (default {CPU_CHUNK}: the engine's on CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)

    device = mx.default_device()
    with_cuda = device == mx.gpu and cuda_available()
    jobs = [("small", T) for T in args.lengths] + [("qwen3.5-397b", T) for T in args.qwen_lengths]

    rows = []
    for name, T in jobs:
        B, Hk, Hv, Dk, Dv = CONFIGS[name]
        q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
        ops_ms, (y_ops, s_ops) = time_it(
            lambda: gated_delta_ops(q, k, v, g, beta, state), args.warmup, args.repeats  # noqa: B023
        )
        ch_ms, (y_ch, s_ch) = time_it(
            lambda: gated_delta_chunked(q, k, v, g, beta, state, chunk=args.chunk),  # noqa: B023
            args.warmup,
            args.repeats,
        )
        row = {
            "config": name, "B": B, "T": T, "Hk": Hk, "Hv": Hv, "Dk": Dk, "Dv": Dv,
            "ops_ms": ops_ms, "chunked_ms": ch_ms, "chunked_speedup": ops_ms / ch_ms,
            "chunked_max_abs_dy": max_diff(y_ch, y_ops), "chunked_max_abs_dstate": max_diff(s_ch, s_ops),
            "max_abs_y": float(mx.abs(y_ops).max()), "max_abs_state": float(mx.abs(s_ops).max()),
        }
        if with_cuda:
            cu_ms, (y_cu, s_cu) = time_it(
                lambda: gated_delta_cuda(q, k, v, g, beta, state), args.warmup, args.repeats  # noqa: B023
            )
            row.update(
                cuda_ms=cu_ms, cuda_speedup=ops_ms / cu_ms,
                cuda_max_abs_dy=max_diff(y_cu, y_ops), cuda_max_abs_dstate=max_diff(s_cu, s_ops),
            )
        rows.append(row)
        print(f"  {name} T={T}: ops {ops_ms:.1f} ms, chunked {ch_ms:.1f} ms"
              + (f", cuda {row['cuda_ms']:.2f} ms" if with_cuda else ""), file=sys.stderr)

    print(f"device: {device}, mlx {mx.__version__}, {platform.machine()}, chunk {args.chunk}, "
          f"median of {args.repeats} after {args.warmup} warmup\n")
    head = "| config | B | T | Hk | Hv | Dk=Dv | ops ms | chunked ms | speedup |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if with_cuda:
        head += " cuda ms | speedup |"
        rule += "---:|---:|"
    head += " max abs dy (chunked) | max abs dstate (chunked) | max abs y |"
    rule += "---:|---:|---:|"
    if with_cuda:
        head += " max abs dy (cuda) | max abs dstate (cuda) |"
        rule += "---:|---:|"
    print(head)
    print(rule)
    for r in rows:
        line = (f"| {r['config']} | {r['B']} | {r['T']} | {r['Hk']} | {r['Hv']} | {r['Dk']} | "
                f"{r['ops_ms']:.1f} | {r['chunked_ms']:.1f} | {r['chunked_speedup']:.1f}x |")
        if with_cuda:
            line += f" {r['cuda_ms']:.2f} | {r['cuda_speedup']:.0f}x |"
        line += (f" {r['chunked_max_abs_dy']:.1e} | {r['chunked_max_abs_dstate']:.1e} | "
                 f"{r['max_abs_y']:.2f} |")
        if with_cuda:
            line += f" {r['cuda_max_abs_dy']:.1e} | {r['cuda_max_abs_dstate']:.1e} |"
        print(line)

    if args.json is not None:
        report = {
            "device": str(device), "mlx": mx.__version__, "machine": platform.machine(),
            "chunk": args.chunk, "warmup": args.warmup, "repeats": args.repeats, "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
