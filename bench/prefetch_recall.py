#!/usr/bin/env python3
"""Recall of the next-layer prefetch predictor on a trained model: can layer L+1's experts be
named before it routes? (``flashmoe_backend/bench/router_recall.py`` says how.)

Greedy generations from held-out prompts of each of the embedded demo model's tasks (question
answering, tool calls, JSON, chat), every decoded token's routing recorded; or, with ``--store``,
any Qwen3-MoE / Qwen3.5-MoE / Qwen3-Next store and ``--prompt`` texts.

    python -m bench.prefetch_recall [--n 8] [--max-tokens 48] [--json out.json]
    python -m bench.prefetch_recall --store STORE --prompt "..." [--prompt "..."]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashmoe_backend import FlashMoE
from flashmoe_backend.bench.router_recall import next_layer_recall, record_states
from flashmoe_backend.store.source import default_store

HELD_OUT_SEED = 1_000_003  # the demo model's evaluation prompts (train/evaluate.py)


def demo_prompts(tokenizer, n: int) -> list[str]:
    """``n`` held-out prompts of each demo task, rendered as the model was trained to see them."""
    from train import data

    prompts = []
    for kind in data.KINDS:
        for ex in data.examples(HELD_OUT_SEED, n, kind=kind):
            prompts.append(tokenizer.apply_chat_template(ex.prompt_messages(), tools=ex.tools, tokenize=False,
                                                         add_generation_prompt=True, enable_thinking=False))
    return prompts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=None, help="default: the embedded demo model")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; with --store)")
    p.add_argument("--n", type=int, default=8, help="demo prompts per task")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    engine = FlashMoE.load(args.store or default_store(), cache_gb=1.0)
    prompts = args.prompt or demo_prompts(engine.tokenizer, args.n)
    sequences = []
    with record_states(engine.model) as passes:
        for prompt in prompts:
            start = len(passes)
            engine.generate(prompt, max_tokens=args.max_tokens, temperature=0.0)
            sequences.append(passes[start:])
    report = {"store": str(args.store or "demo"), "prompts": len(prompts), "max_tokens": args.max_tokens,
              **next_layer_recall(engine.model, sequences)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
