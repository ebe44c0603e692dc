"""Expert compute for many tokens: one matmul per expert over the rows routed to it.

mlx-lm's ``SwitchGLU`` computes a prompt chunk's experts with ``gather_qmm`` over the (token, k)
pairs sorted by expert, which needs every expert of the chunk stacked into one array first. Here
the host, which already holds the router's choice, sorts the pairs by expert and each expert runs
as a plain (quantized) matmul over its rows, on its own tensors. So the streaming layer can start
an expert as soon as its read completes, while the rest are still being read, and never copies a
layer's experts into a stack. On the H200 (bench/RESULTS.md, 2,048 tokens of Qwen3.5-397B): the
compute alone is a little faster than ``gather_qmm`` (95 against 109 ms for 512 experts), and
a 4-layer streamed prefill takes 10.8 s against 14.3 s with the stack. Decode (a few rows per
expert) and other devices keep ``gather_qmm``: see :func:`use_grouped`, whose rule an
:class:`ExpertPath` can change (benchmarks and tests force one path or the other with it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

# Below this many rows per used expert, per-expert matmuls are launch-bound and gather_qmm wins.
MIN_ROWS_PER_EXPERT = 4


@dataclass(frozen=True)
class ExpertPath:
    """The rule of :func:`use_grouped`. The defaults are the engine's, as measured; a benchmark or
    a test passes others (``ExpertStreamer.path``) to time or run one path on purpose."""

    grouped: bool = True  # False: never the grouped path (always mlx-lm's gather_qmm over a stack)
    cuda_only: bool = True  # False: on any device (e.g. CUDA's path run on a CPU by the tests)
    min_rows_per_expert: int = MIN_ROWS_PER_EXPERT  # 0: however few rows (decode too)


#: The engine's rule.
DEFAULT_PATH = ExpertPath()


def use_grouped(template: nn.Module, slots: np.ndarray, path: ExpertPath = DEFAULT_PATH) -> bool:
    """Whether :func:`grouped_switch` should compute this call (``slots``: [..., K] expert ids),
    by the rule ``path``."""
    # Measured on CUDA only: on Metal the sorted gather is mlx-lm's fast path, and on CPU both ways
    # took the same time (a 64-expert, 512-token check).
    if not path.grouped or not isinstance(template, (SwitchGLU, SwitchMLP)):
        return False
    if path.cuda_only and not _on_cuda():
        return False
    if any(layer.get("global_scale") is not None for layer in _linears(template)):
        return False
    return slots.size >= path.min_rows_per_expert * len(np.unique(slots))


def _on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def grouped_switch(
    template: nn.Module,
    x: mx.array,
    slots: np.ndarray,
    experts: Iterable[tuple[int, dict[str, mx.array]]] | None = None,
    eval_every: int = 0,
) -> mx.array:
    """``template(x, mx.array(slots))`` computed expert by expert.

    ``template`` is a ``SwitchGLU`` or ``SwitchMLP`` (quantized or not), ``x`` is ``[..., D]`` and
    ``slots`` the host copy of the indices, ``[..., K]``; returns ``[..., K, D_out]``. ``experts``
    gives each used expert's own tensors (names as in the template, e.g. ``gate_proj.weight``) as
    ``(id, tensors)`` pairs in any order, e.g. as they are read from disk; by default they are
    the template's stacked parameters. With ``eval_every``, the work is handed to the device
    (``mx.async_eval``) after every that many experts instead of all at the end.
    """
    k = slots.shape[-1]
    flat = slots.reshape(-1)
    order = np.argsort(flat, kind="stable")
    used, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], flat.size)
    spans = {int(e): (int(a), int(b)) for e, a, b in zip(used, starts, ends, strict=True)}
    rows = x.reshape(-1, x.shape[-1])[mx.array(order // k)]
    outputs: dict[int, mx.array] = {}
    pending: list[mx.array] = []
    for e, tensors in _stacked(template, used) if experts is None else experts:
        if e not in spans:
            continue  # given but routed to by no row
        a, b = spans[e]
        outputs[e] = _expert_mlp(template, tensors, rows[a:b])
        pending.append(outputs[e])
        if len(pending) == eval_every:
            mx.async_eval(pending)
            pending = []
    absent = [int(e) for e in used if int(e) not in outputs]
    if absent:
        raise ValueError(f"experts {absent[:5]} are routed to but were not given")
    y = mx.concatenate([outputs[int(e)] for e in used])[mx.array(np.argsort(order))]
    return y.reshape(*slots.shape, y.shape[-1])


def _stacked(template: nn.Module, used: np.ndarray) -> Iterator[tuple[int, dict[str, mx.array]]]:
    params = tree_flatten(template.parameters())
    for e in used:
        yield int(e), {name: p[int(e)] for name, p in params}


def _linears(template: nn.Module) -> list[nn.Module]:
    if isinstance(template, SwitchGLU):
        return [template.gate_proj, template.up_proj, template.down_proj]
    return [template.fc1, template.fc2]


def _expert_mlp(template: nn.Module, tensors: dict[str, mx.array], h: mx.array) -> mx.array:
    def linear(name: str, h: mx.array) -> mx.array:
        return _expert_linear(getattr(template, name), name, tensors, h)

    if isinstance(template, SwitchGLU):
        return linear("down_proj", template.activation(linear("up_proj", h), linear("gate_proj", h)))
    return linear("fc2", template.activation(linear("fc1", h)))


def _expert_linear(layer: nn.Module, name: str, tensors: dict[str, mx.array], h: mx.array) -> mx.array:
    """One expert's ``SwitchLinear`` / ``QuantizedSwitchLinear`` ``name`` (its ``tensors``) on rows ``h``."""
    weight, bias = tensors[f"{name}.weight"], tensors.get(f"{name}.bias")
    if "scales" in layer:
        y = mx.quantized_matmul(h, weight, tensors[f"{name}.scales"], tensors.get(f"{name}.biases"),
                                transpose=True, group_size=layer.group_size, bits=layer.bits,
                                mode=layer.mode)
    else:
        y = h @ weight.T
    return y if bias is None else y + bias
