"""Timing barriers for ``h200_layers.py``: where a decode step's or a prefill's time goes.

MLX is lazy, so a part's time is only its own when its output is evaluated before the next part
starts. :func:`instrument` wraps each layer's attention/GatedDeltaNet and MoE block in such a
barrier (:class:`Timed`); :func:`prefill_barriers` adds one around the stacking of fetched experts
and records which paths the engine took. Every barrier appends its seconds to ``CALLS``;
:func:`mark` and :func:`since` cut out the calls of one run.
"""

from __future__ import annotations

import contextlib
import time

import mlx.core as mx
import mlx.nn as nn
from flashmoe_kernels.gated_delta import dispatch as gated_delta

from flashmoe_backend.experts import switch as streaming

CALLS: dict[str, list[float]] = {"attention_gdn": [], "moe": [], "stack": []}  # each call's seconds


def mark() -> dict[str, int]:
    """A point in ``CALLS``: the calls recorded so far."""
    return {k: len(v) for k, v in CALLS.items()}


def since(point: dict[str, int]) -> dict[str, list[float]]:
    """Each barrier's seconds per call after ``point`` (in call order: one per layer and step)."""
    return {k: v[point.get(k, 0):] for k, v in CALLS.items()}


class Timed(nn.Module):
    """Runs ``inner`` and evaluates its output (and its cache's state): a timing barrier."""

    def __init__(self, inner: nn.Module, bucket: str):
        super().__init__()
        self.inner = inner
        self._bucket = bucket

    def __call__(self, *args, **kwargs):
        tic = time.perf_counter()
        out = self.inner(*args, **kwargs)
        cache = args[2] if len(args) > 2 else kwargs.get("cache")
        mx.eval(out, *([cache.state] if cache is not None else []))
        CALLS[self._bucket].append(time.perf_counter() - tic)
        return out


def instrument(model, on: bool) -> None:
    """Put (``on``) or take away the barriers around each layer's attention/GatedDeltaNet and MoE."""
    for layer in model.layers:
        name = "linear_attn" if layer.is_linear else "self_attn"
        attn, mlp = getattr(layer, name), layer.mlp
        if on and not isinstance(attn, Timed):
            setattr(layer, name, Timed(attn, "attention_gdn"))
            layer.mlp = Timed(mlp, "moe")
        elif not on and isinstance(attn, Timed):
            setattr(layer, name, attn.inner)
            layer.mlp = mlp.inner


@contextlib.contextmanager
def recorded_choices():
    """Record the paths the engine takes, into the dict yielded: each expert call's use of the
    grouped path (``"grouped"``: ``use_grouped``) and each GatedDeltaNet call's recurrence
    (``"gated_delta"``: ``select_gated_delta_path``)."""
    choices: dict[str, list] = {"grouped": [], "gated_delta": []}
    choose, select = streaming.use_grouped, gated_delta.select_gated_delta_path

    def counted(template, slots):
        choices["grouped"].append(choose(template, slots))
        return choices["grouped"][-1]

    def selected(*args, **kwargs):
        choices["gated_delta"].append(select(*args, **kwargs))
        return choices["gated_delta"][-1]

    streaming.use_grouped, gated_delta.select_gated_delta_path = counted, selected
    try:
        yield choices
    finally:
        streaming.use_grouped, gated_delta.select_gated_delta_path = choose, select


@contextlib.contextmanager
def prefill_barriers(model):
    """Barriers for a prefill's time split: around each layer's attention/GatedDeltaNet and MoE
    block (``instrument``) and around the stacking of fetched experts; yields the paths taken
    (``recorded_choices``)."""
    stack = streaming._stack

    def timed_stack(weights):
        tic = time.perf_counter()
        out = stack(weights)
        mx.eval(list(out.values()))
        CALLS["stack"].append(time.perf_counter() - tic)
        return out

    instrument(model, True)
    streaming._stack = timed_stack
    try:
        with recorded_choices() as choices:
            yield choices
    finally:
        streaming._stack = stack
        instrument(model, False)
