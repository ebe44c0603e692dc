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

    store.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.parent) as tmp:
        checkpoint = build_random_checkpoint(Path(tmp) / "mlx")
        packed = Path(tmp) / "store"
        pack(checkpoint, packed, PackOptions(bits=4, group_size=32, progress=False))
        if not (store / "manifest.json").is_file():  # another process may have won the race
            shutil.rmtree(store, ignore_errors=True)
            os.rename(packed, store)
    return store


def build_random_checkpoint(out: Path, seed: int = 0) -> Path:
    """A random Qwen3.5-MoE checkpoint in mlx-lm's format, made with MLX alone (no torch)."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3_5_moe

    from .tiny import build_tokenizer

    out.mkdir(parents=True)
    build_tokenizer(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = dict(
        model_type="qwen3_5_moe_text", vocab_size=len(tokenizer), hidden_size=DEMO_SHAPE["hidden_size"],
        num_hidden_layers=DEMO_SHAPE["num_layers"], num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_experts=DEMO_SHAPE["num_experts"], num_experts_per_tok=DEMO_SHAPE["top_k"],
        moe_intermediate_size=DEMO_SHAPE["moe_intermediate_size"],
        shared_expert_intermediate_size=DEMO_SHAPE["moe_intermediate_size"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_conv_kernel_dim=4, full_attention_interval=4,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    config = {"model_type": "qwen3_5_moe", "text_config": text, "tie_word_embeddings": False}
    mx.random.seed(seed)
    model = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


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
