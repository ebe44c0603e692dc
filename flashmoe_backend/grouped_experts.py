"""Expert compute for many tokens: one matmul per expert over the rows routed to it.

mlx-lm's ``SwitchGLU`` computes a prompt chunk's experts with ``gather_qmm`` over the (token, k)
pairs sorted by expert. On MLX's CUDA backend that reads an expert's weights once per ROW: on
the H200, 2,048 tokens x top-10 of Qwen3.5-397B took 35 s for 3.6 GB of experts, against 2 ms
at device bandwidth (bench/h200_prefill.py). Here the host, which already holds the router's
choice, sorts the pairs by expert and each expert runs as a plain (quantized) matmul over its
rows, so its weights are read once per chunk. Decode (a few rows per expert) and other
devices keep ``gather_qmm``: see :func:`use_grouped`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

# Below this many rows per used expert, per-expert matmuls are launch-bound and gather_qmm wins.
MIN_ROWS_PER_EXPERT = 4


def use_grouped(template: nn.Module, slots: np.ndarray) -> bool:
    """Whether :func:`grouped_switch` should compute this call (``slots``: [..., K] expert ids)."""
    # Only CUDA's gather_qmm re-reads weights per row: on Metal the sorted gather is mlx-lm's fast
    # path, and on CPU both ways took the same time (a 64-expert, 512-token check).
    if not isinstance(template, (SwitchGLU, SwitchMLP)) or not _on_cuda():
        return False
    if any(layer.get("global_scale") is not None for layer in _linears(template)):
        return False
    return slots.size >= MIN_ROWS_PER_EXPERT * len(np.unique(slots))


def _on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def grouped_switch(template: nn.Module, x: mx.array, slots: np.ndarray) -> mx.array:
    """``template(x, mx.array(slots))`` computed expert by expert.

    ``template`` is a ``SwitchGLU`` or ``SwitchMLP`` (quantized or not), ``x`` is ``[..., D]`` and
    ``slots`` the host copy of the indices, ``[..., K]``; returns ``[..., K, D_out]``."""
    k = slots.shape[-1]
    flat = slots.reshape(-1)
    order = np.argsort(flat, kind="stable")
    experts, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], flat.size)
    rows = x.reshape(-1, x.shape[-1])[mx.array(order // k)]
    outputs = [_expert_mlp(template, rows[a:b], int(e))
               for e, a, b in zip(experts, starts, ends, strict=True)]
    y = mx.concatenate(outputs)[mx.array(np.argsort(order))]
    return y.reshape(*slots.shape, y.shape[-1])


def _linears(template: nn.Module) -> list[nn.Module]:
    if isinstance(template, SwitchGLU):
        return [template.gate_proj, template.up_proj, template.down_proj]
    return [template.fc1, template.fc2]


def _expert_mlp(template: nn.Module, h: mx.array, e: int) -> mx.array:
    if isinstance(template, SwitchGLU):
        up = _expert_linear(template.up_proj, h, e)
        gate = _expert_linear(template.gate_proj, h, e)
        return _expert_linear(template.down_proj, template.activation(up, gate), e)
    return _expert_linear(template.fc2, template.activation(_expert_linear(template.fc1, h, e)), e)


def _expert_linear(layer: nn.Module, h: mx.array, e: int) -> mx.array:
    """Expert ``e`` of a ``SwitchLinear`` / ``QuantizedSwitchLinear`` applied to rows ``h``."""
    if "scales" in layer:
        biases = layer.get("biases")
        y = mx.quantized_matmul(h, layer["weight"][e], layer["scales"][e],
                                None if biases is None else biases[e], transpose=True,
                                group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    else:
        y = h @ layer["weight"][e].T
    if "bias" in layer:
        y = y + layer["bias"][e]
    return y
