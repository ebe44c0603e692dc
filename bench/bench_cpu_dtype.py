"""Prefill time on MLX's CPU backend with float32 vs float16 resident weights.

    python -m bench.bench_cpu_dtype [--tokens 300]

Packs the embedded demo model's architecture at fixture size (``tiny.build_tiny_checkpoint``,
Qwen3.5-MoE, 4-bit experts) twice, once per dtype, and times one prefill of ``--tokens`` tokens
through the engine (best of 2). Why it matters: the README tells CPU users to pack with
``--dtype float32``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from flashmoe_backend import FlashMoE, PackOptions, pack
from tests.fixtures.tiny import build_tiny_checkpoint


def prefill_seconds(store: Path, tokens: int) -> float:
    engine = FlashMoE.load(store, cache_gb=1.0)
    ids = mx.array([list(range(100, 100 + tokens))])
    best = float("inf")
    for _ in range(2):
        tic = time.perf_counter()
        mx.eval(engine.model(ids, cache=make_prompt_cache(engine.model)))
        best = min(best, time.perf_counter() - tic)
    engine.close()
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=300)
    args = p.parse_args()
    print(f"device {mx.default_device()}")
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_tiny_checkpoint(Path(tmp) / "hf", "qwen3_5_moe", seed=0)
        seconds = {}
        for dtype in ("float32", "float16"):
            store = Path(tmp) / dtype
            pack(hf, store, PackOptions(bits=4, group_size=32, dtype=dtype, progress=False))
            seconds[dtype] = prefill_seconds(store, args.tokens)
            print(f"{dtype}: {args.tokens}-token prefill {seconds[dtype]:.2f} s")
    print(f"float16 / float32: {seconds['float16'] / seconds['float32']:.1f}x")


if __name__ == "__main__":
    main()
