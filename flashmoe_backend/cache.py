"""The expert cache: a byte budget over (layer, expert) records, with a replacement policy.

The cache never holds more than its budget. Experts the current computation needs are pinned
while it runs, so eviction only ever drops experts nobody is about to use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

Key = tuple[int, int]  # (MoE layer index, expert index)
Value = TypeVar("Value")
Policy = Literal["lru", "lfu"]


class _LRU:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterable[Key]:
        return iter(list(self._order))


class _LFU(_LRU):
    """Least frequently used first, ties broken by recency; counts halve periodically so that
    experts hot long ago do not squat forever (a simple form of LFU with aging)."""

    def __init__(self, half_life: int = 4096) -> None:
        super().__init__()
        self._count: dict[Key, float] = {}
        self._touches = 0
        self._half_life = half_life

    def touch(self, key: Key) -> None:
        super().touch(key)
        self._count[key] = self._count.get(key, 0.0) + 1.0
        self._touches += 1
        if self._touches % self._half_life == 0:
            self._count = {k: c / 2 for k, c in self._count.items()}

    def victims(self) -> Iterable[Key]:
        rank = {k: i for i, k in enumerate(self._order)}
        return iter(sorted(self._order, key=lambda k: (self._count.get(k, 0.0), rank[k])))


def make_policy(name: Policy):
    if name == "lru":
        return _LRU()
    if name == "lfu":
        return _LFU()
    raise ValueError(f"unknown cache policy {name!r}; choose 'lru' or 'lfu'")


@dataclass
class CacheCounters:
    """Running totals of the cache."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    bytes_peak: int = 0


class ExpertCache(Generic[Value]):
    """Byte-budgeted mapping (layer, expert) -> value, with pinning."""

    def __init__(self, budget_bytes: int, policy: Policy = "lru"):
        if budget_bytes <= 0:
            raise ValueError(f"cache budget must be positive, got {budget_bytes} bytes")
        self.budget_bytes = int(budget_bytes)
        self.policy_name = policy
        self._policy = make_policy(policy)
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
        if self.counters.bytes + nbytes <= self.budget_bytes:
            return
        for victim in self._policy.victims():
            if victim in self._pinned:
                continue
            self._evict(victim)
            if self.counters.bytes + nbytes <= self.budget_bytes:
                return
        raise MemoryError(
            f"expert cache budget of {self.budget_bytes} bytes cannot fit {nbytes} more bytes "
            f"with {len(self._pinned)} experts pinned"
        )

    def _evict(self, key: Key) -> None:
        _, nbytes = self._items.pop(key)
        self._policy.remove(key)
        self.counters.bytes -= nbytes
        self.counters.evictions += 1

    def clear(self) -> None:
        for key in list(self._items):
            self._evict(key)
