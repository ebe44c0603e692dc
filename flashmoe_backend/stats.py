"""Honest statistics: what the cache served, what was read, where the time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Stats:
    """Counters of one generation, or cumulative over an engine's life (``engine.stats``).

    ``io_seconds`` is time spent waiting for expert reads; ``compute_seconds`` is the rest of
    the model's wall time (the router sync included). ``cache_bytes_peak`` never exceeds the
    budget.
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

    def to_dict(self) -> dict:
        """All counters plus the derived rates, JSON-ready."""
        out = asdict(self)
        out.update(prompt_tps=self.prompt_tps, generation_tps=self.generation_tps,
                   hit_rate=self.hit_rate)
        return out

    def add(self, other: Stats) -> None:
        """Accumulate another generation's counters (the cache gauges take the latest/peak)."""
        for f in fields(self):
            if f.name in ("cache_bytes", "cache_bytes_peak"):
                continue
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.cache_bytes = other.cache_bytes
        self.cache_bytes_peak = max(self.cache_bytes_peak, other.cache_bytes_peak)
