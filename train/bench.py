"""Measure training-step throughput of the demo model shape on this machine (random tokens).

    python train/bench.py [--impls grouped_mm,batched_mm,eager] [--shapes 64x512,32x1024]

Prints the environment (torch, transformers, whether the flash-linear-attention / causal-conv1d
kernels exist) and, per experts implementation and batch shape, the tokens/s of a full training
step (forward, backward, AdamW) under bf16 autocast, plus the time of the GatedDeltaNet layers alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from train.train import DEMO_SHAPE, ModelShape, collate, loss_fn, make_model, to_device


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impls", default="grouped_mm")
    p.add_argument("--shapes", default="128x512,256x512,512x512,128x1024")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "fla": importlib.util.find_spec("fla") is not None,
           "causal_conv1d": importlib.util.find_spec("causal_conv1d") is not None,
           "kernels": importlib.util.find_spec("kernels") is not None}
    print(json.dumps(env), flush=True)
    shape: ModelShape = DEMO_SHAPE
    for impl in args.impls.split(","):
        torch.manual_seed(0)
        model = make_model(shape, args.vocab, 1, 0).to(device)
        try:
            model.set_experts_implementation(impl)
        except Exception as e:  # noqa: BLE001
            print(f"{impl}: cannot set ({e})")
            continue
        if args.compile:
            for layer in model.model.layers:
                layer.compile(dynamic=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
        for s in args.shapes.split(","):
            b, t = map(int, s.split("x"))
            rng = np.random.default_rng(0)
            seqs = [(rng.integers(2, args.vocab, t).tolist(), (rng.random(t) < 0.1).tolist())
                    for _ in range(b)]
            batch = to_device(collate(seqs, 0), device)
            try:
                for i in range(args.steps + 2):
                    if i == 2:
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        tic = time.perf_counter()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        loss, _ = loss_fn(model, batch, 0)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - tic) / args.steps
                mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
                print(json.dumps({"impl": impl, "batch": b, "seq": t, "step_s": round(dt, 4),
                                  "tokens_per_s": round(b * t / dt), "loss": round(float(loss.detach()), 3),
                                  "max_mem_gib": round(mem, 1)}), flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{impl} {s}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        # GatedDeltaNet layers alone, forward + backward, on the last shape
        x = torch.randn(b, t, shape.hidden_size, device=device, requires_grad=True)
        gdn = [layer.linear_attn for layer in model.model.layers if hasattr(layer, "linear_attn")]
        for i in range(4):
            if i == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                tic = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                y = sum(m(x).float().sum() for m in gdn)
            y.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(json.dumps({"impl": impl, "gdn_layers": len(gdn), "batch": b, "seq": t,
                          "gdn_fwd_bwd_s": round((time.perf_counter() - tic) / 3, 4)}), flush=True)
        del model, opt


if __name__ == "__main__":
    main()
