"""The expert cache: a byte budget over (layer, expert) records, with a replacement policy.

The cache never holds more than its budget. Experts the current computation needs are pinned
while it runs, so eviction only ever drops experts nobody is about to use.

Policies (O(1) or O(log n) per operation; neither sorts on eviction), by name or as objects
(:class:`LRU`, :class:`LFU`, or anything with the :class:`ReplacementPolicy` methods, such as the
benchmarks' oracles):

* ``"lru"``: least recently used first.
* ``"lfu"``: least frequently used first, with exponential aging, behind a recency guard. An
  expert's score is ``sum(2 ** ((t_i - now) / half_life))`` over its past uses ``t_i`` (LRFU,
  Lee et al. 2001; time counts uses of the expert's layer), so a use weighs half as much
  ``half_life`` uses later; the score survives eviction, so an expert that comes back is judged
  by its history. Experts used within the last ``guard`` uses of their layer are not evicted
  (like the window of W-TinyLFU): MoE routing reuses ~30% of the previous token's experts, and
  plain LFU would evict exactly those first, since they are new.

``DEFAULT_POLICY`` is the one measured best against Belady's optimum on the calibrated
Qwen3.5-397B routing trace (see ``bench/RESULTS.md``).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

Key = tuple[int, int]  # (MoE layer index, expert index)
Value = TypeVar("Value")
Policy = Literal["lru", "lfu"]
POLICIES: tuple[str, ...] = ("lru", "lfu")
DEFAULT_POLICY: Policy = "lfu"
# Half-life of an expert's use count, in uses of its own layer (K per decoded token): ~1,000
# tokens at K=10. Chosen by measurement (bench/RESULTS.md, policy table): on the calibrated trace
# longer memory is better (popularity is stable) and this is within 0.5% of infinite memory, while
# still forgetting a topic's experts within a few thousand tokens.
DEFAULT_HALF_LIFE = 10240
# Recency guard, in uses of the expert's layer: one token's worth at the model's K (10 for
# Qwen3.5 / Qwen3-Next). Protects exactly the experts the next token is likely to repeat.
DEFAULT_GUARD = 10


class ReplacementPolicy(Protocol):
    """What ``ExpertCache`` asks of a policy: told of every use and removal, it names victims."""

    def touch(self, key: Key) -> None:
        """``key`` was used (a hit, or inserted)."""

    def remove(self, key: Key) -> None:
        """``key`` left the cache."""

    def victim(self, pinned: set[Key]) -> Key | None:
        """The entry to evict next, never a pinned one; None if every entry is pinned."""


class LRU:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, pinned: set[Key]) -> Key | None:
        """The entry to evict next, skipping pinned ones; None if every entry is pinned.

        Pinned entries were just used, so they sit at the recent end: this is O(1) in practice.
        """
        for key in self._order:
            if key not in pinned:
                return key
        return None


class LFU:
    """LFU with exponential aging (LRFU scores) behind a recency guard.

    An expert used within the last ``guard`` uses of its layer is never a victim (unless every
    unpinned entry is guarded; then the least recently used one goes): MoE routing reuses a
    large share of the previous token's experts, which plain LFU would evict first since they
    are new. Past the guard, experts are evicted by lowest aged use count. Scores are kept as
    log2 so they never overflow, and survive eviction. A subclass may score experts otherwise
    by overriding :meth:`score`.
    """

    def __init__(self, half_life: float = DEFAULT_HALF_LIFE, guard: int = DEFAULT_GUARD) -> None:
        if half_life <= 0:
            raise ValueError(f"half_life must be positive, got {half_life}")
        if guard < 0:
            raise ValueError(f"guard must be >= 0, got {guard}")
        self._half_life = float(half_life)
        self._guard = guard
        self._clock: dict[int, int] = {}  # layer -> uses of that layer so far
        self._log_score: dict[Key, float] = {}  # aged use count (log2); history survives eviction
        self._recent: OrderedDict[Key, int] = OrderedDict()  # guarded keys -> their last use
        self._main = _ScoreHeap()  # unguarded resident keys by score

    def touch(self, key: Key) -> None:
        layer = key[0]
        now = self._clock.get(layer, 0) + 1
        self._clock[layer] = now
        self._log_score[key] = self.score(key, now)
        self._main.discard(key)
        self._recent[key] = now
        self._recent.move_to_end(key)

    def score(self, key: Key, now: int) -> float:
        """``key``'s score (log2 of its aged use count) after a use at ``now``, counted in uses
        of its layer; the lowest score past the guard is evicted first."""
        old = self._log_score.get(key)
        if math.isinf(self._half_life):
            score = 0.0 if old is None else math.log2(2.0**old + 1.0)
        else:
            new = now / self._half_life
            if old is None:
                score = new
            else:
                hi, lo = (old, new) if old > new else (new, old)
                score = hi + math.log2(1.0 + 2.0 ** (lo - hi))
        return score

    def _expire(self) -> None:
        """Move keys whose last use is more than ``guard`` uses of their layer ago to the heap.

        ``_recent`` is in global recency order; a key at its front has the oldest last use of all
        guarded keys, but clocks are per layer, so scan until a still-guarded key is found.
        """
        while self._recent:
            key, last = next(iter(self._recent.items()))
            if self._clock[key[0]] - last < self._guard:
                break
            del self._recent[key]
            self._main.push(key, (self._log_score[key], last))

    def remove(self, key: Key) -> None:
        self._recent.pop(key, None)
        self._main.discard(key)

    def victim(self, pinned: set[Key]) -> Key | None:
        self._expire()
        found = self._main.lowest(pinned)
        if found is not None:
            return found
        for key in self._recent:
            if key not in pinned:
                return key
        return None


class _ScoreHeap:
    """Keys by score (lowest first), with lazy deletion."""

    def __init__(self) -> None:
        self._live: dict[Key, int] = {}
        self._heap: list[tuple[object, int, Key]] = []
        self._seq = 0

    def push(self, key: Key, score: object) -> None:
        self._seq += 1
        self._live[key] = self._seq
        heapq.heappush(self._heap, (score, self._seq, key))
        if len(self._heap) > 4 * len(self._live) + 64:
            self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def discard(self, key: Key) -> None:
        self._live.pop(key, None)

    def lowest(self, pinned: set[Key]) -> Key | None:
        held, found = [], None
        while self._heap:
            entry = self._heap[0]
            if self._live.get(entry[2]) != entry[1]:
                heapq.heappop(self._heap)  # stale
            elif entry[2] in pinned:
                held.append(heapq.heappop(self._heap))
            else:
                found = entry[2]
                break
        for entry in held:
            heapq.heappush(self._heap, entry)
        return found


def make_policy(name: Policy, **options) -> ReplacementPolicy:
    """The policy called ``name`` (one of ``POLICIES``), built with ``options`` (``half_life`` and
    ``guard`` for ``"lfu"``)."""
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU(**options)
    raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")


@dataclass
class CacheCounters:
    """Running totals of the cache."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    bytes_peak: int = 0


class ExpertCache(Generic[Value]):
    """Byte-budgeted mapping (layer, expert) -> value, with pinning.

    ``policy`` is a name (``policy_options`` then go to :func:`make_policy`: ``half_life`` and
    ``guard`` for ``"lfu"``) or a policy object (a :class:`ReplacementPolicy`, used as given).
    """

    def __init__(
        self, budget_bytes: int, policy: Policy | ReplacementPolicy = DEFAULT_POLICY, **policy_options
    ):
        if budget_bytes <= 0:
            raise ValueError(f"cache budget must be positive, got {budget_bytes} bytes")
        self.budget_bytes = int(budget_bytes)
        if isinstance(policy, str):
            self.policy_name = policy
            self._policy = make_policy(policy, **policy_options)
        else:
            if policy_options:
                raise ValueError(f"options {sorted(policy_options)} apply to a policy given by name only")
            self.policy_name = type(policy).__name__
            self._policy = policy
        self._items: dict[Key, tuple[Value, int]] = {}
        self._pinned: set[Key] = set()
        self.counters = CacheCounters()

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self.counters.bytes

    def lookup(self, key: Key) -> Value | None:
        """Return a cached value (counting a hit) or None (counting a miss)."""
        item = self._items.get(key)
        if item is None:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        self._policy.touch(key)
        return item[0]

    def get(self, key: Key) -> Value:
        """Return a value known to be cached, without counting."""
        return self._items[key][0]

    def pin(self, keys: Iterable[Key]) -> None:
        self._pinned.update(keys)

    def unpin_all(self) -> None:
        self._pinned.clear()

    def free_bytes_unpinned(self) -> int:
        """Bytes that could be made free by evicting everything not pinned, plus free space."""
        pinned = sum(self._items[k][1] for k in self._pinned if k in self._items)
        return self.budget_bytes - pinned

    def insert(self, key: Key, value: Value, nbytes: int) -> None:
        """Insert, evicting unpinned entries as needed. Raises if it cannot fit."""
        if key in self._items:
            self._policy.touch(key)
            return
        self._make_room(nbytes)
        self._items[key] = (value, nbytes)
        self._policy.touch(key)
        self.counters.bytes += nbytes
        self.counters.bytes_peak = max(self.counters.bytes_peak, self.counters.bytes)

    def _make_room(self, nbytes: int) -> None:
        while self.counters.bytes + nbytes > self.budget_bytes:
            victim = self._policy.victim(self._pinned)
            if victim is None:
                raise MemoryError(
                    f"expert cache budget of {self.budget_bytes} bytes cannot fit {nbytes} more "
                    f"bytes with {len(self._pinned)} experts pinned"
                )
            self._evict(victim)

    def _evict(self, key: Key) -> None:
        _, nbytes = self._items.pop(key)
        self._policy.remove(key)
        self.counters.bytes -= nbytes
        self.counters.evictions += 1

    def clear(self) -> None:
        for key in list(self._items):
            self._evict(key)
