"""Expert parallelism over ``mx.distributed``: one model on N ranks, each streaming its share of
every MoE layer's experts from its own disk into its own cache.

Under ``mlx.launch`` (or with an explicit ``group=``), ``FlashMoE.load`` gives every rank an
``ExpertGroup``. Rank 0 is the engine as it is without a group: it holds the resident weights,
the KV caches and prompt caches, runs the router, samples, and does everything a front end asks
(constrained decoding, tools, the server, Outlines driving ``engine.model`` directly). The other
ranks are expert servers: ``engine.follow()`` loops over rank 0's layer calls.

One MoE layer call, on every rank:

1. rank 0 sends the layer's input rows and the router's choice (``x`` and the top-k indices) to
   the others, the rows' bits as int32 words, so the copy is exact: with two ranks a
   ``send``; with more an ``all_sum`` in which the others contribute zeros (MLX has no
   broadcast, and the ring backend sends only to a rank's neighbours);
2. each rank computes the (token, k) rows routed to the experts it owns and zeros for the rest
   (``StreamingSwitch.partial``), reading and caching only its own experts;
3. rank 0 sums every rank's ``[tokens, k, hidden]`` rows (two ranks: the other ``send``s its
   rows; more: an ``all_sum``). Every row has exactly one non-zero contribution, so the sum is
   exact: the output is bit for bit that of one process (the tests check greedy tokens and
   logits against one).

Why rank 0 sends the routing instead of every rank running the router itself: identical routing
on every rank would need bitwise identical hidden states, hence bitwise identical attention on
every machine, which two Mac models (different GPU kernels) do not promise; a rank that routes
one token differently would silently add wrong rows. Sending costs one more small message per
layer (``hidden + k`` words at decode; with two ranks the two sends take about one round trip,
what one ``all_sum`` of replicated ranks would take), and buys more: the other ranks hold no resident weights
(loaded lazily, never read), no KV or prompt caches, so all their memory is expert cache, and
every way rank 0 drives the model works unchanged, without mirroring caches across ranks.

Expert ownership (``expert_split``): ``"interleaved"`` (expert e on rank e % N, the default) or
``"blocks"`` (contiguous ranges: a rank's experts are one contiguous byte range of each layer
file). On a router whose popularity is unrelated to expert ids both balance alike (measured on
the calibrated trace, bench/RESULTS.md); interleaving is the default because it also spreads any
run of adjacent popular ids (e.g. upcycled experts) over the ranks, where blocks would put it on
one. The same measurement says what expert parallelism costs: each layer waits for its slowest
rank, and a token's experts split unevenly, so the critical path is ~1.3x (2 ranks) to ~2x
(4 ranks) the mean rank's reads; tensor parallelism of each expert would be balanced, but needs
records laid out per rank (a column slice of ``down_proj`` is strided in today's records).

Failure: every wait of rank 0 on the others runs under a watchdog (``timeout_s``). A rank that
dies closes its sockets and MLX fails the collective at once; a rank that hangs or a host that
went away is caught by the watchdog, which severs this process's ring connections so that the
collective fails in its own thread; either way the caller gets a ``DistributedError`` saying what
was being waited for. Should a backend keep blocking anyway (one without sockets to sever), the
watchdog prints the error and ends the process: a clear error, never a hang. The group cannot be
repaired: after an error every call raises; restart all ranks.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import mlx.core as mx
import numpy as np

from flashmoe_backend.errors import DistributedError

if TYPE_CHECKING:
    from flashmoe_backend.experts.switch import ExpertStreamer, StreamingSwitch

Split = Literal["interleaved", "blocks"]
SPLITS: tuple[str, ...] = ("interleaved", "blocks")
DEFAULT_SPLIT: Split = "interleaved"
#: How long rank 0 waits for the others in one collective before it calls them lost. A layer
#: call waits for the slowest rank's reads of one layer (well under a second on an SSD), so this
#: only has to exceed stalls, not work.
DEFAULT_TIMEOUT_S = 30.0
#: The handshake at load waits for every rank to finish loading, which can take minutes on a
#: cold disk.
HANDSHAKE_TIMEOUT_S = 900.0
#: After the watchdog severs the connections, how long it lets the blocked collective fail on
#: its own before it ends the process.
GRACE_S = 10.0
#: The exit status of a process the watchdog ends (EX_SOFTWARE).
EXIT_STATUS = 70

# Message header words: command, MoE layer, rows, k, width, dtype code, payload words (0: the
# payload is inline), sequence number.
_HEADER = 8
_LAYER, _STATS, _SHUTDOWN = 1, 2, 3
_CODES = {mx.float32: 0, mx.bfloat16: 1, mx.float16: 2}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
# Per-rank counters exchanged by ``gather_stats``, in this order (times in microseconds).
_FIELDS = (
    "bytes_read", "experts_read", "hits", "misses", "io_us", "comm_us", "combine_us",
    "messages", "comm_bytes", "passes", "cache_bytes", "cache_bytes_peak", "budget_bytes",
)


def detect_group(group: Any = "auto") -> mx.distributed.Group | None:
    """The group to run one model over, or ``None`` for one process.

    ``"auto"``: the group ``mlx.launch`` started (``mx.distributed.init(strict=False)``), if it
    has more than one rank; ``None``: one process; a ``mx.distributed.Group``: that group.
    """
    if group is None:
        return None
    if isinstance(group, str):
        if group != "auto":
            raise ValueError(f"group must be 'auto', None or an mx.distributed.Group, got {group!r}")
        group = mx.distributed.init(strict=False)
    return group if group.size() > 1 else None


def launched_rank() -> int:
    """This process's rank in the group ``mlx.launch`` started (0 when it started none): a front
    end that must do something on rank 0 only before the engine loads (bind a port) asks this."""
    group = detect_group("auto")
    return group.rank() if group is not None else 0


def owners(num_experts: int, size: int, split: Split = DEFAULT_SPLIT) -> np.ndarray:
    """The rank that owns each of a layer's experts (``[num_experts]`` ints).

    ``"interleaved"``: expert e on rank ``e % size``; ``"blocks"``: contiguous ranges, the
    first ``num_experts % size`` ranks one expert more.
    """
    if split == "interleaved":
        return np.arange(num_experts) % size
    if split == "blocks":
        return np.repeat(np.arange(size), [len(b) for b in np.array_split(np.arange(num_experts), size)])
    raise ValueError(f"expert_split must be one of {', '.join(SPLITS)}, got {split!r}")


@dataclass
class RankStats:
    """One rank's counters over a span (a generation): what it read, what its cache served, and
    how long it spent in collectives.

    ``comm_seconds`` is all the time in collectives; ``combine_seconds`` the part waiting for the
    layer outputs to be summed, which includes waiting for the slowest rank's reads (the
    critical path), not only the transfer. ``passes`` counts forward passes (calls of MoE layer 0).
    """

    rank: int
    bytes_read: int = 0
    experts_read: int = 0
    hits: int = 0
    misses: int = 0
    io_seconds: float = 0.0
    comm_seconds: float = 0.0
    combine_seconds: float = 0.0
    messages: int = 0
    comm_bytes: int = 0
    passes: int = 0
    cache_bytes: int = 0
    cache_bytes_peak: int = 0
    budget_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass
class DistributedStats:
    """Every rank's ``RankStats`` over one generation (``engine.distributed_stats``), and the
    aggregates: the bytes all ranks read, the most one rank read (the critical path when each
    rank has its own disk) and rank 0's communication time per generated token."""

    ranks: list[RankStats] = field(default_factory=list)
    generated_tokens: int = 0
    split: str = DEFAULT_SPLIT

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.ranks)

    @property
    def max_bytes_read(self) -> int:
        return max((r.bytes_read for r in self.ranks), default=0)

    @property
    def hits(self) -> int:
        return sum(r.hits for r in self.ranks)

    @property
    def misses(self) -> int:
        return sum(r.misses for r in self.ranks)

    @property
    def comm_seconds_per_token(self) -> float:
        """Rank 0's time in collectives per generated token (prefill's share included)."""
        if not self.ranks or not self.generated_tokens:
            return 0.0
        return self.ranks[0].comm_seconds / self.generated_tokens

    def to_dict(self) -> dict:
        """All counters, per rank and aggregated, JSON-ready."""
        return {
            "split": self.split,
            "generated_tokens": self.generated_tokens,
            "bytes_read": self.bytes_read,
            "max_bytes_read": self.max_bytes_read,
            "hits": self.hits,
            "misses": self.misses,
            "comm_seconds_per_token": self.comm_seconds_per_token,
            "ranks": [{**asdict(r), "hit_rate": r.hit_rate} for r in self.ranks],
        }


def _ring_addresses() -> set[tuple[str, int]]:
    """The (ip, port) pairs of the ring backend's hostfile (``mlx.launch`` sets MLX_HOSTFILE)."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return set()
    try:
        with open(path) as f:
            hosts = json.load(f)
    except (OSError, ValueError):
        return set()
    found = set()
    for node in hosts if isinstance(hosts, list) else []:
        for entry in node if isinstance(node, list) else []:
            ip, _, port = str(entry).rpartition(":")
            if port.isdigit():
                found.add((ip, int(port)))
    return found


def _fds() -> list[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return [int(name) for name in os.listdir(folder) if name.isdigit()]
        except OSError:
            continue
    return []


def sever_ring_connections() -> int:
    """Shut down this process's TCP connections to the ring's addresses (the other ranks), so
    that a collective blocked on them fails in MLX's own threads; returns how many. Other
    sockets (a server's clients) are left alone."""
    addresses = _ring_addresses()
    severed = 0
    for fd in _fds():
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # not a socket
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ends = [sock.getsockname()[:2]]
            try:
                ends.append(sock.getpeername()[:2])
            except OSError:  # a listening socket
                pass
            if any(end in addresses for end in ends):
                sock.shutdown(socket.SHUT_RDWR)
                severed += 1
        except OSError:
            pass
        finally:
            sock.close()  # the duplicate only; the shutdown is what MLX's socket sees
    return severed


class Watchdog:
    """Bounds every wait on the other ranks: armed around a blocking collective; when one
    outlives its deadline, severs the ring connections (the collective then fails with an error
    in the waiting thread) and, should it still block after ``GRACE_S``, prints the error and
    ends the process."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self.expired: str | None = None  # the error, once a deadline has passed
        self._armed: tuple[int, float, str, float] | None = None  # (token, deadline, what, timeout)
        self._tokens = 0
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def message(self, what: str, timeout: float) -> str:
        """The error of a wait that timed out."""
        return (
            f"rank {self.rank} of {self.size}: no answer from the other ranks within {timeout:g} s "
            f"while {what}: a rank died, hangs, or its host is unreachable; restart all ranks"
        )

    @contextmanager
    def guard(self, what: str, timeout: float) -> Iterator[None]:
        """Arm the watchdog for one wait of at most ``timeout`` seconds."""
        self._tokens += 1
        self._armed = (self._tokens, time.monotonic() + timeout, what, timeout)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, args=(min(0.5, timeout / 10),), name="flashmoe-watchdog",
                daemon=True,
            )
            self._thread.start()
        try:
            yield
        finally:
            self._armed = None

    def _watch(self, poll: float) -> None:
        while not self._stopped.wait(poll):
            armed = self._armed
            if armed is None or time.monotonic() < armed[1]:
                continue
            token, _, what, timeout = armed
            self.expired = self.message(what, timeout)
            sever_ring_connections()
            end = time.monotonic() + GRACE_S
            while time.monotonic() < end:
                current = self._armed
                if current is None or current[0] != token:
                    return  # the wait failed in its own thread, which reports it
                time.sleep(0.05)
            print(f"flashmoe: error: {self.expired}", file=sys.stderr, flush=True)
            os._exit(EXIT_STATUS)

    def stop(self) -> None:
        """End the watchdog's thread (at close)."""
        self._stopped.set()


class ExpertGroup:
    """One engine's share of a group of ranks: which experts this rank owns, the layer protocol
    (rank 0's ``forward``, the other ranks' ``follow``), statistics and failure handling.

    ``FlashMoE.load`` makes it (``streamer.shard`` then routes every MoE layer call through
    ``forward``); it needs a group of more than one rank.
    """

    def __init__(
        self,
        group: mx.distributed.Group,
        streamer: ExpertStreamer,
        *,
        split: Split = DEFAULT_SPLIT,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        width: int,
        k: int,
    ):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.split = split
        self.timeout_s = float(timeout_s)
        self.streamer = streamer
        self._owners = [owners(layer.num_experts, self.size, split) for layer in streamer.manifest.layers]
        self._owned = [o == self.rank for o in self._owners]
        # A decode step's message (one row of ``width`` and its ``k`` indices) fits inline: one
        # collective per layer carries the header and the payload.
        self._inline = width + k
        # Two ranks talk point to point, a send each way per layer call: on a ring of two each
        # all_sum is itself an exchange both ways (reduce-scatter, then all-gather), so two of
        # them are twice the hops (bench/RESULTS.md has both timed). More ranks use all_sum: the
        # ring backend sends only to a rank's neighbours.
        self._p2p = self.size == 2
        self._seq = 0
        self._lock = threading.RLock()  # one message exchange at a time (server threads)
        self._broken: str | None = None
        self._closed = False
        self.watchdog = Watchdog(self.rank, self.size)
        self._comm_us = self._combine_us = 0
        self._messages = self._comm_bytes = self._passes = 0
        self._previous: np.ndarray | None = None  # every rank's totals at the last gather
        if self.rank == 0:
            # Followers wait for rank 0's next call; an exit that skips ``close`` would leave
            # them waiting for a connection to drop instead of a clean shutdown.
            ref = weakref.ref(self)
            atexit.register(lambda: (group_ := ref()) is not None and group_.close())

    # -- ownership -------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this is rank 0, the one that drives the model."""
        return self.rank == 0

    def owns(self, layer: int, expert: int) -> bool:
        """Whether this rank reads and computes ``expert`` of MoE layer ``layer``."""
        return bool(self._owned[layer][expert])

    def owned(self, layer: int, host: np.ndarray) -> list[int]:
        """The experts of ``host`` (router indices) this rank owns, sorted, each once."""
        needed = np.unique(host)
        return needed[self._owned[layer][needed]].tolist()

    # -- failure ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self._broken is not None:
            raise DistributedError(f"the distributed group is broken: {self._broken}")
        if self._closed:
            raise DistributedError("the distributed group is closed")

    def _wait(self, arrays: list[mx.array], what: str, timeout: float | None = None) -> float:
        """Evaluate collectives; returns the seconds waited. ``timeout=None``: the group's;
        ``0``: no limit (a follower idling until rank 0's next call)."""
        timeout = self.timeout_s if timeout is None else timeout
        tic = time.perf_counter()
        try:
            if timeout:
                with self.watchdog.guard(what, timeout):
                    mx.eval(arrays)
            else:
                mx.eval(arrays)
        except RuntimeError as e:
            if self.watchdog.expired is not None:
                self._broken = self.watchdog.expired
            else:
                self._broken = (
                    f"rank {self.rank} of {self.size}: lost the connection to another rank while "
                    f"{what} ({e}): a rank died or its host went away; restart all ranks"
                )
            raise DistributedError(self._broken) from e
        seconds = time.perf_counter() - tic
        if timeout:  # a follower's idle wait for rank 0's next call is not communication
            self._comm_us += int(seconds * 1e6)
        self._messages += 1
        self._comm_bytes += sum(a.nbytes for a in arrays)
        return seconds

    # -- messages (rank 0 -> all) ------------------------------------------------------------

    def _send(self, command: int, header: Sequence[int] = (), payload: mx.array | None = None,
              what: str = "sending a message") -> None:
        n = 0 if payload is None else payload.size
        inline = n <= self._inline
        words = [command, *header][:6]
        words += [0] * (6 - len(words)) + [0 if inline else n, self._seq]
        self._seq = (self._seq + 1) % 2**31
        parts = [mx.array(words, dtype=mx.int32)]
        if inline and n:
            parts.append(payload)
        if self._inline - (n if inline else 0):
            parts.append(mx.zeros((self._inline - (n if inline else 0),), dtype=mx.int32))
        self._wait(self._post(mx.concatenate(parts)), what)
        if not inline:
            # A separate wait: evaluated together, MLX could run the two in either order.
            self._wait(self._post(payload), what)

    def _post(self, words: mx.array) -> list[mx.array]:
        """Rank 0's side of a broadcast (int32 words; the others call ``_take``)."""
        if self._p2p:
            return [mx.distributed.send(words, 1, group=self.group)]
        return [mx.distributed.all_sum(words, group=self.group)]

    def _take(self, n: int) -> mx.array:
        """The other ranks' side of ``_post``: ``n`` int32 words from rank 0."""
        if self._p2p:
            return mx.distributed.recv((n,), mx.int32, 0, group=self.group)
        return mx.distributed.all_sum(mx.zeros((n,), dtype=mx.int32), group=self.group)

    def _receive(self) -> tuple[np.ndarray, mx.array]:
        """Rank 0's next message: its header and payload words. Waits without a limit for the
        header (rank 0 may idle for hours between requests)."""
        message = self._take(_HEADER + self._inline)
        self._wait([message], "waiting for rank 0", timeout=0)
        header = np.array(message[:_HEADER])
        if header[7] != self._seq or header[0] not in (_LAYER, _STATS, _SHUTDOWN):
            self._broken = (
                f"rank {self.rank}: out of step with rank 0 (message {int(header[7])}, command "
                f"{int(header[0])}, expected message {self._seq}); restart all ranks"
            )
            raise DistributedError(self._broken)
        self._seq = (self._seq + 1) % 2**31
        if header[6] == 0:
            return header, message[_HEADER:]
        payload = self._take(int(header[6]))
        self._wait([payload], "receiving a layer's input from rank 0")
        return header, payload

    # -- one MoE layer call --------------------------------------------------------------------

    def forward(self, switch: StreamingSwitch, x: mx.array, host: np.ndarray, dtype: mx.Dtype) -> mx.array:
        """Rank 0's MoE layer call (from ``StreamingSwitch.__call__``): send the layer's input
        rows and routing to the other ranks, compute this rank's experts, sum every rank's
        rows. Returns what the switch would return in one process."""
        if not self.is_leader:
            raise DistributedError(
                f"rank {self.rank} ran the model: only rank 0 drives it; the other ranks call "
                "engine.follow()"
            )
        if x.dtype not in _CODES:
            raise DistributedError(
                f"expert parallelism carries float32, bfloat16 or float16 rows, not {x.dtype}"
            )
        layer, k, width = switch.layer, host.shape[-1], x.shape[-1]
        rows = host.size // k
        with self._lock:
            self._check()
            payload = mx.concatenate([
                _to_words(x.reshape(rows, width)).reshape(-1),
                mx.array(host.reshape(-1).astype(np.int32)),
            ])
            try:
                self._send(_LAYER, (layer, rows, k, width, _CODES[x.dtype]), payload,
                           f"sending MoE layer {layer}'s input")
                if layer == 0:
                    self._passes += 1
                y = switch.partial(x, host, dtype, self.owned(layer, host))
                return self._combine(y, layer, host)
            except DistributedError:
                raise
            except BaseException as e:
                # The others already work on this layer: the group is out of step.
                self._broken = (
                    f"rank 0 failed in the middle of MoE layer {layer} ({type(e).__name__}: {e}); "
                    "restart all ranks"
                )
                raise

    def _combine(self, y: mx.array, layer: int, host: np.ndarray) -> mx.array:
        """Every rank's rows of one layer call, summed on rank 0 (the others return theirs)."""
        mx.eval(y)  # this rank's own experts first: what is timed below is waiting and transfer
        what = f"combining MoE layer {layer}'s expert outputs"
        if not self._p2p:
            total = mx.distributed.all_sum(y, group=self.group)
            self._combine_us += int(1e6 * self._wait([total], what))
            return total
        # Two ranks: only rank 1's own rows travel (both sides know which from the routing and
        # the ownership), half of what summing whole [tokens, k, hidden] arrays would send.
        rows = np.nonzero(self._owners[layer][host.reshape(-1)] == 1)[0]
        if not rows.size:
            return y
        flat = y.reshape(-1, y.shape[-1])
        if not self.is_leader:
            sent = mx.distributed.send(flat[mx.array(rows)], 0, group=self.group)
            self._combine_us += int(1e6 * self._wait([sent], what))
            return y
        theirs = mx.distributed.recv((rows.size, flat.shape[-1]), y.dtype, 1, group=self.group)
        self._combine_us += int(1e6 * self._wait([theirs], what))
        flat[mx.array(rows)] = theirs  # rank 0's rows there are zeros: the result is exact
        return flat.reshape(y.shape)

    # -- the other ranks -------------------------------------------------------------------------

    def follow(self, switches: Sequence[StreamingSwitch]) -> None:
        """Serve rank 0's layer calls until rank 0 shuts the group down (``close`` there, or
        its exit). Raises ``DistributedError`` if rank 0 goes away without a shutdown."""
        if self.is_leader:
            raise DistributedError("rank 0 drives the model; follow() is for the other ranks")
        by_layer = {s.layer: s for s in switches}
        with self._lock:
            self._check()
            while True:
                header, words = self._receive()
                command = int(header[0])
                if command == _SHUTDOWN:
                    self._closed = True
                    return
                if command == _STATS:
                    self._exchange()
                    continue
                layer, rows, k, width, code = (int(v) for v in header[1:6])
                n = rows * _words_per_row(code, width)
                x = _from_words(words[:n], code, width).reshape(rows, width)
                host = np.array(words[n : n + rows * k]).reshape(rows, k)
                if layer == 0:
                    self._passes += 1
                y = by_layer[layer].partial(x, host, mx.uint32, self.owned(layer, host))
                self._combine(y, layer, host)

    # -- statistics --------------------------------------------------------------------------

    def _totals(self) -> np.ndarray:
        counters, cache = self.streamer.counters, self.streamer.cache
        c = cache.counters
        values = dict(
            bytes_read=counters.bytes_read, experts_read=counters.experts_read, hits=c.hits,
            misses=c.misses, io_us=int(counters.io_seconds * 1e6), comm_us=self._comm_us,
            combine_us=self._combine_us, messages=self._messages, comm_bytes=self._comm_bytes,
            passes=self._passes, cache_bytes=c.bytes, cache_bytes_peak=c.bytes_peak,
            budget_bytes=cache.budget_bytes,
        )
        return np.array([values[f] for f in _FIELDS], dtype=np.int64)

    def _exchange(self) -> np.ndarray:
        """Every rank's totals (``[size, fields]``), on every rank."""
        with mx.stream(mx.cpu):  # int64 is a CPU type on some backends
            gathered = mx.distributed.all_gather(mx.array(self._totals()), group=self.group)
        self._wait([gathered], "gathering statistics")
        cache = self.streamer.cache.counters
        if not self.is_leader:
            cache.bytes_peak = cache.bytes  # the next span's peak starts here (rank 0: the engine)
        return np.array(gathered).reshape(self.size, len(_FIELDS))

    def gather_stats(self, generated_tokens: int = 0) -> DistributedStats:
        """Every rank's counters since the previous gather (on rank 0; a collective, the other
        ranks answer from ``follow``): the engine calls it after each generation."""
        with self._lock:
            self._check()
            self._send(_STATS, what="asking for statistics")
            totals = self._exchange()
        since = totals - (self._previous if self._previous is not None else 0)
        self._previous = totals
        ranks = []
        for rank, row in enumerate(since):
            values = dict(zip(_FIELDS, row.tolist(), strict=True))
            for gauge in ("cache_bytes", "cache_bytes_peak", "budget_bytes"):
                values[gauge] = int(totals[rank][_FIELDS.index(gauge)])  # gauges, not counts
            ranks.append(RankStats(
                rank=rank,
                io_seconds=values.pop("io_us") / 1e6,
                comm_seconds=values.pop("comm_us") / 1e6,
                combine_seconds=values.pop("combine_us") / 1e6,
                **values,
            ))
        return DistributedStats(ranks, generated_tokens, self.split)

    # -- lifetime ----------------------------------------------------------------------------

    def handshake(self, identity: bytes) -> None:
        """Check, at load, that every rank loaded the same model with the same split and
        experts per token (``identity``); a ``DistributedError`` naming the ranks that differ."""
        digest = zlib.crc32(identity) & 0x7FFFFFFF
        with mx.stream(mx.cpu):
            gathered = mx.distributed.all_gather(
                mx.array([digest, self._inline], dtype=mx.int64), group=self.group
            )
        self._wait([gathered], "waiting for every rank to load the model", HANDSHAKE_TIMEOUT_S)
        rows = np.array(gathered).reshape(self.size, 2)
        differ = [r for r in range(self.size) if tuple(rows[r]) != tuple(rows[0])]
        if differ:
            self._broken = (
                f"rank(s) {', '.join(map(str, differ))} loaded another model, expert split or "
                "experts_per_token than rank 0; every rank must load the same store with the same "
                "options (cache_gb may differ)"
            )
            raise DistributedError(self._broken)

    def close(self) -> None:
        """On rank 0: tell the other ranks to stop following (their ``follow`` returns). Then
        stop the watchdog. Idempotent; a broken group is closed without a message."""
        with self._lock:
            if self._closed:
                return
            try:
                if self.is_leader and self._broken is None:
                    self._send(_SHUTDOWN, what="shutting the group down")
            except DistributedError:
                pass  # the others are gone already: nothing to tell them
            finally:
                self._closed = True
                self.watchdog.stop()


def _words_per_row(code: int, width: int) -> int:
    """int32 words that carry one row of ``width`` elements of dtype ``code``: 16-bit rows of
    even width two elements a word, else one element a word."""
    return width // 2 if _DTYPES[code] != mx.float32 and width % 2 == 0 else width


def _to_words(x: mx.array) -> mx.array:
    """The bits of ``x`` (``[rows, width]``) as int32 words (``_words_per_row`` a row): copied
    bit for bit, and summed with zeros they stay exact."""
    if x.dtype == mx.float32 or x.shape[-1] % 2 == 0:
        return x.view(mx.int32)
    return x.view(mx.uint16).astype(mx.int32)


def _from_words(words: mx.array, code: int, width: int) -> mx.array:
    """The elements ``_to_words`` turned into ``words`` (flat), in dtype ``code`` (rows of
    ``width``), flat."""
    dtype = _DTYPES[code]
    if dtype == mx.float32 or width % 2 == 0:
        return words.view(dtype)
    return words.astype(mx.uint16).view(dtype)
