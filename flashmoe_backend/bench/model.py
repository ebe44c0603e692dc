"""``flashmoe bench model STORE``: ``FlashMoE.generate`` on a real store (or a checkpoint read in
place) against the floor.

The same numbers as the synthetic mode, from ``engine.stats`` and the streamer's counters:
prefill seconds, decode tok/s, hit rate (decode only and overall) against Belady for the recorded
accesses, bytes read per token, I/O-wait and router-sync shares, the floor (resident bytes =
``model.safetensors``); also at K=4, and mlx-lm with the whole model in memory when it fits.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flashmoe_backend.bench import trace as tr
from flashmoe_backend.bench.bandwidth import floor_per_token, measure_disk, measure_memory
from flashmoe_backend.bench.config import ModelConfig
from flashmoe_backend.bench.pagecache import evict_page_cache, store_files
from flashmoe_backend.bench.replay import release_memory
from flashmoe_backend.bench.report import machine_info
from flashmoe_backend.store.format import MANIFEST, Manifest
from flashmoe_backend.store.source import open_source


class _ModelProbe:
    """Wraps the engine's model to note when prefill ends (the first one-token call)."""

    def __init__(self, model, on_first_decode: Callable[[], None]):
        self._model = model
        self._hook = on_first_decode
        self._fired = False

    def __call__(self, inputs, *args, **kwargs):
        if not self._fired and inputs.shape[-1] == 1:
            self._fired = True
            self._hook()
        return self._model(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _record_fetches(streamer) -> list[tuple[int, list[int]]]:
    """Note every fetch's (layer, experts) in the returned list, from now on (the streamer's
    ``on_fetch`` hook)."""
    steps: list[tuple[int, list[int]]] = []
    streamer.hooks.on_fetch = lambda layer, experts: steps.append((layer, experts))
    return steps


def _totals(streamer, steps: list) -> dict:
    return dict(
        time=time.perf_counter(),
        steps=len(steps),
        io=streamer.counters.io_seconds,
        sync=streamer.counters.sync_seconds,
        bytes=streamer.counters.bytes_read,
        hits=streamer.cache.counters.hits,
        misses=streamer.cache.counters.misses,
    )


def _generate(
    cfg: ModelConfig, source, budget: float, k: int | None, rng: np.random.Generator, report: dict
) -> tuple[dict, list[int]]:
    """One cold ``FlashMoE.generate`` of a random prompt at ``k`` experts per token (None: the
    model's own); returns its row of the report (whose store and bandwidth sections it uses) and
    the prompt."""
    from flashmoe_backend.engine import GB, FlashMoE

    manifest = source.manifest
    rb, resident_bytes = report["store"]["record_bytes"], report["store"]["resident_bytes"]
    evict_page_cache(store_files(source, manifest))
    engine = FlashMoE.load(
        source.root,
        cache_gb=budget / GB,
        experts_per_token=k,
        page_cache=cfg.page_cache,
        policy=cfg.policy,
        prompt_cache_entries=0,
        prefill_step_size=cfg.prefill_step,
    )
    vocab = engine.config.get("text_config", engine.config).get("vocab_size", 1000)
    prompt = rng.integers(0, min(vocab, 10_000), size=cfg.prompt_tokens).tolist()
    streamer = engine.streamer
    steps = _record_fetches(streamer)
    marks: dict = {}
    engine.model = _ModelProbe(engine.model, lambda: marks.update(_totals(streamer, steps)))
    tic = time.perf_counter()
    result = engine.generate(prompt, max_tokens=cfg.max_tokens, temperature=0.0)
    end = time.perf_counter()
    engine.model = engine.model._model
    s = result.stats
    c, cc = streamer.counters, streamer.cache.counters
    decode_s = end - marks["time"]
    n = max(1, s.generated_tokens)
    d_hits, d_misses = cc.hits - marks["hits"], cc.misses - marks["misses"]
    d_io, d_sync = c.io_seconds - marks["io"], c.sync_seconds - marks["sync"]
    belady = tr.belady(steps, int(budget // rb), start=marks["steps"])
    floor = floor_per_token(
        n,
        d_misses * rb,
        resident_bytes * n + d_hits * rb,
        report["bandwidth"]["disk"]["bytes_per_s"],
        report["bandwidth"]["memory"]["bytes_per_s"],
    )
    row = {
        "k": k or "model's own",
        "prompt_tokens": len(prompt),
        "generated_tokens": s.generated_tokens,
        "prefill_seconds": marks["time"] - tic,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": n / decode_s,
        "seconds_per_token": decode_s / n,
        "engine_stats": s.to_dict(),
        "hit_rate": d_hits / max(1, d_hits + d_misses),
        "hit_rate_all": s.hit_rate,
        "belady_hit_rate": belady["hit_rate_after_start"],
        "belady_hit_rate_all": belady["hit_rate"],
        "bytes_read_per_token": (c.bytes_read - marks["bytes"]) / n,
        "time_shares": {
            "io_wait": d_io / decode_s,
            "router_sync": d_sync / decode_s,
            "compute_and_rest": max(0.0, 1 - (d_io + d_sync) / decode_s),
        },
        "floor_seconds_per_token": floor,
        "measured_over_floor": (decode_s / n) / floor,
        "consistent": {
            "lookups": cc.hits + cc.misses == sum(len(x[1]) for x in steps),
            "bytes": c.bytes_read == c.experts_read * rb
            or len({x.record_bytes for x in manifest.layers}) > 1,
            "within_budget": cc.bytes_peak <= budget,
        },
    }
    engine.close()
    del engine
    release_memory()
    return row, prompt


def _full_model_dir(store: Path, manifest: Manifest, out: Path) -> Path:
    """A checkpoint directory mlx-lm loads whole: the store's resident weights plus its experts
    stacked back under their SwitchGLU names."""
    import mlx.core as mx

    from flashmoe_backend.experts.reader import ExpertReader, ReaderConfig

    out.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(store):
        if name not in (MANIFEST, "experts") and (store / name).is_file():
            os.symlink(store / name, out / name)
    reader = ExpertReader(store, manifest, ReaderConfig(verify="never"))
    try:
        tensors = {}
        for i, layer in enumerate(manifest.layers):
            weights = reader.read(i, list(range(layer.num_experts)))
            for t in layer.tensors:
                tensors[f"{layer.module}.{t.name}"] = mx.stack([w[t.name] for w in weights])
        mx.save_safetensors(str(out / "model-experts.safetensors"), tensors, metadata={"format": "mlx"})
    finally:
        reader.close()
    return out


def _mlx_lm_in_memory(store: Path, manifest: Manifest, prompt: list[int], max_tokens: int) -> dict:
    """mlx-lm's own generation with every expert in memory (the speed ceiling)."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.utils import load_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        full = store  # a checkpoint read in place: mlx-lm loads it whole as it is
        if (store / MANIFEST).is_file():
            full = _full_model_dir(store, manifest, Path(tmp) / "full")
        model, _ = load_model(full)
        tokenizer = load_tokenizer(store)
        last = list(stream_generate(model, tokenizer, mx.array(prompt), max_tokens=max_tokens))[-1]
        del model
    return {
        "prompt_tps": last.prompt_tps,
        "generation_tps": last.generation_tps,
        "generated_tokens": last.generation_tokens,
        "peak_memory_gb": last.peak_memory,
    }


def run_model(cfg: ModelConfig, command: str = "") -> dict:
    """``FlashMoE.generate`` on a store; engine.stats and streamer counters against the floor."""
    from flashmoe_backend.engine import GB

    source = open_source(cfg.store)  # a store, a checkpoint read in place, a cached repo id
    store, manifest = source.root, source.manifest
    rb = max(s.record_bytes for s in manifest.layers)
    resident_bytes = source.resident_bytes()
    expert_bytes = manifest.expert_bytes
    budget = cfg.cache_gb * GB if cfg.cache_gb else max(cfg.budget_frac * expert_bytes, 12 * rb)
    report: dict = {
        "mode": "model",
        "command": command,
        "machine": machine_info(store),
        "store": {
            "path": str(store),
            "moe_layers": len(manifest.layers),
            "expert_bytes": expert_bytes,
            "resident_bytes": resident_bytes,
            "record_bytes": rb,
            "budget_bytes": int(budget),
            "budget_fraction": budget / expert_bytes,
        },
    }
    rng = np.random.default_rng([cfg.seed, 5])
    keys = [
        (i, int(e))
        for i, s in enumerate(manifest.layers)
        for e in rng.choice(s.num_experts, min(s.num_experts, 4), replace=False)
    ]
    disk = measure_disk(source, manifest, keys, 8, cfg.io_threads)
    memory = measure_memory(source, manifest, records=min(64, len(keys)))
    report["bandwidth"] = {"disk": disk, "memory": memory}
    runs = []
    for k in [None] + ([4] if cfg.with_k4 else []):
        row, prompt = _generate(cfg, source, budget, k, rng, report)
        runs.append(row)
    report["runs"] = runs
    avail = machine_info(store).get("memory_available_bytes") or 0
    fits = expert_bytes + resident_bytes < 0.4 * avail  # comfortably
    report["mlx_lm_in_memory"] = (
        _mlx_lm_in_memory(store, manifest, prompt, cfg.max_tokens) if cfg.with_mlx_lm and fits else None
    )
    return report
