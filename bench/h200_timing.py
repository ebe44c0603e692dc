"""Timing barriers for ``h200_layers.py``: where a decode step's or a prefill's time goes.

MLX is lazy, so a part's time is only its own when its output is evaluated before the next part
starts. :func:`instrument` wraps each layer's attention/GatedDeltaNet and MoE block in such a
barrier (:class:`Timed`); :func:`prefill_barriers` adds one around the stacking of fetched experts
and records which paths the engine took. Every barrier appends its seconds to ``CALLS``;
:func:`mark` and :func:`since` cut out the calls of one run. The engine is watched through its
own hooks (``ExpertStreamer.hooks``, ``recorded_gated_delta_paths``), never patched.
"""

from __future__ import annotations

import contextlib
import time

import mlx.core as mx
import mlx.nn as nn
from flashmoe_kernels import recorded_gated_delta_paths

from flashmoe_backend.experts.switch import ExpertStreamer

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
def hooked(streamer: ExpertStreamer, **hooks):
    """Set the given ``streamer.hooks`` (e.g. ``on_fetch=...``) for the block, then put back
    what was there."""
    before = {name: getattr(streamer.hooks, name) for name in hooks}
    for name, hook in hooks.items():
        setattr(streamer.hooks, name, hook)
    try:
        yield
    finally:
        for name, hook in before.items():
            setattr(streamer.hooks, name, hook)


@contextlib.contextmanager
def recorded_choices(streamer: ExpertStreamer):
    """Record the paths the engine takes, into the dict yielded: each expert computation's use of
    the grouped path (``"grouped"``: ``StreamHooks.on_path``) and each GatedDeltaNet call's
    recurrence (``"gated_delta"``: ``recorded_gated_delta_paths``)."""
    choices: dict[str, list] = {"grouped": []}
    with hooked(streamer, on_path=choices["grouped"].append), recorded_gated_delta_paths() as paths:
        choices["gated_delta"] = paths
        yield choices


@contextlib.contextmanager
def prefill_barriers(model, streamer: ExpertStreamer):
    """Barriers for a prefill's time split: around each layer's attention/GatedDeltaNet and MoE
    block (``instrument``) and around the stacking of fetched experts (``StreamHooks.on_stack``);
    yields the paths taken (``recorded_choices``)."""

    def timed_stack(stacked: dict[str, mx.array]) -> None:
        tic = time.perf_counter()
        mx.eval(list(stacked.values()))
        CALLS["stack"].append(time.perf_counter() - tic)

    instrument(model, True)
    try:
        with hooked(streamer, on_stack=timed_stack), recorded_choices(streamer) as choices:
            yield choices
    finally:
        instrument(model, False)
