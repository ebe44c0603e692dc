"""Qwen3.5-397B-A17B at its real layer shapes (or tiny ones) for the H200 bench scripts.

``REAL`` / ``TINY``: the shapes (``flashmoe_backend.bench.shapes``) with the run sizes;
:func:`build_model`: mlx-lm's own ``qwen3_5_moe.Model`` with random weights;
:func:`quantize_resident`: the non-expert weights quantized like the mlx-community checkpoints;
:func:`attach_store`: the model's experts streamed from a store, as ``FlashMoE.load`` sets it up.
Used by ``h200_layers.py``, ``h200_prefill.py`` and ``h200_probe.py``.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from flashmoe_kernels import install_fast_gated_delta
from mlx.utils import tree_flatten, tree_unflatten

from flashmoe_backend.bench import shapes
from flashmoe_backend.experts.cache import ExpertCache
from flashmoe_backend.experts.reader import ExpertReader, ReaderConfig
from flashmoe_backend.experts.switch import ExpertStreamer, install_streaming
from flashmoe_backend.store.format import Manifest

# The shapes (flashmoe_backend.bench.shapes) and these scripts' run sizes: layers built, decode
# tokens timed after a warmup, the decode prompt, the prefill, the records of the upload study.
REAL = dict(shapes.QWEN35, layers=8, tokens=48, warmup=16, prompt=16, prefill=2048, upload_records=16)
TINY = dict(shapes.TINY, layers=4, tokens=5, warmup=3, prompt=4, prefill=24, upload_records=4)


def model_config(s: dict) -> dict:
    text = dict(
        model_type="qwen3_5_moe_text",
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"],
        num_experts=s["experts"],
        num_experts_per_tok=s["k"],
        moe_intermediate_size=s["intermediate"],
        shared_expert_intermediate_size=s["shared"],
        linear_num_key_heads=s["lin_k_heads"],
        linear_num_value_heads=s["lin_v_heads"],
        linear_key_head_dim=s["lin_k_dim"],
        linear_value_head_dim=s["lin_v_dim"],
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        max_position_embeddings=262_144,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
    )
    return {"model_type": "qwen3_5_moe", "text_config": text}


def build_model(s: dict, seed: int):
    """mlx-lm's Qwen3.5-MoE at shape ``s``, random weights, lazily (nothing evaluated yet)."""
    from mlx_lm.models import qwen3_5_moe

    mx.random.seed(seed)
    # eval(): as mlx-lm's loader does; a module in training mode takes GatedDeltaNet's slow path.
    return qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict(model_config(s))).eval()


def quantize_resident(module: nn.Module, dtype) -> None:
    """Quantize ``module``'s non-expert weights like the mlx-community checkpoints (4-bit; the
    router and the shared-expert gate 8-bit), cast its other floats to ``dtype`` (the
    GatedDeltaNet's ``A_log`` stays float32), evaluate."""

    def predicate(path, m):
        if not hasattr(m, "to_quantized"):
            return False
        if path == "gate" or path.endswith((".gate", "shared_expert_gate")):
            return {"group_size": 64, "bits": 8}
        return m.weight.shape[-1] % 64 == 0

    nn.quantize(module, group_size=64, bits=4, class_predicate=predicate)
    cast = [(k, v.astype(dtype)) for k, v in tree_flatten(module.parameters())
            if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype and not k.endswith("A_log")]
    module.update(tree_unflatten(cast))
    mx.eval(module.parameters())


def finish_resident(model, dtype) -> int:
    """``quantize_resident`` on the whole model; returns the resident bytes read per token (all
    of them but the embedding table, of which one row)."""
    quantize_resident(model, dtype)
    params = dict(tree_flatten(model.parameters()))
    total = sum(v.nbytes for v in params.values())
    embed = sum(v.nbytes for k, v in params.items() if ".embed_tokens." in k)
    rows = model.language_model.args.vocab_size
    return total - embed + embed // rows


def attach_store(model, store: Path, manifest: Manifest, budget_frac: float, policy: str,
                 io_threads: int, dtype) -> tuple[ExpertStreamer, int, int]:
    """Stream ``model``'s experts from ``store`` as ``FlashMoE.load`` does (the streaming layer, the
    fast GatedDeltaNet recurrence), then finish its resident weights; returns the streamer, the
    cache budget (``budget_frac`` of the expert bytes, whole records) and the resident bytes per
    token."""
    rb = manifest.layers[0].record_bytes
    budget = int(budget_frac * manifest.expert_bytes) // rb * rb
    streamer = ExpertStreamer(manifest, ExpertReader(store, manifest, ReaderConfig(io_threads)),
                              ExpertCache(budget, policy))
    install_streaming(model, manifest, streamer)
    install_fast_gated_delta()
    return streamer, budget, finish_resident(model, dtype)
