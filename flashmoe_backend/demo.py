"""``flashmoe demo``: the embedded default model, built and packed locally on first run.

Until the trained demo model ships, the default model is a tiny Qwen3.5-MoE with RANDOM
weights: it shows the machinery (packing, streaming under a budget, statistics), and its text
is gibberish. It is built once into the user's cache directory, offline.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

DEMO_NAME = "demo-random-qwen3_5_moe-v1"
# Bigger than the test fixtures, so that the expert bytes clearly exceed the demo's budget.
DEMO_SHAPE = dict(num_layers=4, num_experts=32, top_k=4, hidden_size=128, moe_intermediate_size=64)


def home() -> Path:
    """Where flashmoe keeps built models: $FLASHMOE_HOME, else ~/.cache/flashmoe."""
    return Path(os.environ.get("FLASHMOE_HOME", Path.home() / ".cache" / "flashmoe"))


def default_store() -> Path:
    """The embedded default model's store, built (random weights, 4-bit) on first use."""
    store = home() / DEMO_NAME
    if (store / "manifest.json").is_file():
        return store
    from .packing import PackOptions, pack
    from .tiny import build_tiny_checkpoint

    store.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.parent) as tmp:
        checkpoint = build_tiny_checkpoint(Path(tmp) / "hf", "qwen3_5_moe", **DEMO_SHAPE)
        packed = Path(tmp) / "store"
        pack(checkpoint, packed, PackOptions(bits=4, group_size=32, progress=False))
        if not (store / "manifest.json").is_file():  # another process may have won the race
            shutil.rmtree(store, ignore_errors=True)
            os.rename(packed, store)
    return store


def run_demo(cache_gb: float | None = None, max_tokens: int = 48) -> int:
    from .cli import _print_stats, _stream_to_stdout
    from .engine import GB, FlashMoE

    print("flashmoe demo: the embedded model has RANDOM WEIGHTS (a trained one is on the way);\n"
          "its answers are gibberish, the streaming statistics are real.\n", file=sys.stderr)
    store = default_store()
    from .store import read_manifest

    expert_bytes = read_manifest(store).expert_bytes
    budget = cache_gb if cache_gb is not None else expert_bytes / 4 / GB
    engine = FlashMoE.load(store, cache_gb=budget)
    print(f"store {store}: {expert_bytes / 2**20:.1f} MiB of experts, cache budget "
          f"{budget * GB / 2**20:.1f} MiB ({budget * GB / expert_bytes:.0%})\n", file=sys.stderr)
    document = ("Internal memo: the Lisbon office moves to Rua Augusta 12 on 3 March. "
                "Badge access for the new building is requested from facilities.")
    messages = [
        {"role": "system", "content": "Answer from the document only.\n\n" + document},
        {"role": "user", "content": "Where does the Lisbon office move, and when?"},
    ]
    print(f"Q: {messages[-1]['content']}\nA: ", end="", file=sys.stderr, flush=True)
    result = _stream_to_stdout(engine, messages, max_tokens=max_tokens, enable_thinking=False)
    _print_stats(result.stats)
    engine.close()
    return 0
