"""Engine vs mlx-lm logits on each device (CPU and GPU), for the tiny quantized fixtures.

    python -m bench.h200_engine_check [--json PATH]     # on the GPU machine, after the MLX setup

Tells whose GPU path disagrees when the CPU-exact comparison of tests/test_engine.py is run on
a CUDA machine: every pair (mlx-lm / engine, CPU / GPU) of logit traces, max |difference|.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from itertools import combinations
from pathlib import Path

import mlx.core as mx
import mlx_lm

from flashmoe_backend import FlashMoE, PackOptions, pack
from flashmoe_backend.experts.grouped import ExpertPath
from tests.fixtures.tiny import build_quantized_checkpoint, build_tiny_checkpoint
from tests.test_engine import PROMPT, logits_trace, max_diff


def traces(arch: str, root: Path, bits: int) -> dict[str, mx.array]:
    hf = build_tiny_checkpoint(root / "hf", arch, seed=1)
    src = build_quantized_checkpoint(hf, root / "mlx", bits=bits, group_size=32) if bits < 16 else hf
    store = root / "store"
    pack(src, store, PackOptions(bits=bits, progress=False))
    out, tokens = {}, None
    for device in (mx.cpu, mx.gpu):
        with mx.stream(device):
            mx.set_default_device(device)
            ref, _ = mlx_lm.load(str(src))
            name = "cpu" if device == mx.cpu else "gpu"
            out[f"mlx-lm {name}"], tokens = logits_trace(ref, PROMPT, 16, drive=tokens)
            engine = FlashMoE.load(store, cache_gb=1.0)
            out[f"engine {name}"], _ = logits_trace(engine.model, PROMPT, 16, drive=tokens)
            if device == mx.gpu:  # without the grouped path (CUDA's prefill path)
                engine.streamer.path = ExpertPath(grouped=False)
                out["engine gpu gather_qmm"], _ = logits_trace(engine.model, PROMPT, 16, drive=tokens)
            mx.eval(list(out.values()))
    mx.set_default_device(mx.gpu)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    report = {}
    for arch in ("qwen3_5_moe", "qwen3_next", "qwen3_moe"):
        for bits in (16, 8, 4):
            with tempfile.TemporaryDirectory() as tmp:
                t = traces(arch, Path(tmp), bits)
            pairs = {f"{a} vs {b}": max_diff(t[a], t[b]) for a, b in combinations(t, 2)}
            report[f"{arch} {bits}-bit"] = pairs
            print(arch, bits, json.dumps(pairs), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
