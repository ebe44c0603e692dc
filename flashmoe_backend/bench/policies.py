"""Cache policies against Belady's optimum: hit rates through the real ``ExpertStreamer`` and
``ExpertCache`` with a reader that reads nothing (no I/O)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from flashmoe_backend.bench import trace as tr
from flashmoe_backend.bench.common import log
from flashmoe_backend.bench.synthetic_store import synthetic_manifest
from flashmoe_backend.experts.cache import LFU, ExpertCache
from flashmoe_backend.store.format import Manifest


class NullReader:
    """A reader that reads nothing: cache simulations through the real ExpertStreamer."""

    def read_iter(self, layer: int, experts: list[int]) -> Iterator:
        return iter([()] * len(experts))  # any value but None (the streamer's "not cached")


class OraclePolicy(LFU):
    """The guarded-LFU policy with the trace generator's TRUE popularity instead of counts: the
    most an online frequency policy could learn (a reference point, not a usable policy)."""

    def __init__(self, log_popularity: np.ndarray, guard: int):
        super().__init__(guard=guard)
        self._logp = log_popularity

    def score(self, key, now):
        return float(self._logp[key[0], key[1]])


class GeneratorOracle:
    """Evicts the expert the trace generator itself expects to use least over the next
    ``horizon`` tokens of its layer: true popularity, discounted while the generator's spread
    term still holds the expert back (used within its window), and the current token's experts
    kept. Knows everything an online policy could learn about the trace, but not its random
    draws: a ceiling for online policies on it (a reference point, not a usable policy; it assumes
    each step touches exactly ``k`` experts of a layer)."""

    def __init__(self, spec: tr.TraceSpec, horizon: int = 60):
        self._logp = layer_log_popularity(spec)
        self._k, self._window, self._spread, self._horizon = spec.k, spec.spread_window, spec.spread, horizon
        self._resident = np.zeros(self._logp.shape, dtype=bool)
        self._last = np.full(self._logp.shape, -(10**9), dtype=np.int64)  # token of last use
        self._touches = np.zeros(self._logp.shape[0], dtype=np.int64)

    def touch(self, key) -> None:
        layer, expert = key
        self._touches[layer] += 1
        self._last[layer, expert] = (self._touches[layer] - 1) // self._k
        self._resident[layer, expert] = True

    def remove(self, key) -> None:
        self._resident[key] = False

    def victim(self, pinned):
        age = ((self._touches - 1) // self._k)[:, None] - self._last
        held_back = np.clip(self._window - age, 0, self._horizon)  # tokens still in the window
        score = self._logp + np.log(self._horizon - self._spread * held_back)
        # the current token's experts last: repeated at the next token with probability ``repeat``
        score = np.where(age == 0, np.finfo(float).max, score)
        score = np.where(self._resident, score, np.inf)
        for key in pinned:
            score[key] = np.inf
        best = np.unravel_index(np.argmin(score), score.shape)
        return None if np.isinf(score[best]) else (int(best[0]), int(best[1]))


def simulate(steps: Sequence[tr.Step], manifest: Manifest, budget_bytes: int, policy, **options) -> dict:
    """Hit rate of a policy (a name, or a policy object) over an access sequence, through the real
    ExpertStreamer and cache."""
    from flashmoe_backend.experts.switch import ExpertStreamer

    cache = ExpertCache(budget_bytes, policy, **options)
    streamer = ExpertStreamer(manifest, NullReader(), cache)
    for layer, experts in steps:
        streamer.fetch(layer, list(experts))
        streamer.release()
    c = cache.counters
    return {
        "hits": c.hits,
        "misses": c.misses,
        "hit_rate": c.hits / max(1, c.hits + c.misses),
        "bytes_peak": c.bytes_peak,
        "bytes_read": streamer.counters.bytes_read,
    }


def layer_log_popularity(spec: tr.TraceSpec) -> np.ndarray:
    """The per-layer log popularity ``generate_trace`` starts from (same random stream)."""
    rng = np.random.default_rng(spec.seed)
    base = np.log(tr.popularity(spec.experts, spec.top20_share))
    return np.stack([base[rng.permutation(spec.experts)] for _ in range(spec.layers)])


def candidates(spec: tr.TraceSpec, half_lives: Sequence[float], guard: int) -> list[tuple[str, object, dict]]:
    """The online policies compared on a trace: (label, policy, options)."""
    out: list[tuple[str, object, dict]] = [("lru", "lru", {})]
    for hl in half_lives:
        out.append((f"lfu(half_life={hl:g},guard={guard})", "lfu", {"half_life": hl, "guard": guard}))
    if spec.drift == 0:  # the generator's popularity is only the truth while it does not drift
        out.append(("oracle-popularity (reference)", OraclePolicy(layer_log_popularity(spec), guard), {}))
        out.append(("oracle-generator (reference)", GeneratorOracle(spec), {}))
    return out


def _row(trace: str, fraction: float, policy: str, hit_rate: float, best: float) -> dict:
    return {
        "trace": trace,
        "budget_fraction": fraction,
        "policy": policy,
        "hit_rate": hit_rate,
        "belady_hit_rate": best,
        "over_belady": hit_rate / best if best else 0.0,
    }


def policy_study(
    traces: dict[str, tuple[tr.TraceSpec, np.ndarray]],
    record_bytes: int,
    fractions: Sequence[float],
    half_lives: Sequence[float],
    guard: int,
) -> list[dict]:
    """Hit rates of LRU, LFU variants, the two oracles and Belady, per trace and budget."""
    rows = []
    for trace_name, (spec, trace) in traces.items():
        manifest = synthetic_manifest(spec.layers, spec.experts, record_bytes)
        steps = list(tr.decode_steps(trace))
        total = spec.layers * spec.experts
        for frac in fractions:
            capacity = int(frac * total)
            best = tr.belady(steps, capacity)["hit_rate"]
            budget = capacity * record_bytes
            found = []
            for label, policy, options in candidates(spec, half_lives, guard):
                hit_rate = simulate(steps, manifest, budget, policy, **options)["hit_rate"]
                found.append(_row(trace_name, frac, label, hit_rate, best))
            belady = _row(trace_name, frac, "belady (offline optimum)", best, best)
            found.append({**belady, "over_belady": 1.0})
            rows += found
            log(
                f"policies: {trace_name} @ {frac:.0%}: "
                + ", ".join(f"{r['policy'].split('(')[0]}={r['hit_rate']:.3f}" for r in found)
            )
    return rows
