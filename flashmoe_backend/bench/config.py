"""What a benchmark run can be told: one dataclass per mode, with the command line's defaults.

The ``flashmoe bench`` flags (``cli.add_arguments``) are these fields, spelled with dashes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from flashmoe_backend.bench import shapes
from flashmoe_backend.experts.cache import DEFAULT_GUARD, DEFAULT_HALF_LIFE, DEFAULT_POLICY

#: The synthetic mode's experiments (``--experiments``).
EXPERIMENTS = ("policies", "decode", "page-cache", "peers", "prefetch", "prefill")

#: ``--tiny``: the tiny shapes (``shapes.TINY``'s experts, hidden and expert widths; K stays the
#: model's) and sizes for a seconds-long smoke run (CI); they override the flags.
TINY = dict(
    layers=3,
    experts=shapes.TINY["experts"],
    hidden=shapes.TINY["hidden"],
    intermediate=shapes.TINY["intermediate"],
    decode_tokens=6,
    warmup=4,
    policy_tokens=120,
    prefill_tokens=32,
    disk_sample_bytes=1e6,
    memory_sample_bytes=5e5,
    compute_ms=0.2,
    io_threads=4,
    quick_policies=True,
    prefetch_recalls=[0.9],
    mmap_random=True,
)


@dataclass
class SyntheticConfig:
    """``flashmoe bench synthetic``: a Qwen3.5-397B-sized synthetic store and a calibrated trace."""

    store: Path | None = None  # reused if it holds a store, else built there (None: a temp dir)
    keep_store: bool = False  # keep a store this run built
    layers: int = 6
    experts: int = shapes.QWEN35["experts"]
    hidden: int = shapes.QWEN35["hidden"]
    intermediate: int = shapes.QWEN35["intermediate"]
    k: int = shapes.QWEN35["k"]  # experts per token of the trace
    budget_frac: float = 0.25  # cache budget, share of the expert bytes
    decode_tokens: int = 96  # tokens timed per decode run
    warmup: int = 48  # tokens decoded before timing (from cold)
    policy_tokens: int = 2048  # trace length of the policy study
    prefill_tokens: int = 2048
    seed: int = 0
    io_threads: int = 8
    write_threads: int = 2
    half_life: float | None = None  # lfu half-life (None: cache.py's)
    half_lives: list[float] = field(default_factory=lambda: [640, 2560, math.inf])  # policy study
    guard: int | None = None  # lfu recency guard (None: cache.py's)
    quick_policies: bool = False  # policy study on the calibrated trace only
    prefetch_recalls: list[float] = field(default_factory=lambda: [0.9, 0.6])
    compute_ms: float = 2.0  # emulated non-expert compute per layer, prefetch-overlap runs (0: skip)
    touch: bool = True  # the expert-compute stand-in (one read of each needed record from memory)
    disk_sample_bytes: float = 1.5e9
    memory_sample_bytes: float = 3e8
    mmap_random: bool = False  # also the mmap baseline with MADV_RANDOM (4 KiB faults: very slow)
    drop_caches: bool = False  # also write /proc/sys/vm/drop_caches (root)
    repeats: int = 1  # rounds of the decode runs (round-robin); each configuration keeps its fastest
    experiments: str = "all"  # comma list of EXPERIMENTS, or all
    tiny: bool = False  # TINY shapes

    def resolved(self) -> SyntheticConfig:
        """The configuration a run uses: ``TINY`` applied, cache.py's LFU defaults filled in, and
        the decode runs' half-life among those the policy study compares."""
        cfg = replace(self, **TINY) if self.tiny else replace(self)
        if cfg.half_life is None:
            cfg.half_life = DEFAULT_HALF_LIFE
        if cfg.half_life not in cfg.half_lives:
            cfg.half_lives = [cfg.half_life, *cfg.half_lives]
        if cfg.guard is None:
            cfg.guard = min(DEFAULT_GUARD, cfg.k) if cfg.tiny else DEFAULT_GUARD
        return cfg

    def selected(self) -> set[str]:
        """The experiments to run (``experiments`` parsed and checked)."""
        chosen = set(EXPERIMENTS if self.experiments == "all" else self.experiments.split(","))
        unknown = chosen - set(EXPERIMENTS)
        if unknown:
            raise SystemExit(f"unknown experiment(s) {sorted(unknown)}; choose from {EXPERIMENTS}")
        return chosen


@dataclass
class ModelConfig:
    """``flashmoe bench model STORE``: ``FlashMoE.generate`` on a real store."""

    store: Path
    cache_gb: float | None = None  # None: budget_frac of the expert bytes
    budget_frac: float = 0.25
    prompt_tokens: int = 2048
    max_tokens: int = 32
    prefill_step: int = 2048
    policy: str = DEFAULT_POLICY
    page_cache: str = "bypass"
    io_threads: int = 8
    seed: int = 0
    with_k4: bool = True  # also a run at K=4
    with_mlx_lm: bool = True  # also mlx-lm with the whole model in memory, when it fits


def from_namespace(cls, namespace) -> SyntheticConfig | ModelConfig:
    """A configuration from parsed ``flashmoe bench`` arguments (the fields by name)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})
