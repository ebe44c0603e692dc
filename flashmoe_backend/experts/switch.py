"""The streaming MoE layer: a drop-in for mlx-lm's ``SwitchGLU`` whose experts come from disk.

mlx-lm's MoE blocks call ``self.switch_mlp(x, indices)``. ``StreamingSwitch`` has the same call.
Per call it syncs the router's indices to the host, serves the needed experts from the cache,
reads all misses of the layer at once, and runs the original ``SwitchGLU`` computation over a
stack of just those experts (indices remapped to stack slots); on CUDA with many rows per expert
it instead computes expert by expert as each read completes (``grouped.py``), so the
compute overlaps the reads. A prompt chunk goes through a layer as a whole, so prefill is
layer-major and each needed expert is read once per chunk. When a chunk needs more experts than
the cache budget holds, they are processed in groups that fit, each group evaluated before the
next evicts it.

Benchmarks and tests steer and watch the layers through the streamer, never by patching this
module: ``ExpertStreamer.path`` (an ``ExpertPath``: when to take the grouped path) and
``ExpertStreamer.hooks`` (``StreamHooks``: callbacks on each fetch, path choice and stack).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from flashmoe_backend.experts.cache import ExpertCache
from flashmoe_backend.experts.grouped import DEFAULT_PATH, ExpertPath, grouped_switch, use_grouped
from flashmoe_backend.experts.reader import ExpertReader, ExpertWeights
from flashmoe_backend.generation.stats import Step
from flashmoe_backend.store.format import LayerSpec, Manifest, StoreError, layer_quantization

SWITCH_TYPES = (SwitchGLU, SwitchMLP)
#: On the grouped path, hand the GPU this many experts' work at a time while reads go on.
GROUPED_EVAL_EVERY = 16


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
        for counts, value in (
            (self.layer_hits, hits),
            (self.layer_misses, misses),
            (self.layer_bytes_read, nbytes),
        ):
            counts.extend([0] * (layer + 1 - len(counts)))
            counts[layer] += value


@dataclass
class StreamHooks:
    """Callbacks into the streaming layers for benchmarks that record or time them (the engine
    sets none); called on the thread that runs the model."""

    # each fetch of a layer's experts, (layer, experts), before anything is read
    on_fetch: Callable[[int, list[int]], None] | None = None
    # each computation over a group of experts: whether it takes the grouped path
    on_path: Callable[[bool], None] | None = None
    # the stacked path's experts (stack_experts) before the layer uses them; evaluating them
    # there makes a timing barrier
    on_stack: Callable[[dict[str, mx.array]], None] | None = None


class ExpertStreamer:
    """Serves expert weights to the streaming layers: cache first, then one batched read.

    ``path`` decides when a layer computes expert by expert (the grouped path); ``hooks`` are
    told what the layers do. Both are plain attributes a benchmark may set between calls.
    """

    def __init__(
        self,
        manifest: Manifest,
        reader: ExpertReader,
        cache: ExpertCache,
        path: ExpertPath = DEFAULT_PATH,
        hooks: StreamHooks | None = None,
    ):
        self.manifest = manifest
        self.reader = reader
        self.cache = cache
        self.path = path
        self.hooks = hooks if hooks is not None else StreamHooks()
        self.counters = StreamCounters()
        self.steps: list[Step] | None = None  # the forward passes, while recording
        # Expert parallelism (``flashmoe_backend/distributed.py``): with a group of ranks, each
        # layer call goes through it (it sends the call to the other ranks, computes this
        # rank's experts with ``StreamingSwitch.partial`` and sums the ranks' outputs); None
        # when this process runs the whole model.
        self.shard = None
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
        """Weights of the given experts, in order, pinned in the cache until ``release``."""
        found = dict(self.fetch_iter(layer, experts))
        return [found[e] for e in experts]

    def fetch_iter(self, layer: int, experts: list[int]) -> Iterator[tuple[int, ExpertWeights]]:
        """``(expert, weights)`` for the given experts as each becomes available: cached ones
        first, then each miss as its read completes (all misses are read at once), so a caller
        can compute with the first experts while the rest are still being read. Pinned in the
        cache until ``release``; ``io_seconds`` counts only the time spent waiting here."""
        if self.hooks.on_fetch is not None:
            self.hooks.on_fetch(layer, list(experts))
        keys = [(layer, e) for e in experts]
        found = {e: self.cache.lookup(k) for e, k in zip(experts, keys, strict=True)}
        self.cache.pin(k for k in keys if k in self.cache)
        missing = [e for e in experts if found[e] is None]
        reads = self.reader.read_iter(layer, missing)
        self._count(layer, hits=len(experts) - len(missing), misses=0, nbytes=0, seconds=0.0)
        yield from ((e, w) for e, w in found.items() if w is not None)
        spec = self.manifest.layers[layer]
        for e in missing:
            tic = time.perf_counter()
            weights = next(reads)
            seconds = time.perf_counter() - tic
            self.cache.insert((layer, e), weights, spec.record_bytes)
            self.cache.pin([(layer, e)])
            self._count(layer, hits=0, misses=1, nbytes=spec.record_bytes, seconds=seconds)
            yield e, weights

    def _count(self, layer: int, hits: int, misses: int, nbytes: int, seconds: float) -> None:
        c = self.counters
        c.io_seconds += seconds
        c.experts_read += misses
        c.bytes_read += nbytes
        c.count_layer(layer, hits, misses, nbytes)
        if self.steps:
            step = self.steps[-1]
            step.hits += hits
            step.misses += misses
            step.bytes_read += nbytes
            step.io_seconds += seconds

    def release(self) -> None:
        self.cache.unpin_all()


def stack_experts(weights: list[ExpertWeights]) -> dict[str, mx.array]:
    """The experts' tensors stacked, one array per tensor name (``[len(weights), ...]``): the
    parameters of a ``SwitchGLU`` holding just these experts, in this order (lazy)."""
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

    @property
    def layer(self) -> int:
        """This layer's index among the manifest's MoE layers."""
        return self._layer

    @property
    def template(self) -> nn.Module:
        """The layer's original ``SwitchGLU`` / ``SwitchMLP`` (outside the parameter tree); the
        stacked path loads each call's experts into it."""
        return self._template.module

    def _run(self, x: mx.array, host: np.ndarray, dtype: mx.Dtype, experts: list[int]) -> mx.array:
        """The original SwitchGLU computation over ``experts`` only (the ids ``host`` uses)."""
        template, streamer = self.template, self._streamer
        grouped = use_grouped(template, host, streamer.path)
        if streamer.hooks.on_path is not None:
            streamer.hooks.on_path(grouped)
        if grouped:
            # Expert by expert as the reads complete: compute overlaps the remaining reads.
            arriving = streamer.fetch_iter(self._layer, experts)
            return grouped_switch(template, x, host, arriving, eval_every=GROUPED_EVAL_EVERY)
        stacked = stack_experts(streamer.fetch(self._layer, experts))
        if streamer.hooks.on_stack is not None:
            streamer.hooks.on_stack(stacked)
        template.update(tree_unflatten(list(stacked.items())))
        # Expert ids -> stack slots; monotonic, so SwitchGLU's sort order is unchanged.
        slot = np.zeros(max(experts) + 1, dtype=np.int64)
        slot[experts] = np.arange(len(experts))
        return template(x, mx.array(slot[host], dtype=dtype))

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        streamer = self._streamer
        tic = time.perf_counter()
        host = np.array(indices)  # the sync: the router's choice decides what to read
        streamer.counters.sync_seconds += time.perf_counter() - tic
        streamer.counters.calls += 1
        if self._layer == 0:
            streamer.begin_step(host.size // host.shape[-1])
        if streamer.shard is not None:
            return streamer.shard.forward(self, x, host, indices.dtype)
        needed = np.unique(host).tolist()
        groups = streamer.plan_groups(self._layer, needed)
        streamer.counters.groups += len(groups)
        try:
            if len(groups) == 1:
                return self._run(x, host, indices.dtype, needed)
            return self._run_grouped(x, host, indices.dtype, groups)
        finally:
            streamer.release()

    def partial(self, x: mx.array, host: np.ndarray, dtype: mx.Dtype, experts: list[int]) -> mx.array:
        """This layer's output, ``[*host.shape, dims]`` in ``x``'s dtype, for the (token, k)
        pairs routed to ``experts`` only and zero for all the others: one rank's share under
        expert parallelism. Only those experts are fetched; each pair's row is computed as in
        ``__call__`` (the same SwitchGLU math), so the ranks' shares add up exactly."""
        streamer, k = self._streamer, host.shape[-1]
        flat = host.reshape(-1)
        rows = x.reshape(-1, x.shape[-1])
        out = mx.zeros((flat.size, rows.shape[-1]), dtype=x.dtype)
        groups = streamer.plan_groups(self._layer, experts) if experts else []
        streamer.counters.groups += len(groups)
        try:
            for group in groups:
                pos = np.nonzero(np.isin(flat, group))[0]
                y = self._run(rows[mx.array(pos // k)], flat[pos][:, None], dtype, group)
                out[mx.array(pos)] = y[:, 0].astype(x.dtype)
                if len(groups) > 1:
                    mx.eval(out)  # before the next group may evict these experts
                    streamer.release()
            return out.reshape(*host.shape, rows.shape[-1])
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
    """Quantize each projection of the template as the store recorded it (per tensor, like
    mlx-lm's per-layer quantization config); float projections stay float."""
    if spec.quantization is None:
        return

    def predicate(path: str, module: nn.Module) -> dict | bool:
        return hasattr(module, "to_quantized") and (spec.module_quantization(path) or False)

    nn.quantize(template, class_predicate=predicate)


def switch_quantization(switch: nn.Module) -> dict | None:
    """The manifest's ``quantization`` of one layer's experts (``LayerSpec.quantization``), from
    each projection's own; the inverse of ``_quantize_template``."""
    per_module = {
        name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode} if "scales" in m else None
        for name, m in switch.named_modules()
        if name and "weight" in m
    }
    return layer_quantization(per_module)


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
