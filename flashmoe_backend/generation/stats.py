"""Honest statistics: what the cache served, what was read, where the time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class Step:
    """One forward pass through the MoE layers: a prompt chunk (``tokens`` > 1) or one decoded
    token. Expert lookups (``hits`` + ``misses``) count each (layer, expert) a pass needs once."""

    tokens: int
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    io_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass
class Stats:
    """Counters of one generation, or cumulative over an engine's life (``engine.stats``).

    ``io_seconds`` is time spent waiting for expert reads; ``compute_seconds`` is the rest of
    the model's wall time (the router sync included). ``cache_bytes_peak`` never exceeds the
    budget. ``layer_*`` break hits, misses and bytes read down by MoE layer (index i: the i-th
    MoE layer). ``steps`` are the generation's forward passes in order (mlx-lm computes one
    pass ahead, so a generation of n tokens usually has n + 1 after its prompt chunks); the
    cumulative ``engine.stats`` keeps no steps.
    """

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    io_seconds: float = 0.0
    compute_seconds: float = 0.0
    cache_bytes: int = 0
    cache_bytes_peak: int = 0
    prompt_tokens: int = 0
    prompt_cached_tokens: int = 0  # prompt tokens served from a prompt-cache snapshot
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    layer_hits: list[int] = field(default_factory=list)
    layer_misses: list[int] = field(default_factory=list)
    layer_bytes_read: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def to_dict(self, steps: bool = False) -> dict:
        """All counters plus the derived rates, JSON-ready; the steps only when asked (they
        grow with the generation)."""
        out = asdict(self)
        if not steps:
            del out["steps"]
        out.update(prompt_tps=self.prompt_tps, generation_tps=self.generation_tps,
                   hit_rate=self.hit_rate)
        return out

    def add(self, other: Stats) -> None:
        """Accumulate another generation's counters (the cache gauges take the latest/peak, the
        per-layer counters add up layer by layer, steps are not kept)."""
        for f in fields(self):
            if f.name in _NOT_SUMMED:
                continue
            if f.name.startswith("layer_"):
                mine, theirs = getattr(self, f.name), getattr(other, f.name)
                width = max(len(mine), len(theirs))
                mine += [0] * (width - len(mine))
                for i, value in enumerate(theirs):
                    mine[i] += value
                continue
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.cache_bytes = other.cache_bytes
        self.cache_bytes_peak = max(self.cache_bytes_peak, other.cache_bytes_peak)


_NOT_SUMMED = ("cache_bytes", "cache_bytes_peak", "steps")
