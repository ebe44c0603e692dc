"""The streaming MoE layer: a drop-in for mlx-lm's ``SwitchGLU`` whose experts come from disk.

mlx-lm's MoE blocks call ``self.switch_mlp(x, indices)``. ``StreamingSwitch`` has the same call.
Per call it syncs the router's indices to the host, serves the needed experts from the cache,
reads all misses of the layer at once, and runs the original ``SwitchGLU`` computation over a
stack of just those experts (indices remapped to stack slots). A prompt chunk goes through a
layer as a whole, so prefill is layer-major and each needed expert is read once per chunk.
When a chunk needs more experts than the cache budget holds, they are processed in groups
that fit, each group evaluated before the next evicts it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from .cache import ExpertCache
from .grouped_experts import grouped_switch, use_grouped
from .reader import ExpertReader, ExpertWeights
from .stats import Step
from .store import LayerSpec, Manifest, StoreError

SWITCH_TYPES = (SwitchGLU, SwitchMLP)


@dataclass
class StreamCounters:
    """Running totals of the streaming layer (the cache keeps hits and misses)."""

    bytes_read: int = 0
    experts_read: int = 0
    io_seconds: float = 0.0
    sync_seconds: float = 0.0  # waiting for the router's indices (the model's compute up to it)
    calls: int = 0
    groups: int = 0
    # Per MoE layer (index: the layer's position in the manifest); grown as layers are seen.
    layer_hits: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)
    layer_bytes_read: list[int] = field(default_factory=list)

    def count_layer(self, layer: int, hits: int, misses: int, nbytes: int) -> None:
        for counts, value in ((self.layer_hits, hits), (self.layer_misses, misses),
                              (self.layer_bytes_read, nbytes)):
            counts.extend([0] * (layer + 1 - len(counts)))
            counts[layer] += value


class ExpertStreamer:
    """Serves expert weights to the streaming layers: cache first, then one batched read."""

    def __init__(self, manifest: Manifest, reader: ExpertReader, cache: ExpertCache):
        self.manifest = manifest
        self.reader = reader
        self.cache = cache
        self.counters = StreamCounters()
        self.steps: list[Step] | None = None  # the forward passes, while recording
        largest = max(layer.record_bytes for layer in manifest.layers)
        if cache.budget_bytes < largest:
            raise ValueError(
                f"cache budget of {cache.budget_bytes} bytes cannot hold one expert record "
                f"({largest} bytes); raise cache_gb"
            )

    def plan_groups(self, layer: int, needed: list[int]) -> list[list[int]]:
        """Split the experts a call needs into groups that each fit the budget.

        Cached experts go first so they are used before anything can evict them; every
        expert appears in exactly one group, so it is read at most once per call.
        """
        record = self.manifest.layers[layer].record_bytes
        per_group = self.cache.budget_bytes // record
        if len(needed) <= per_group:
            return [needed]
        cached = [e for e in needed if (layer, e) in self.cache]
        missing = [e for e in needed if (layer, e) not in self.cache]
        ordered = cached + missing
        return [ordered[i : i + per_group] for i in range(0, len(ordered), per_group)]

    @contextmanager
    def record_steps(self) -> Iterator[list[Step]]:
        """Record a ``Step`` per forward pass (a pass begins at MoE layer 0) into the list
        yielded, until the block ends."""
        self.steps = steps = []
        try:
            yield steps
        finally:
            self.steps = None

    def begin_step(self, tokens: int) -> None:
        if self.steps is not None:
            self.steps.append(Step(tokens))

    def fetch(self, layer: int, experts: list[int]) -> list[ExpertWeights]:
        """Weights of the given experts, pinned in the cache until ``release``."""
        keys = [(layer, e) for e in experts]
        found = {e: self.cache.lookup(k) for e, k in zip(experts, keys, strict=True)}
        self.cache.pin(k for k in keys if k in self.cache)
        missing = [e for e in experts if found[e] is None]
        nbytes, seconds = 0, 0.0
        if missing:
            spec = self.manifest.layers[layer]
            tic = time.perf_counter()
            loaded = self.reader.read(layer, missing)
            seconds = time.perf_counter() - tic
            nbytes = len(missing) * spec.record_bytes
            self.counters.io_seconds += seconds
            self.counters.experts_read += len(missing)
            self.counters.bytes_read += nbytes
            for e, weights in zip(missing, loaded, strict=True):
                self.cache.insert((layer, e), weights, spec.record_bytes)
                self.cache.pin([(layer, e)])
                found[e] = weights
        hits = len(experts) - len(missing)
        self.counters.count_layer(layer, hits, len(missing), nbytes)
        if self.steps:
            step = self.steps[-1]
            step.hits += hits
            step.misses += len(missing)
            step.bytes_read += nbytes
            step.io_seconds += seconds
        return [found[e] for e in experts]

    def release(self) -> None:
        self.cache.unpin_all()


def _stack(weights: list[ExpertWeights]) -> dict[str, mx.array]:
    return {name: mx.stack([w[name] for w in weights]) for name in weights[0]}


class _Hidden:
    """Holds a module outside the parameter tree (so loading and quantizing skip it)."""

    def __init__(self, module: nn.Module):
        self.module = module


class StreamingSwitch(nn.Module):
    """Same call as ``SwitchGLU`` (``(x, indices) -> y``), experts streamed from the store."""

    def __init__(self, template: nn.Module, layer: int, streamer: ExpertStreamer):
        super().__init__()
        self._template = _Hidden(template)
        self._layer = layer
        self._streamer = streamer

    def _run(self, x: mx.array, host: np.ndarray, dtype: mx.Dtype, experts: list[int]) -> mx.array:
        """The original SwitchGLU computation over a stack of ``experts`` only."""
        weights = self._streamer.fetch(self._layer, experts)
        template = self._template.module
        template.update(tree_unflatten(list(_stack(weights).items())))
        # Expert ids -> stack slots; monotonic, so SwitchGLU's sort order is unchanged.
        slot = np.zeros(max(experts) + 1, dtype=np.int64)
        slot[experts] = np.arange(len(experts))
        slots = slot[host]
        if use_grouped(template, slots):
            return grouped_switch(template, x, slots)
        return template(x, mx.array(slots, dtype=dtype))

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        streamer = self._streamer
        tic = time.perf_counter()
        host = np.array(indices)  # the sync: the router's choice decides what to read
        streamer.counters.sync_seconds += time.perf_counter() - tic
        streamer.counters.calls += 1
        if self._layer == 0:
            streamer.begin_step(host.size // host.shape[-1])
        needed = np.unique(host).tolist()
        groups = streamer.plan_groups(self._layer, needed)
        streamer.counters.groups += len(groups)
        try:
            if len(groups) == 1:
                return self._run(x, host, indices.dtype, needed)
            return self._run_grouped(x, host, indices.dtype, groups)
        finally:
            streamer.release()

    def _run_grouped(self, x, host: np.ndarray, dtype, groups: list[list[int]]) -> mx.array:
        """Each (token, k) pair computed with its group's experts, then put back in order."""
        k = host.shape[-1]
        flat = host.reshape(-1)
        rows = x.reshape(-1, x.shape[-1])
        outputs, positions = [], []
        for group in groups:
            pos = np.nonzero(np.isin(flat, group))[0]
            y = self._run(rows[mx.array(pos // k)], flat[pos][:, None], dtype, group)
            mx.eval(y)  # before the next group may evict these experts
            self._streamer.release()
            outputs.append(y[:, 0])
            positions.append(pos)
        order = np.argsort(np.concatenate(positions))
        y = mx.concatenate(outputs)[mx.array(order)]
        return y.reshape(*host.shape, y.shape[-1])


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in path.split(".")]


def find_switch_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All MoE expert modules (SwitchGLU / SwitchMLP) of an mlx-lm model, in layer order."""
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, SWITCH_TYPES)]
    return sorted(found, key=lambda item: _natural_key(item[0]))


def _quantize_template(template: nn.Module, spec: LayerSpec) -> None:
    q = spec.quantization
    if q is None:
        return
    nn.quantize(template, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                class_predicate=lambda _, m: hasattr(m, "to_quantized"))


def install_streaming(model: nn.Module, manifest: Manifest, streamer: ExpertStreamer) -> int:
    """Replace every expert module of ``model`` by a ``StreamingSwitch``; returns how many."""
    by_module = {layer.module: i for i, layer in enumerate(manifest.layers)}
    switches = find_switch_modules(model)
    found = {path for path, _ in switches}
    if found != set(by_module):
        missing = sorted(set(by_module) - found)[:3] or sorted(found - set(by_module))[:3]
        raise StoreError(
            f"manifest.json: the store's expert layers do not match the model built from "
            f"config.json ({len(by_module)} in the manifest, {len(found)} in the model; "
            f"e.g. {missing})"
        )
    replacements = []
    for path, template in switches:
        index = by_module[path]
        _quantize_template(template, manifest.layers[index])
        replacements.append((path, StreamingSwitch(template, index, streamer)))
    model.update_modules(tree_unflatten(replacements))
    return len(replacements)
