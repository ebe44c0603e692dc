"""MLX's quantized matmuls on the GPU against the CPU, and against themselves (run twice).

    python -m bench.h200_qmm_check [--json PATH]     # on the GPU machine, after the MLX setup

bench.h200_engine_check finds mlx-lm's own quantized model ~1 logit apart on the GPU and the CPU
while the float model agrees to 2e-3; this narrows it to one op: ``quantized_matmul`` and
``gather_qmm`` over shapes of the tiny fixtures and of Qwen3.5's experts, per dtype.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx

SHAPES = {"tiny": (12, 64, 32), "tiny-wide": (12, 32, 128), "qwen3.5-expert": (16, 4096, 1024)}


def run(op: str, x, w, scales, biases, bits: int, device, idx=None) -> mx.array:
    with mx.stream(device):
        if op == "qmm":
            y = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=32, bits=bits)
        else:
            y = mx.gather_qmm(x, w, scales, biases, rhs_indices=idx, transpose=True,
                              group_size=32, bits=bits)
        mx.eval(y)
    return y.astype(mx.float32)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    mx.random.seed(0)
    report = {}
    for name, (m, k, n) in SHAPES.items():
        for dtype in (mx.float32, mx.bfloat16, mx.float16):
            for bits in (8, 4):
                x = mx.random.normal((m, k)).astype(dtype)
                wf = (mx.random.normal((4, n, k)) * 0.05).astype(dtype)
                w, scales, biases = mx.quantize(wf, group_size=32, bits=bits)
                idx = mx.array([i % 4 for i in range(m)])[:, None]
                xs = x[:, None, None, :]  # gather_qmm: one row per token, its expert in idx
                row = {}
                for op in ("qmm", "gather_qmm"):
                    args_ = (x, w[0], scales[0], biases[0]) if op == "qmm" else (xs, w, scales, biases)
                    cpu = run(op, *args_, bits, mx.cpu, idx)
                    gpu1 = run(op, *args_, bits, mx.gpu, idx)
                    gpu2 = run(op, *args_, bits, mx.gpu, idx)
                    scale = float(mx.abs(cpu).max().item())
                    row[op] = {"gpu vs cpu": float(mx.abs(gpu1 - cpu).max().item()),
                               "gpu vs gpu": float(mx.abs(gpu1 - gpu2).max().item()),
                               "max |y|": scale, "gpu nan": bool(mx.isnan(gpu1).any().item())}
                key = f"{name} {dtype} {bits}-bit"
                report[key] = row
                print(key, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
