"""``flashmoe bench``: decode and prefill against the physical floor, on a synthetic store or a
real one.

Two modes:

* ``synthetic``: a store with Qwen3.5-397B-sized expert records (random bytes, real checksums,
  written through the project's store format) driven by a routing trace calibrated to published
  Qwen3.5-397B statistics (``flashmoe_backend.trace``). The trace drives the REAL reader and
  cache exactly as decode does (per layer: look up, pin, read all misses at once through
  ``ExpertStreamer.fetch``), without the model's compute; a stand-in for the expert compute
  reads every needed record once from memory (``--touch``). Experiments: cache policies against
  Belady's optimum, our cache versus the OS page cache, an mmap page-fault baseline (how
  llama.cpp reads a model larger than memory), K=4 versus K=10, next-layer prefetch with a
  modelled recall, and layer-major prefill against one pass over the experts it needs.
* ``model``: ``FlashMoE.generate`` on a real store; the same numbers from ``engine.stats`` and the
  streamer's counters, Belady for the recorded accesses, K=4, and mlx-lm with the whole model in
  memory when it fits.

Both bandwidths of the floor are measured in the same run on the store's own files: the disk
with O_DIRECT reads of whole records in batches like a layer's misses, the memory with the
compute stand-in over records held in MLX arrays::

    floor per token = missed bytes / disk bandwidth + (resident + hit bytes) / memory bandwidth

The report is JSON (``--out``) and markdown (``--markdown``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import trace as tr
from .cache import _LFU, DEFAULT_POLICY, POLICIES, ExpertCache
from .store import CONFIG, MANIFEST, LayerSpec, Manifest, checksum, read_manifest, record_layout

GiB = 1024**3
MiB = 1024**2
SWITCH_MODULE = "language_model.model.layers.{}.mlp.switch_mlp"
#: Qwen3.5-397B-A17B expert shapes: one 4-bit record is 7,077,888 bytes.
QWEN35 = dict(hidden=4096, intermediate=1024, bits=4, group_size=64, experts=512, k=10)
#: Targets of the benchmark (from the issue).
TARGETS = {
    "decode_over_floor": 1.25,  # at most
    "hit_rate_over_belady": 0.9,  # at least
    "prefill_over_one_pass": 1.5,  # at most
    "speedup_over_page_cache_baseline": 3.0,  # at least
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =============================================================================================
# Synthetic store
# =============================================================================================


def expert_layout(hidden: int, intermediate: int, bits: int = 4, group_size: int = 64) -> dict:
    """Tensors of one quantized SwitchGLU expert (mlx affine layout): name -> (dtype, shape, nbytes)."""
    per_word = 32 // bits
    out = {}
    for name, rows, cols in (
        ("gate_proj", intermediate, hidden),
        ("up_proj", intermediate, hidden),
        ("down_proj", hidden, intermediate),
    ):
        if cols % group_size or cols % per_word:
            raise ValueError(f"{name}: {cols} columns do not split into groups of {group_size}")
        out[f"{name}.weight"] = ("uint32", (rows, cols // per_word), rows * cols // per_word * 4)
        for part in ("scales", "biases"):
            out[f"{name}.{part}"] = ("bfloat16", (rows, cols // group_size), rows * cols // group_size * 2)
    return out


def write_synthetic_store(
    path: Path | str,
    layers: int,
    experts: int,
    hidden: int = 4096,
    intermediate: int = 1024,
    bits: int = 4,
    group_size: int = 64,
    k: int = 10,
    seed: int = 0,
    threads: int = 2,
) -> Manifest:
    """Write an experts-only store of random records through the project's store format.

    Weights are random words; scales and biases are finite bf16 values (|x| in [2^-7, 2^-6));
    padding is zero; each record's CRC32 goes into the manifest, so the real reader verifies it.
    The pages written are dropped from the page cache, so the store starts cold. The store has no
    resident weights or tokenizer: it serves the expert reader, not ``FlashMoE.load``.
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        raise FileExistsError(f"{path}: a store already exists there")
    (path / "experts").mkdir(parents=True, exist_ok=True)
    tensors, record_bytes = record_layout(expert_layout(hidden, intermediate, bits, group_size))
    floats = [(t.offset, t.nbytes) for t in tensors if t.dtype == "bfloat16"]
    pads, end = [], 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset > end:
            pads.append((end, t.offset - end))
        end = t.offset + t.nbytes
    if end < record_bytes:
        pads.append((end, record_bytes - end))

    def write_layer(i: int) -> LayerSpec:
        bitgen = np.random.SFC64(np.random.SeedSequence([seed, i]))
        record = np.zeros(record_bytes, dtype=np.uint8)
        sums = []
        out = path / "experts" / f"layer_{i:03d}.bin"
        with open(out, "wb") as f:
            for _ in range(experts):
                record[:] = bitgen.random_raw(record_bytes // 8).view(np.uint8)
                for offset, nbytes in floats:
                    words = record[offset : offset + nbytes].view(np.uint16)
                    words &= 0x807F  # keep sign and low mantissa bits
                    words |= 0x3C00  # exponent 2^-7
                for offset, nbytes in pads:
                    record[offset : offset + nbytes] = 0
                sums.append(checksum(record))
                f.write(record.data)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return LayerSpec(
            module=SWITCH_MODULE.format(i),
            file=f"experts/{out.name}",
            num_experts=experts,
            record_bytes=record_bytes,
            tensors=tensors,
            quantization={"group_size": group_size, "bits": bits, "mode": "affine"},
            checksums=sums,
        )

    with ThreadPoolExecutor(max(1, threads)) as pool:
        specs = list(pool.map(write_layer, range(layers)))
    config = {
        "model_type": "qwen3_5_moe",
        "flashmoe_synthetic": True,
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_experts": experts,
            "num_experts_per_tok": k,
            "moe_intermediate_size": intermediate,
        },
        "quantization": {"group_size": group_size, "bits": bits},
    }
    (path / CONFIG).write_text(json.dumps(config, indent=1))
    manifest = Manifest(model_type="qwen3_5_moe", layers=specs, tokenizer_files=[])
    (path / MANIFEST).write_text(manifest.to_json())
    return manifest


def synthetic_manifest(layers: int, experts: int, record_bytes: int) -> Manifest:
    """A manifest without files, for cache simulations."""
    return Manifest(
        "synthetic",
        [
            LayerSpec(SWITCH_MODULE.format(i), f"experts/layer_{i:03d}.bin", experts, record_bytes, [], None)
            for i in range(layers)
        ],
        [],
    )


def ensure_reader_bf16() -> bool:
    """Work around a reader bug, for this process only; returns whether the shim was installed.

    ``reader._to_mlx`` evaluates ``np.dtype(t.dtype)`` as the default of ``dict.get`` even for
    bfloat16 tensors, which numpy does not know, so it cannot read a record with bf16 scales (the
    mlx-community 4-bit layout). Until reader.py takes ``_NUMPY_CARRIER.get(t.dtype) or
    np.dtype(t.dtype)``, the benchmark swaps in a function that does; once fixed, this is a no-op.
    """
    import mlx.core as mx

    from . import reader
    from .store import TensorSpec

    probe = LayerSpec("probe", "probe", 1, 64, [TensorSpec("x", "bfloat16", (2,), 0, 4)], None)
    try:
        reader._to_mlx(np.zeros(64, dtype=np.uint8), probe)
        return False
    except TypeError:
        pass

    def _to_mlx(record: np.ndarray, layer: LayerSpec) -> dict:
        weights = {}
        for t in layer.tensors:
            carrier = reader._NUMPY_CARRIER.get(t.dtype) or np.dtype(t.dtype)
            array = mx.array(record[t.offset : t.offset + t.nbytes].view(carrier).reshape(t.shape))
            if t.dtype in reader._NUMPY_CARRIER:
                array = array.view(getattr(mx, t.dtype))
            weights[t.name] = array
        return weights

    reader._to_mlx = _to_mlx
    log("reader.py cannot read bf16 tensors (np.dtype('bfloat16') in _to_mlx): shimmed for this run")
    return True


# =============================================================================================
# Page cache: eviction, residency, a budget for the OS page cache
# =============================================================================================


def store_files(store: Path, manifest: Manifest) -> list[Path]:
    return [store / layer.file for layer in manifest.layers]


def evict_page_cache(paths: Sequence[Path]) -> None:
    """Drop the files' pages from the OS page cache (posix_fadvise DONTNEED; clean pages only)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_caches() -> bool:
    """Ask the kernel to drop all clean page cache (needs root; Linux). Returns success."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


_libc = None


def resident_bytes(path: Path) -> int | None:
    """Bytes of a file now in the page cache (mincore), or None where unsupported."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    size = os.path.getsize(path)
    if size == 0:
        return 0
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if _libc.mincore(addr, size, vec) != 0:
                return None
            return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def store_resident_bytes(store: Path, manifest: Manifest) -> int | None:
    sizes = [resident_bytes(p) for p in store_files(store, manifest)]
    return None if any(s is None for s in sizes) else sum(sizes)


def process_read_bytes() -> int | None:
    """Bytes this process caused to be read from storage (/proc/self/io; counts O_DIRECT reads,
    buffered reads and mmap page faults alike), or None where unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PageCacheBudget:
    """Holds the OS page cache's share of the store to a byte budget, without cgroups.

    Tracks the store's records in LRU order as they are accessed and, past the budget, drops the
    least recently used record's pages (madvise DONTNEED on our mapping if any, then
    posix_fadvise DONTNEED). Pages that kernel readahead brought in around an accessed record
    (neighbouring records not in the LRU) are dropped too, so the page cache holds at most the
    budget. The kernel's own replacement (two-list LRU) is approximated by exact LRU.
    """

    def __init__(
        self, store: Path, manifest: Manifest, budget_bytes: int, mmaps: Sequence[mmap.mmap] | None = None
    ):
        self.manifest = manifest
        self.budget_bytes = budget_bytes
        self.mmaps = mmaps
        self._fds = [os.open(p, os.O_RDONLY) for p in store_files(store, manifest)]
        self._lru: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def _drop(self, layer: int, expert: int) -> None:
        spec = self.manifest.layers[layer]
        offset = expert * spec.record_bytes
        if self.mmaps is not None:
            self.mmaps[layer].madvise(mmap.MADV_DONTNEED, offset, spec.record_bytes)
        os.posix_fadvise(self._fds[layer], offset, spec.record_bytes, os.POSIX_FADV_DONTNEED)

    def access(self, layer: int, experts: Sequence[int]) -> None:
        spec = self.manifest.layers[layer]
        current = set()
        for e in experts:
            key = (layer, e)
            current.add(key)
            if key in self._lru:
                self.hits += 1
                self._lru.move_to_end(key)
            else:
                self.misses += 1
                self._lru[key] = spec.record_bytes
                self.bytes += spec.record_bytes
        while self.bytes > self.budget_bytes:
            victim = next((k for k in self._lru if k not in current), None)
            if victim is None:
                break
            self.bytes -= self._lru.pop(victim)
            self._drop(*victim)
        for e in experts:  # readahead spill into neighbouring records
            for n in (e - 1, e + 1):
                if 0 <= n < spec.num_experts and (layer, n) not in self._lru:
                    self._drop(layer, n)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


# =============================================================================================
# Bandwidths, and the compute stand-in
# =============================================================================================


def _aligned(nbytes: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


class RawReader:
    """Whole records by ``os.preadv`` on a thread pool, nothing else (no checksum, no copy, O_DIRECT
    where supported): the disk's bandwidth for the store's read pattern."""

    def __init__(self, store: Path, manifest: Manifest, threads: int = 8):
        self.manifest = manifest
        self.direct = hasattr(os, "O_DIRECT")
        self._fds = []
        for p in store_files(store, manifest):
            try:
                self._fds.append(os.open(p, os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
            except OSError:
                self.direct = False
                self._fds.append(os.open(p, os.O_RDONLY))
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-raw")

    def _one(self, layer: int, expert: int) -> int:
        nbytes = self.manifest.layers[layer].record_bytes
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.buf = _aligned(nbytes)
        view, done, offset = buf[:nbytes], 0, expert * nbytes
        while done < nbytes:
            n = os.preadv(self._fds[layer], [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read in layer {layer} expert {expert}")
            done += n
        return nbytes

    def read(self, keys: Sequence[tuple[int, int]]) -> int:
        return sum(f.result() for f in [self._pool.submit(self._one, *k) for k in keys])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)


def measure_disk(
    store: Path, manifest: Manifest, keys: Sequence[tuple[int, int]], batch: int, threads: int
) -> dict:
    """Bandwidth of reading ``keys`` cold, ``batch`` records at a time (like a layer's misses)."""
    evict_page_cache(store_files(store, manifest))
    raw = RawReader(store, manifest, threads)
    try:
        tic = time.perf_counter()
        nbytes = sum(raw.read(keys[i : i + batch]) for i in range(0, len(keys), batch))
        seconds = time.perf_counter() - tic
    finally:
        raw.close()
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "bytes_per_s": nbytes / seconds,
        "records": len(keys),
        "batch": batch,
        "threads": threads,
        "o_direct": raw.direct,
    }


def touch(weights: dict) -> int:
    """The expert-compute stand-in: read every byte of one expert's arrays once from memory.

    CPU arrays are reduced in numpy over zero-copy views (mlx[cpu]'s quantized matmul is far
    slower than memory here, see DESIGN.md); other devices reduce in MLX. Returns bytes read.
    """
    import mlx.core as mx

    nbytes = 0
    if mx.default_device() == mx.cpu:
        for a in weights.values():
            raw = np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).reshape(-1).view(np.uint8)
            word = np.uint64 if raw.nbytes % 8 == 0 else np.uint32 if raw.nbytes % 4 == 0 else np.uint8
            np.bitwise_or.reduce(raw.view(word))
            nbytes += raw.nbytes
    else:
        mx.eval([mx.max(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a) for a in weights.values()])
        nbytes = sum(a.nbytes for a in weights.values())
    return nbytes


def measure_memory(store: Path, manifest: Manifest, records: int, repeats: int = 3, seed: int = 0) -> dict:
    """Bandwidth of the compute stand-in over records read by the real reader into MLX arrays."""
    from .reader import ExpertReader, ReaderConfig

    rng = np.random.default_rng(seed)
    reader = ExpertReader(store, manifest, ReaderConfig(page_cache="bypass", verify="never"))
    try:
        loaded = []
        for layer in range(len(manifest.layers)):
            want = records // len(manifest.layers) + (layer < records % len(manifest.layers))
            n = min(want, manifest.layers[layer].num_experts)
            if n:
                loaded += reader.read(
                    layer, sorted(rng.choice(manifest.layers[layer].num_experts, n, replace=False).tolist())
                )
    finally:
        reader.close()
    for w in loaded:
        touch(w)
    tic = time.perf_counter()
    nbytes = sum(touch(w) for _ in range(repeats) for w in loaded)
    seconds = time.perf_counter() - tic
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "bytes_per_s": nbytes / seconds,
        "records": len(loaded),
        "repeats": repeats,
        "method": "touch (numpy bitwise_or reduce over MLX arrays' memory)",
    }


# =============================================================================================
# Cache policies against Belady (no I/O)
# =============================================================================================


class NullReader:
    """A reader that reads nothing: cache simulations through the real ExpertStreamer."""

    def read(self, layer: int, experts: list[int]) -> list:
        return [()] * len(experts)  # any value but None (the streamer's "not cached")


class OraclePolicy(_LFU):
    """The guarded-LFU policy with the trace generator's TRUE popularity instead of counts: the
    most an online frequency policy could learn (a reference point, not a usable policy)."""

    def __init__(self, log_popularity: np.ndarray, guard: int):
        super().__init__(guard=guard)
        self._logp = log_popularity

    def _new_score(self, key, now):
        return float(self._logp[key[0], key[1]])


def simulate(steps: Sequence[tr.Step], manifest: Manifest, budget_bytes: int, policy, **options) -> dict:
    """Hit rate of a policy over an access sequence, through the real ExpertStreamer and cache."""
    from .streaming import ExpertStreamer

    if isinstance(policy, str):
        cache = ExpertCache(budget_bytes, policy, **options)
    else:
        cache = ExpertCache(budget_bytes, "lru")
        cache._policy = policy
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


def policy_study(
    traces: dict[str, tuple[tr.TraceSpec, np.ndarray]],
    record_bytes: int,
    fractions: Sequence[float],
    half_lives: Sequence[float],
    guard: int,
) -> list[dict]:
    """Hit rates of LRU, LFU variants, the popularity oracle and Belady, per trace and budget."""
    rows = []
    for trace_name, (spec, trace) in traces.items():
        manifest = synthetic_manifest(spec.layers, spec.experts, record_bytes)
        steps = list(tr.decode_steps(trace))
        total = spec.layers * spec.experts
        for frac in fractions:
            capacity = int(frac * total)
            budget = capacity * record_bytes
            best = tr.belady(steps, capacity)["hit_rate"]
            candidates = [("lru", "lru", {})]
            for hl in half_lives:
                candidates.append(
                    (f"lfu(half_life={hl:g},guard={guard})", "lfu", {"half_life": hl, "guard": guard})
                )
            if spec.drift == 0:
                candidates.append(
                    ("oracle-popularity (reference)", OraclePolicy(layer_log_popularity(spec), guard), {})
                )
            for label, policy, options in candidates:
                r = simulate(steps, manifest, budget, policy, **options)
                rows.append(
                    {
                        "trace": trace_name,
                        "budget_fraction": frac,
                        "policy": label,
                        "hit_rate": r["hit_rate"],
                        "belady_hit_rate": best,
                        "over_belady": r["hit_rate"] / best if best else 0.0,
                    }
                )
            rows.append(
                {
                    "trace": trace_name,
                    "budget_fraction": frac,
                    "policy": "belady (offline optimum)",
                    "hit_rate": best,
                    "belady_hit_rate": best,
                    "over_belady": 1.0,
                }
            )
            log(
                f"policies: {trace_name} @ {frac:.0%}: "
                + ", ".join(
                    f"{r['policy'].split('(')[0]}={r['hit_rate']:.3f}" for r in rows[-len(candidates) - 1 :]
                )
            )
    return rows


# =============================================================================================
# Trace-driven decode through the real reader and cache
# =============================================================================================


@dataclass
class RunConfig:
    """One decode run over a trace."""

    name: str
    group: str = "decode"
    policy: str = DEFAULT_POLICY
    policy_options: dict = field(default_factory=dict)
    budget_bytes: int = 0  # our cache (MLX arrays)
    page_cache: str = "bypass"  # the reader's mode
    os_cache_bytes: int | None = None  # hold the OS page cache to this (None: unlimited)
    io_threads: int = 8
    verify: str = "first"
    touch: bool = True
    compute_ms: float = 0.0  # emulated non-expert compute per layer (sleep)
    prefetch_recall: float | None = None  # None: no prefetch
    prefetch_threads: int = 4
    seed: int = 0


class TracePrefetcher:
    """Next-layer prefetch with a modelled predictor: it predicts k experts of the next layer, each
    true one with probability ``recall`` (the rest false positives), and reads the predicted ones
    not cached in the background. Finished reads go into the cache at the next layer call."""

    def __init__(self, streamer, recall: float, k: int, threads: int, seed: int):
        self.streamer = streamer
        self.recall = recall
        self.k = k
        self.rng = np.random.default_rng([seed, 7])
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-prefetch")
        self.inflight: dict[tuple[int, int], Future] = {}
        self.issued = 0
        self.useful = 0
        self.wait_seconds = 0.0

    def issue(self, layer: int, true_next: Sequence[int]) -> None:
        spec = self.streamer.manifest.layers[layer]
        kept = [e for e in true_next if self.rng.random() < self.recall]
        others = np.setdiff1d(np.arange(spec.num_experts), true_next)
        false = (
            self.rng.choice(others, self.k - len(kept), replace=False).tolist() if len(kept) < self.k else []
        )
        for e in kept + false:
            key = (layer, e)
            if key in self.streamer.cache or key in self.inflight:
                continue
            self.inflight[key] = self.pool.submit(self.streamer.reader.read, layer, [e])
            self.issued += 1

    def collect(self, layer: int, needed: Sequence[int]) -> None:
        """Before a layer call: wait for its needed in-flight reads; put every finished one in the cache."""
        cache = self.streamer.cache
        spec = self.streamer.manifest.layers[layer]
        wanted = {(layer, e) for e in needed}
        cache.pin(k for k in wanted if k in cache)
        tic = time.perf_counter()
        for key in wanted:
            if key in self.inflight:
                self.inflight[key].result()
        self.wait_seconds += time.perf_counter() - tic
        for key, future in list(self.inflight.items()):
            if future.done():
                del self.inflight[key]
                if key not in cache:
                    cache.insert(key, future.result()[0], self.streamer.manifest.layers[key[0]].record_bytes)
                if key in wanted:
                    self.useful += 1
                    cache.pin([key])
        cache.unpin_all()
        del spec

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _fresh_streamer(store: Path, manifest: Manifest, cfg: RunConfig):
    from .reader import ExpertReader, ReaderConfig
    from .streaming import ExpertStreamer

    reader = ExpertReader(store, manifest, ReaderConfig(cfg.io_threads, cfg.page_cache, cfg.verify))
    cache = ExpertCache(cfg.budget_bytes, cfg.policy, **cfg.policy_options)
    return ExpertStreamer(manifest, reader, cache)


def _release_memory() -> None:
    """Return freed MLX buffers to the system between runs (a full gc pass is too slow here)."""
    try:
        import mlx.core as mx

        mx.clear_cache()
    except Exception:  # pragma: no cover - older MLX
        pass


def run_decode(
    store: Path,
    manifest: Manifest,
    trace: np.ndarray,
    cfg: RunConfig,
    warmup: int,
    disk_bw: float,
    mem_bw: float,
) -> dict:
    """Decode a trace through the real reader and cache, cold; time the tokens after ``warmup``."""
    files = store_files(store, manifest)
    evict_page_cache(files)
    streamer = _fresh_streamer(store, manifest, cfg)
    cache, reader = streamer.cache, streamer.reader
    limit = None
    if cfg.page_cache == "keep" and cfg.os_cache_bytes is not None:
        limit = PageCacheBudget(store, manifest, cfg.os_cache_bytes)
    T, L, K = trace.shape
    prefetcher = None
    if cfg.prefetch_recall is not None:
        prefetcher = TracePrefetcher(streamer, cfg.prefetch_recall, K, cfg.prefetch_threads, cfg.seed)
    rb = manifest.layers[0].record_bytes
    touch_s = sleep_s = 0.0
    token_seconds = []
    snap = None
    read0 = process_read_bytes()
    try:
        for t in range(T):
            if t == warmup:
                snap = dict(
                    hits=cache.counters.hits,
                    misses=cache.counters.misses,
                    os_hits=limit.hits if limit else 0,
                    os_misses=limit.misses if limit else 0,
                    io=streamer.counters.io_seconds,
                    bytes=streamer.counters.bytes_read,
                    touch=touch_s,
                    sleep=sleep_s,
                    disk=process_read_bytes(),
                    issued=prefetcher.issued if prefetcher else 0,
                    useful=prefetcher.useful if prefetcher else 0,
                    wait=prefetcher.wait_seconds if prefetcher else 0.0,
                )
            tic = time.perf_counter()
            for layer in range(L):
                experts = trace[t, layer].tolist()
                if prefetcher:
                    prefetcher.collect(layer, experts)
                missing = [e for e in experts if (layer, e) not in cache]
                weights = streamer.fetch(layer, experts)
                if limit is not None and missing:
                    limit.access(layer, missing)
                if prefetcher and layer + 1 < L:
                    prefetcher.issue(layer + 1, trace[t, layer + 1].tolist())
                if cfg.touch:
                    t0 = time.perf_counter()
                    for w in weights:
                        touch(w)
                    touch_s += time.perf_counter() - t0
                if cfg.compute_ms:
                    t0 = time.perf_counter()
                    time.sleep(cfg.compute_ms / 1000)
                    sleep_s += time.perf_counter() - t0
                streamer.release()
            token_seconds.append(time.perf_counter() - tic)
    finally:
        if prefetcher:
            prefetcher.close()
        reader.close()
    resident = store_resident_bytes(store, manifest)
    if limit is not None:
        limit.close()
    c = cache.counters
    n = T - warmup
    hits, misses = c.hits - snap["hits"], c.misses - snap["misses"]
    seconds = sum(token_seconds[warmup:])
    io = streamer.counters.io_seconds - snap["io"]
    prefetched = (prefetcher.issued - snap["issued"]) * rb if prefetcher else 0
    useful = (prefetcher.useful - snap["useful"]) if prefetcher else 0
    demand_hits = hits - useful  # hits the cache had before the prefetcher's help
    wait = (prefetcher.wait_seconds - snap["wait"]) if prefetcher else 0.0
    read_bytes = streamer.counters.bytes_read - snap["bytes"]
    disk_now = process_read_bytes()
    terms = {"miss_records": misses + useful, "hit_records": demand_hits}
    if limit is not None:  # what the page cache served costs memory bandwidth, not disk
        os_hits, os_misses = limit.hits - snap["os_hits"], limit.misses - snap["os_misses"]
        terms = {"miss_records": os_misses + useful, "hit_records": demand_hits + os_hits}
    floor = (terms["miss_records"] * rb / disk_bw + terms["hit_records"] * rb / mem_bw) / n
    t_touch, t_sleep = touch_s - snap["touch"], sleep_s - snap["sleep"]
    result = {
        "name": cfg.name,
        "group": cfg.group,
        "config": asdict(cfg),
        "k": K,
        "layers": L,
        "tokens_measured": n,
        "warmup_tokens": warmup,
        "seconds_per_token": seconds / n,
        "tokens_per_s": n / seconds,
        "hit_rate": hits / max(1, hits + misses),
        "hit_rate_all_tokens": c.hits / max(1, c.hits + c.misses),
        "lookups": hits + misses,
        "hits": hits,
        "misses": misses,
        "bytes_read_per_token": (read_bytes + prefetched) / n,
        "disk_bytes_per_token": ((disk_now - snap["disk"]) / n) if disk_now is not None else None,
        "time_shares": {
            "io_wait": (io + wait) / seconds,
            "router_sync": 0.0,
            "expert_compute": t_touch / seconds,
            "emulated_compute": t_sleep / seconds,
            "rest": max(0.0, 1 - (io + wait + t_touch + t_sleep) / seconds),
        },
        "floor_terms": terms,
        "floor_seconds_per_token": floor,
        "measured_over_floor": (seconds / n) / floor if floor else None,
        "own_cache_bytes_peak": c.bytes_peak,
        "page_cache_resident_bytes_end": resident,
        "os_cache_budget_bytes": cfg.os_cache_bytes,
        "memory_bytes": cfg.budget_bytes + (cfg.os_cache_bytes or 0),
        "counters": {
            "bytes_read": streamer.counters.bytes_read,
            "experts_read": streamer.counters.experts_read,
            "hits": c.hits,
            "misses": c.misses,
            "evictions": c.evictions,
            "process_read_bytes": (disk_now - read0) if disk_now is not None else None,
        },
    }
    if cfg.page_cache == "keep" and cfg.os_cache_bytes is None:
        result["memory_bytes"] = cfg.budget_bytes + (resident or 0)
    if limit is not None:
        result["os_cache_hit_rate"] = os_hits / max(1, os_hits + os_misses)
        result["hit_rate_combined"] = (hits + os_hits) / max(1, hits + misses)
    if prefetcher:
        result["prefetch"] = {
            "recall": cfg.prefetch_recall,
            "issued_bytes_per_token": prefetched / n,
            "useful_per_token": useful / n,
            "wasted_per_token": (prefetched / rb - useful) / n,
            "wait_seconds_per_token": wait / n,
            "demand_hit_rate": demand_hits / max(1, hits + misses),
        }
    del streamer, cache, reader
    _release_memory()
    return result


def run_mmap(
    store: Path,
    manifest: Manifest,
    trace: np.ndarray,
    name: str,
    budget_bytes: int | None,
    threads: int,
    warmup: int,
    advice: str | None,
    disk_bw: float,
    mem_bw: float,
) -> dict:
    """The page-fault baseline (llama.cpp-style): the expert files mmapped, each needed record
    touched in place by ``threads`` threads (its page faults are the reads), the page cache held to
    ``budget_bytes`` by ``PageCacheBudget``."""
    files = store_files(store, manifest)
    evict_page_cache(files)
    fds = [os.open(p, os.O_RDONLY) for p in files]
    maps = [mmap.mmap(fd, 0, prot=mmap.PROT_READ) for fd in fds]
    if advice == "random":
        for m in maps:
            m.madvise(mmap.MADV_RANDOM)
    limit = PageCacheBudget(store, manifest, budget_bytes, maps) if budget_bytes is not None else None
    rb = manifest.layers[0].record_bytes
    pool = ThreadPoolExecutor(threads, thread_name_prefix="bench-mmap")

    def fault(layer_expert):
        layer, e = layer_expert
        view = np.frombuffer(maps[layer], dtype=np.uint64, count=rb // 8, offset=e * rb)
        np.bitwise_or.reduce(view)

    T, L, K = trace.shape
    token_seconds = []
    disk0 = None
    snap = (0, 0)
    try:
        for t in range(T):
            if t == warmup:
                disk0 = process_read_bytes()
                snap = (limit.hits, limit.misses) if limit else (0, 0)
            tic = time.perf_counter()
            for layer in range(L):
                experts = trace[t, layer].tolist()
                list(pool.map(fault, [(layer, e) for e in experts]))
                if limit is not None:
                    limit.access(layer, experts)
            token_seconds.append(time.perf_counter() - tic)
    finally:
        pool.shutdown(wait=True)
        resident = store_resident_bytes(store, manifest)
        if limit is not None:
            limit.close()
        for m in maps:
            m.close()
        for fd in fds:
            os.close(fd)
    n = T - warmup
    seconds = sum(token_seconds[warmup:])
    disk1 = process_read_bytes()
    hits = (limit.hits - snap[0]) if limit else None
    misses = (limit.misses - snap[1]) if limit else None
    floor = terms = None
    if limit is not None:
        terms = {"miss_records": misses, "hit_records": hits}
        floor = (misses * rb / disk_bw + hits * rb / mem_bw) / n
    evict_page_cache(files)
    return {
        "name": name,
        "group": "page_cache",
        "k": K,
        "layers": L,
        "tokens_measured": n,
        "warmup_tokens": warmup,
        "config": {"threads": threads, "madvise": advice or "normal", "page_cache_budget": budget_bytes},
        "seconds_per_token": seconds / n,
        "tokens_per_s": n / seconds,
        "hit_rate": hits / max(1, hits + misses) if limit else None,
        "bytes_read_per_token": ((disk1 - disk0) / n) if disk1 is not None and disk0 is not None else None,
        "disk_bytes_per_token": ((disk1 - disk0) / n) if disk1 is not None and disk0 is not None else None,
        "time_shares": {"io_wait": None, "router_sync": 0.0, "expert_compute": None, "rest": None},
        "floor_terms": terms,
        "floor_seconds_per_token": floor,
        "measured_over_floor": (seconds / n) / floor if floor else None,
        "page_cache_resident_bytes_end": resident,
        "memory_bytes": budget_bytes if budget_bytes is not None else resident,
    }


def run_prefill(store: Path, manifest: Manifest, trace: np.ndarray, cfg: RunConfig, threads: int) -> dict:
    """Layer-major prefill of a prompt chunk: per layer, the union of the experts its tokens need,
    through ``plan_groups`` and ``fetch`` (each needed expert read once), cold; against one cold
    raw O_DIRECT pass over the same records."""
    files = store_files(store, manifest)
    evict_page_cache(files)
    streamer = _fresh_streamer(store, manifest, cfg)
    T, L, K = trace.shape
    unions = [np.unique(trace[:, layer]).tolist() for layer in range(L)]
    groups = 0
    touch_s = 0.0
    tic = time.perf_counter()
    try:
        for layer in range(L):
            for group in streamer.plan_groups(layer, unions[layer]):
                groups += 1
                weights = streamer.fetch(layer, group)
                if cfg.touch:
                    t0 = time.perf_counter()
                    for w in weights:
                        touch(w)
                    touch_s += time.perf_counter() - t0
                streamer.release()
        seconds = time.perf_counter() - tic
    finally:
        streamer.reader.close()
    counters = streamer.counters
    del streamer
    _release_memory()
    evict_page_cache(files)
    raw = RawReader(store, manifest, threads)
    try:
        tic = time.perf_counter()
        nbytes = sum(raw.read([(layer, e) for e in unions[layer]]) for layer in range(L))
        one_pass = time.perf_counter() - tic
    finally:
        raw.close()
    return {
        "prompt_tokens": T,
        "layers": L,
        "k": K,
        "experts_needed": sum(len(u) for u in unions),
        "experts_needed_share": sum(len(u) for u in unions) / sum(s.num_experts for s in manifest.layers),
        "bytes_needed": nbytes,
        "groups": groups,
        "seconds": seconds,
        "io_seconds": counters.io_seconds,
        "expert_compute_seconds": touch_s,
        "bytes_read": counters.bytes_read,
        "one_pass_seconds": one_pass,
        "one_pass_bytes_per_s": nbytes / one_pass,
        "over_one_pass": seconds / one_pass,
        "flash_moe_style_estimate_seconds": None,
    }


# =============================================================================================
# The synthetic benchmark
# =============================================================================================

EXPERIMENTS = ("policies", "decode", "page-cache", "peers", "prefetch", "prefill")


def machine_info(path: Path) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import mlx.core as mx

        info["mlx"] = mx.__version__
        info["mlx_device"] = str(mx.default_device())
    except Exception:  # pragma: no cover
        pass
    try:
        with open("/proc/meminfo") as f:
            mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        info["memory_total_bytes"] = mem.get("MemTotal")
        info["memory_available_bytes"] = mem.get("MemAvailable")
    except OSError:
        pass
    info["disk_free_bytes"] = shutil.disk_usage(path).free
    return info


def _trace(spec: tr.TraceSpec) -> np.ndarray:
    tic = time.perf_counter()
    out = tr.generate_trace(spec)
    log(
        f"trace {spec.tokens}x{spec.layers} k={spec.k} spread={spec.spread} drift={spec.drift}: "
        f"{time.perf_counter() - tic:.1f}s"
    )
    return out


def run_synthetic(args: argparse.Namespace) -> dict:
    experiments = set(EXPERIMENTS if args.experiments == "all" else args.experiments.split(","))
    unknown = experiments - set(EXPERIMENTS)
    if unknown:
        raise SystemExit(f"unknown experiment(s) {sorted(unknown)}; choose from {EXPERIMENTS}")
    built = False
    if args.store and (Path(args.store) / MANIFEST).is_file():
        store = Path(args.store)
        log(f"using the synthetic store at {store}")
    else:
        store = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="flashmoe-bench-"))
        record = sum(v[2] for v in expert_layout(args.hidden, args.intermediate, 4, 64).values())
        need = args.layers * args.experts * record
        free = shutil.disk_usage(store if store.exists() else store.parent).free
        if need > free - 2 * GiB:
            raise SystemExit(
                f"the store needs {need / GiB:.1f} GiB; only {free / GiB:.1f} GiB free at {store}"
            )
        log(f"writing a synthetic store: {args.layers} layers x {args.experts} experts, {need / GiB:.2f} GiB")
        tic = time.perf_counter()
        write_synthetic_store(
            store,
            args.layers,
            args.experts,
            args.hidden,
            args.intermediate,
            k=args.k,
            seed=args.seed,
            threads=args.write_threads,
        )
        log(f"store written in {time.perf_counter() - tic:.1f}s")
        built = True
    try:
        return _synthetic(store, args, experiments, built)
    finally:
        if built and not args.keep_store:
            shutil.rmtree(store, ignore_errors=True)
            log(f"deleted {store}")


def _synthetic(store: Path, args: argparse.Namespace, experiments: set[str], built: bool) -> dict:
    manifest = read_manifest(store)
    L = len(manifest.layers)
    E = manifest.layers[0].num_experts
    rb = manifest.layers[0].record_bytes
    if any(s.record_bytes != rb or s.num_experts != E for s in manifest.layers):
        raise SystemExit("the synthetic benchmark needs equal layers (one record size, one expert count)")
    K = args.k
    expert_bytes = manifest.expert_bytes
    budget = int(args.budget_frac * expert_bytes) // rb * rb
    files = store_files(store, manifest)
    report: dict = {
        "mode": "synthetic",
        "command": args.command_line,
        "machine": machine_info(store),
        "load_average_start": os.getloadavg(),
    }
    # -- cold start ------------------------------------------------------------------------
    evict_page_cache(files)
    dropped = drop_caches() if args.drop_caches else None
    report["store"] = {
        "path": str(store),
        "built_here": built,
        "layers": L,
        "experts_per_layer": E,
        "record_bytes": rb,
        "expert_bytes": expert_bytes,
        "budget_bytes": budget,
        "budget_fraction": budget / expert_bytes,
        "k": K,
    }
    report["cold_start"] = {
        "posix_fadvise_dontneed": hasattr(os, "posix_fadvise"),
        "drop_caches": dropped,
        "resident_bytes_after_evict": store_resident_bytes(store, manifest),
        "reads": "O_DIRECT (our reader, bypass)",
    }
    log(
        f"cold: resident after evict = {report['cold_start']['resident_bytes_after_evict']}, "
        f"drop_caches={dropped}"
    )
    # -- bandwidths ------------------------------------------------------------------------
    rng = np.random.default_rng([args.seed, 99])
    n_disk = max(4 * K, min(L * E, int(args.disk_sample_bytes // rb)))
    keys = [(int(x // E), int(x % E)) for x in rng.choice(L * E, n_disk, replace=False)]
    batch = max(1, round(K * 0.7))
    disk = measure_disk(store, manifest, keys, batch, args.io_threads)
    memory = measure_memory(store, manifest, records=max(4, min(L * E, int(args.memory_sample_bytes // rb))))
    report["bandwidth"] = {"disk": disk, "memory": memory}
    disk_bw, mem_bw = disk["bytes_per_s"], memory["bytes_per_s"]
    log(
        f"bandwidth: disk {disk_bw / 1e9:.2f} GB/s ({disk['records']} records, batch {batch}), "
        f"memory {mem_bw / 1e9:.2f} GB/s"
    )
    # -- traces ----------------------------------------------------------------------------
    base = tr.TraceSpec(tokens=args.warmup + args.decode_tokens, layers=L, experts=E, k=K, seed=args.seed)
    decode_trace = _trace(base)
    calib_spec = replace(base, tokens=max(args.policy_tokens, 60), seed=args.seed + 1)
    calib_trace = _trace(calib_spec)
    stats = tr.trace_stats(calib_trace, E)
    checks = tr.check_stats(stats)
    print(tr.format_stats(stats, checks), file=sys.stderr)
    report["trace"] = {
        "spec": calib_spec.to_dict(),
        "stats": stats,
        "checks": checks,
        "decode_trace": {"spec": base.to_dict(), "stats": tr.trace_stats(decode_trace, E)},
    }
    capacity = budget // rb
    steps = list(tr.decode_steps(decode_trace))
    belady_decode = tr.belady(steps, capacity, start=args.warmup * L)
    report["belady_decode_trace"] = belady_decode
    # -- policies (no I/O) ---------------------------------------------------------------------
    if "policies" in experiments:
        traces = {"calibrated": (calib_spec, calib_trace)}
        if not args.quick_policies:
            irm = replace(calib_spec, spread=0.0)
            drift = replace(calib_spec, drift=0.25, drift_every=128)
            traces["no-spread (spread=0)"] = (irm, _trace(irm))
            traces["drifting (25% every 128 tok)"] = (drift, _trace(drift))
        rows = policy_study(traces, rb, [args.budget_frac], args.half_lives, args.guard)
        if not args.quick_policies:
            rows += policy_study(
                {"calibrated": (calib_spec, calib_trace)},
                rb,
                [f for f in (0.10, 0.50) if f != args.budget_frac],
                [args.half_life],
                args.guard,
            )
        report["policies"] = rows
    # -- decode runs -----------------------------------------------------------------------
    runs = []

    def disk_now() -> float:
        """The disk's bandwidth right now (the store's records, a layer's batch): other work on a
        shared machine moves it, so each run's floor uses what was measured around it."""
        sample = [(int(x // E), int(x % E)) for x in rng.choice(L * E, min(L * E, 8 * batch), replace=False)]
        return measure_disk(store, manifest, sample, batch, args.io_threads)["bytes_per_s"]

    def finish(r: dict, trace, before: float, load0: tuple) -> dict:
        after = disk_now()
        r["disk_bytes_per_s_around_run"] = [before, after]
        r["load_average"] = [load0[0], os.getloadavg()[0]]
        bw = (before + after) / 2
        n = r["tokens_measured"]
        if r.get("floor_terms"):
            t = r["floor_terms"]
            r["floor_seconds_per_token"] = (t["miss_records"] * rb / bw + t["hit_records"] * rb / mem_bw) / n
            r["measured_over_floor"] = r["seconds_per_token"] / r["floor_seconds_per_token"]
            best = max(disk_bw, before, after)
            r["measured_over_floor_at_best_disk"] = r["seconds_per_token"] / (
                (t["miss_records"] * rb / best + t["hit_records"] * rb / mem_bw) / n
            )
        belady = (
            tr.belady(list(tr.decode_steps(trace)), capacity, start=args.warmup * L)
            if trace is not decode_trace
            else belady_decode
        )
        r["belady_hit_rate"] = belady["hit_rate_after_start"]
        r["belady_hit_rate_all_tokens"] = belady["hit_rate"]
        if r.get("hit_rate_all_tokens") is not None:
            r["hit_rate_over_belady"] = (
                r["hit_rate_all_tokens"] / belady["hit_rate"] if belady["hit_rate"] else None
            )
        r["floor_at_belady_seconds_per_token"] = (
            belady["misses_after_start"] * rb / bw + belady["hits_after_start"] * rb / mem_bw
        ) / n
        floor = r.get("floor_seconds_per_token")
        log(
            f"  {r['name']}: {r['seconds_per_token'] * 1000:.1f} ms/token, hit {r.get('hit_rate') or 0:.3f}, "
            f"disk {bw / 1e9:.2f} GB/s, floor {floor * 1000 if floor else 0:.1f} ms -> "
            f"x{r.get('measured_over_floor') or 0:.2f}, load {r['load_average']}"
        )
        runs.append(r)
        return r

    def decode(cfg: RunConfig, trace=decode_trace) -> dict:
        log(f"decode run {cfg.name} ...")
        before, load0 = disk_now(), os.getloadavg()
        return finish(
            run_decode(store, manifest, trace, cfg, args.warmup, before, mem_bw), trace, before, load0
        )

    common = dict(budget_bytes=budget, io_threads=args.io_threads, touch=args.touch, seed=args.seed)
    lfu_options = {"half_life": args.half_life, "guard": args.guard}
    ours = dict(policy="lfu", policy_options=lfu_options, **common)
    jobs: list[tuple[str, Callable[[], dict]]] = []  # (name, run); run in rounds, best of --repeats kept

    def decode_job(cfg: RunConfig, trace=None) -> None:
        jobs.append((cfg.name, lambda: decode(cfg, decode_trace if trace is None else trace)))

    def mmap_job(advice: str) -> None:
        name = f"mmap page faults (llama.cpp style), madvise {advice}"

        def job():
            log(f"mmap run {name} ...")
            before, load0 = disk_now(), os.getloadavg()
            r = run_mmap(
                store,
                manifest,
                decode_trace,
                name,
                budget,
                args.io_threads,
                args.warmup,
                None if advice == "normal" else advice,
                before,
                mem_bw,
            )
            return finish(r, decode_trace, before, load0)

        jobs.append((name, job))

    default_name = "lfu, O_DIRECT, own cache (default)"
    if "decode" in experiments:
        decode_job(RunConfig("lru, O_DIRECT, own cache", "policy", policy="lru", **common))
        decode_job(RunConfig(default_name, "policy", **ours))
    if "page-cache" in experiments:
        decode_job(
            RunConfig("lfu, page cache kept too (double caching)", "page_cache", page_cache="keep", **ours)
        )
        tiny = K * rb
        decode_job(
            RunConfig(
                "OS page cache only (flash-moe style: buffered reads, no own cache)",
                "page_cache",
                page_cache="keep",
                os_cache_bytes=budget - tiny,
                **{**ours, "budget_bytes": tiny, "policy": "lru", "policy_options": {}},
            )
        )
    if "peers" in experiments:
        for advice in ("normal", "random") if args.mmap_random else ("normal",):
            mmap_job(advice)
        k4 = _trace(replace(base, k=min(4, K)))
        decode_job(RunConfig(f"K={min(4, K)} of {K} (changes the model's output)", "peers", **ours), trace=k4)
    if "prefetch" in experiments:
        for recall in args.prefetch_recalls:
            decode_job(
                RunConfig(
                    f"prefetch recall {recall:.0%}, no compute overlap",
                    "prefetch",
                    prefetch_recall=recall,
                    **ours,
                )
            )
        if args.compute_ms:
            decode_job(
                RunConfig(
                    f"no prefetch, {args.compute_ms} ms compute/layer",
                    "prefetch",
                    compute_ms=args.compute_ms,
                    **ours,
                )
            )
            decode_job(
                RunConfig(
                    f"prefetch recall {args.prefetch_recalls[0]:.0%}, {args.compute_ms} ms compute/layer",
                    "prefetch",
                    compute_ms=args.compute_ms,
                    prefetch_recall=args.prefetch_recalls[0],
                    **ours,
                )
            )
    # Rounds (A B C .. A B C ..) so that every configuration meets the same mix of other work on a
    # shared machine; each keeps its fastest round, the others are listed with it.
    tries: dict[str, list[dict]] = {}
    for _ in range(max(1, args.repeats)):
        for name, job in jobs:
            tries.setdefault(name, []).append(job())
    runs.clear()
    for name, _ in jobs:
        best = min(tries[name], key=lambda r: r["seconds_per_token"])
        best["rounds_seconds_per_token"] = [r["seconds_per_token"] for r in tries[name]]
        best["rounds_measured_over_floor"] = [r.get("measured_over_floor") for r in tries[name]]
        runs.append(best)
    default = next((r for r in runs if r["name"] == default_name), None)
    report["decode"] = runs
    # -- prefill ---------------------------------------------------------------------------
    if "prefill" in experiments:
        log(f"prefill of {args.prefill_tokens} tokens ...")
        prompt = _trace(replace(base, tokens=args.prefill_tokens, seed=args.seed + 2))
        rounds = [
            run_prefill(store, manifest, prompt, RunConfig("prefill", **ours), args.io_threads)
            for _ in range(max(1, args.repeats))
        ]
        report["prefill"] = min(rounds, key=lambda p: p["over_one_pass"])
        report["prefill"]["rounds_over_one_pass"] = [p["over_one_pass"] for p in rounds]
        p = report["prefill"]
        log(
            f"  prefill {p['seconds']:.1f}s vs one pass {p['one_pass_seconds']:.1f}s"
            f" -> x{p['over_one_pass']:.2f}"
        )
    report["targets"], report["decisions"] = _judge(report, default)
    report["invariants"] = _invariants(report)
    return report


def _find(runs: list[dict], group: str, prefix: str) -> dict | None:
    return next((r for r in runs if r["group"] == group and r["name"].startswith(prefix)), None)


def _judge(report: dict, default: dict | None) -> tuple[dict, dict]:
    runs = report.get("decode", [])
    targets, decisions = {}, {}
    if default:
        targets["decode_over_floor"] = {
            "value": default["measured_over_floor"],
            "target": f"<= {TARGETS['decode_over_floor']}",
            "met": default["measured_over_floor"] <= TARGETS["decode_over_floor"],
        }
    rows = report.get("policies")
    frac = report["store"]["budget_fraction"]
    if rows:
        calibrated = [
            r
            for r in rows
            if r["trace"] == "calibrated"
            and abs(r["budget_fraction"] - frac) < 0.01
            and (r["policy"].startswith("lru") or r["policy"].startswith("lfu"))
        ]
        best = max(calibrated, key=lambda r: r["hit_rate"])
        lru = next(r for r in calibrated if r["policy"] == "lru")
        decisions["default_policy"] = {
            "measured_best": best["policy"],
            "best_over_belady": best["over_belady"],
            "lru_over_belady": lru["over_belady"],
            "shipped_default": DEFAULT_POLICY,
        }
        targets["hit_rate_over_belady"] = {
            "value": best["over_belady"],
            "target": f">= {TARGETS['hit_rate_over_belady']}",
            "met": best["over_belady"] >= TARGETS["hit_rate_over_belady"],
            "policy": best["policy"],
        }
        oracle = next(
            (
                r
                for r in rows
                if r["trace"] == "calibrated"
                and r["policy"].startswith("oracle")
                and abs(r["budget_fraction"] - frac) < 0.01
            ),
            None,
        )
        if oracle:
            targets["hit_rate_over_belady"]["online_reference_over_belady"] = oracle["over_belady"]
    elif default:
        targets["hit_rate_over_belady"] = {
            "value": default["hit_rate_over_belady"],
            "target": f">= {TARGETS['hit_rate_over_belady']}",
            "met": default["hit_rate_over_belady"] >= TARGETS["hit_rate_over_belady"],
        }
    if "prefill" in report:
        v = report["prefill"]["over_one_pass"]
        targets["prefill_over_one_pass"] = {
            "value": v,
            "target": f"<= {TARGETS['prefill_over_one_pass']}",
            "met": v <= TARGETS["prefill_over_one_pass"],
        }
    mmaps = [r for r in runs if r["name"].startswith("mmap")]
    if default and mmaps:
        best_mmap = min(mmaps, key=lambda r: r["seconds_per_token"])
        v = best_mmap["seconds_per_token"] / default["seconds_per_token"]
        targets["speedup_over_page_cache_baseline"] = {
            "value": v,
            "target": f">= {TARGETS['speedup_over_page_cache_baseline']}",
            "met": v >= TARGETS["speedup_over_page_cache_baseline"],
            "baseline": best_mmap["name"],
        }
    os_only = _find(runs, "page_cache", "OS page cache only")
    if default and os_only:
        decisions["page_cache"] = {
            "choice": "bypass" if default["seconds_per_token"] <= os_only["seconds_per_token"] else "keep",
            "ours_bypass_seconds_per_token": default["seconds_per_token"],
            "os_page_cache_seconds_per_token": os_only["seconds_per_token"],
            "os_page_cache_hit_rate": os_only.get("os_cache_hit_rate"),
            "ours_hit_rate": default["hit_rate"],
        }
    pre = [r for r in runs if r["group"] == "prefetch" and r["config"]["prefetch_recall"] is not None]
    if default and pre:
        effects = []
        for r in pre:
            ms = r["config"]["compute_ms"]
            ref = (
                default
                if not ms
                else next(
                    (
                        x
                        for x in runs
                        if x["group"] == "prefetch"
                        and x["config"]["prefetch_recall"] is None
                        and x["config"]["compute_ms"] == ms
                    ),
                    None,
                )
            )
            if ref:
                effects.append(
                    {
                        "run": r["name"],
                        "recall": r["config"]["prefetch_recall"],
                        "compute_ms": ms,
                        "seconds_per_token": r["seconds_per_token"],
                        "without_prefetch": ref["seconds_per_token"],
                        "net_gain": 1 - r["seconds_per_token"] / ref["seconds_per_token"],
                    }
                )
        decisions["prefetch"] = {
            "keep_on": any(e["net_gain"] > 0.02 for e in effects if e["compute_ms"] == 0),
            "effects": effects,
        }
    return targets, decisions


def _invariants(report: dict) -> dict:
    """Consistency checks the tests assert (never speed)."""
    out = {}
    rb = report["store"]["record_bytes"]
    budget = report["store"]["budget_bytes"]
    for r in report.get("decode", []):
        if "counters" not in r:
            continue
        c = r["counters"]
        name = r["name"]
        cfg = r["config"]
        T = r["tokens_measured"] + r["warmup_tokens"]
        lookups_ok = c["hits"] + c["misses"] == T * r["layers"] * r["k"]
        bytes_ok = c["bytes_read"] == c["experts_read"] * rb and c["experts_read"] == c["misses"]
        if cfg["prefetch_recall"] is not None:
            bytes_ok = c["bytes_read"] == c["experts_read"] * rb
        out[name] = {
            "lookups_equal_accesses": lookups_ok,
            "bytes_read_equal_misses_times_record": bytes_ok,
            "cache_within_budget": r["own_cache_bytes_peak"] <= cfg["budget_bytes"],
            "hit_rate_at_most_belady": r["hit_rate_all_tokens"] <= r["belady_hit_rate_all_tokens"] + 1e-9
            if cfg["prefetch_recall"] is None
            else True,
            "floor_positive": (r["floor_seconds_per_token"] or 0) > 0,
        }
    for row in report.get("policies", []):
        key = f"policy {row['trace']} {row['budget_fraction']:.2f} {row['policy']}"
        out[key] = {"hit_rate_at_most_belady": row["hit_rate"] <= row["belady_hit_rate"] + 1e-9}
    out["budget_fits"] = {"budget_at_least_k_records": budget >= report["store"]["k"] * rb}
    return out


# =============================================================================================
# Real-model mode
# =============================================================================================


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


def _full_model_dir(store: Path, manifest: Manifest, out: Path) -> Path:
    """A checkpoint directory mlx-lm loads whole: the store's resident weights plus its experts
    stacked back under their SwitchGLU names."""
    import mlx.core as mx

    from .reader import ExpertReader, ReaderConfig

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


def run_model(args: argparse.Namespace) -> dict:
    """``FlashMoE.generate`` on a store; engine.stats and streamer counters against the floor."""
    import mlx.core as mx

    from .engine import GB, FlashMoE

    store = Path(args.store)
    manifest = read_manifest(store)
    files = store_files(store, manifest)
    rb = max(s.record_bytes for s in manifest.layers)
    resident_bytes = (store / "model.safetensors").stat().st_size
    expert_bytes = manifest.expert_bytes
    budget = args.cache_gb * GB if args.cache_gb else max(args.budget_frac * expert_bytes, 12 * rb)
    report: dict = {
        "mode": "model",
        "command": args.command_line,
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
    rng = np.random.default_rng([args.seed, 5])
    keys = [
        (i, int(e))
        for i, s in enumerate(manifest.layers)
        for e in rng.choice(s.num_experts, min(s.num_experts, 4), replace=False)
    ]
    disk = measure_disk(store, manifest, keys, 8, args.io_threads)
    memory = measure_memory(store, manifest, records=min(64, len(keys)))
    report["bandwidth"] = {"disk": disk, "memory": memory}
    runs = []
    for k in [None] + ([4] if args.with_k4 else []):
        evict_page_cache(files)
        engine = FlashMoE.load(
            store,
            cache_gb=budget / GB,
            experts_per_token=k,
            page_cache=args.page_cache,
            policy=args.policy,
            prompt_cache_entries=0,
            prefill_step_size=args.prefill_step,
        )
        vocab = engine.config.get("text_config", engine.config).get("vocab_size", 1000)
        prompt = rng.integers(0, min(vocab, 10_000), size=args.prompt_tokens).tolist()
        steps: list[tuple[int, list[int]]] = []
        streamer = engine.streamer
        fetch = streamer.fetch

        def recording(layer, experts, fetch=fetch, steps=steps):
            steps.append((layer, list(experts)))
            return fetch(layer, experts)

        streamer.fetch = recording
        marks: dict = {}

        def mark(marks=marks, streamer=streamer, steps=steps):
            marks.update(
                time=time.perf_counter(),
                steps=len(steps),
                io=streamer.counters.io_seconds,
                sync=streamer.counters.sync_seconds,
                bytes=streamer.counters.bytes_read,
                hits=streamer.cache.counters.hits,
                misses=streamer.cache.counters.misses,
            )

        engine.model = _ModelProbe(engine.model, mark)
        tic = time.perf_counter()
        result = engine.generate(prompt, max_tokens=args.max_tokens, temperature=0.0)
        end = time.perf_counter()
        engine.model = engine.model._model
        s = result.stats
        c, cc = streamer.counters, streamer.cache.counters
        decode_s = end - marks["time"]
        n = max(1, s.generated_tokens)
        d_hits, d_misses = cc.hits - marks["hits"], cc.misses - marks["misses"]
        d_io, d_sync = c.io_seconds - marks["io"], c.sync_seconds - marks["sync"]
        capacity = int(budget // rb)
        belady = tr.belady(steps, capacity, start=marks["steps"])
        floor = (
            d_misses * rb / disk["bytes_per_s"] + (resident_bytes * n + d_hits * rb) / memory["bytes_per_s"]
        ) / n
        runs.append(
            {
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
        )
        engine.close()
        del engine
        _release_memory()
    report["runs"] = runs
    # mlx-lm with the whole model in memory, when it fits comfortably
    avail = machine_info(store).get("memory_available_bytes") or 0
    if args.with_mlx_lm and expert_bytes + resident_bytes < 0.4 * avail:
        from mlx_lm import stream_generate
        from mlx_lm.utils import load_model, load_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            full = _full_model_dir(store, manifest, Path(tmp) / "full")
            model, _ = load_model(full)
            tokenizer = load_tokenizer(store)
            last = list(stream_generate(model, tokenizer, mx.array(prompt), max_tokens=args.max_tokens))[-1]
            report["mlx_lm_in_memory"] = {
                "prompt_tps": last.prompt_tps,
                "generation_tps": last.generation_tps,
                "generated_tokens": last.generation_tokens,
                "peak_memory_gb": last.peak_memory,
            }
            del model
    else:
        report["mlx_lm_in_memory"] = None
    return report


# =============================================================================================
# Markdown
# =============================================================================================


def _pct(x) -> str:
    return "—" if x is None else f"{x:.1%}"


def _ms(x) -> str:
    return "—" if x is None else f"{x * 1000:.1f}"


def _mib(x) -> str:
    return "—" if x is None else f"{x / MiB:,.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    out = [f"Command: `{report.get('command')}`", ""]
    m = report["machine"]
    out.append(
        f"Machine: {m.get('cpus')} CPUs, {(m.get('memory_total_bytes') or 0) / GiB:.1f} GiB RAM, "
        f"{m.get('platform')}, MLX {m.get('mlx')} on {m.get('mlx_device')}."
    )
    s = report["store"]
    if report["mode"] == "model":
        out.append(
            f"Store: {s['path']}, {s['moe_layers']} MoE layers, {_mib(s['expert_bytes'])} MiB experts, "
            f"{_mib(s['resident_bytes'])} MiB resident; budget {_mib(s['budget_bytes'])} MiB "
            f"({s['budget_fraction']:.0%})."
        )
        b = report["bandwidth"]
        out.append(
            f"Measured: disk {b['disk']['bytes_per_s'] / 1e9:.2f} GB/s, memory "
            f"{b['memory']['bytes_per_s'] / 1e9:.2f} GB/s.\n"
        )
        rows = [
            [
                r["k"],
                r["prompt_tokens"],
                f"{r['prefill_seconds']:.2f}",
                r["generated_tokens"],
                f"{r['decode_tokens_per_s']:.2f}",
                f"{r['hit_rate']:.3f}",
                f"{r['belady_hit_rate']:.3f}",
                _mib(r["bytes_read_per_token"]),
                _pct(r["time_shares"]["io_wait"]),
                _pct(r["time_shares"]["router_sync"]),
                _pct(r["time_shares"]["compute_and_rest"]),
                _ms(r["floor_seconds_per_token"]),
                f"{r['measured_over_floor']:.2f}",
            ]
            for r in report["runs"]
        ]
        out.append(
            _table(
                [
                    "K",
                    "prompt tok",
                    "prefill s",
                    "gen tok",
                    "decode tok/s",
                    "hit",
                    "Belady hit",
                    "MiB read/tok",
                    "I/O wait",
                    "router sync",
                    "compute+rest",
                    "floor ms/tok",
                    "measured/floor",
                ],
                rows,
            )
        )
        if report.get("mlx_lm_in_memory"):
            x = report["mlx_lm_in_memory"]
            out.append(
                f"\nmlx-lm, whole model in memory: prompt {x['prompt_tps']:.1f} tok/s, "
                f"generation {x['generation_tps']:.1f} tok/s."
            )
        return "\n".join(out) + "\n"
    out.append(
        f"Store: {s['layers']} layers x {s['experts_per_layer']} experts x {s['record_bytes']:,} B = "
        f"{s['expert_bytes'] / GiB:.2f} GiB of experts; budget {s['budget_bytes'] / GiB:.2f} GiB "
        f"({s['budget_fraction']:.0%}); K={s['k']}."
    )
    cs = report["cold_start"]
    out.append(
        f"Cold start: posix_fadvise(DONTNEED) on every expert file before each run"
        f"{', plus drop_caches' if cs['drop_caches'] else ''}; store bytes resident after eviction: "
        f"{_mib(cs['resident_bytes_after_evict'])} MiB."
    )
    b = report["bandwidth"]
    out.append(
        f"Measured in this run: disk {b['disk']['bytes_per_s'] / 1e9:.2f} GB/s (O_DIRECT, "
        f"{b['disk']['records']} random records in batches of {b['disk']['batch']}, "
        f"{b['disk']['threads']} threads); memory {b['memory']['bytes_per_s'] / 1e9:.2f} GB/s "
        f"({b['memory']['method']}).\n"
    )
    t = report["trace"]
    out.append(
        "**Routing trace vs the published Qwen3.5-397B statistics** "
        f"({t['stats']['tokens']} tokens x {t['stats']['layers']} layers, seed {t['spec']['seed']})\n"
    )
    rows = []
    for name, c in t["checks"].items():
        target = c["target"] if not isinstance(c["target"], list) else f"{c['target'][0]}–{c['target'][1]}"
        extra = f" (max feasible {c['bound']:.3f})" if "bound" in c else ""
        rows.append(
            [
                name,
                f"{c['value']:.3f}",
                f"{target}{extra}",
                {True: "ok", False: "off", None: "n/a (quoted for 512 experts, k=10)"}[c["ok"]],
            ]
        )
    out.append(_table(["statistic", "measured", "target", ""], rows))
    if report.get("policies"):
        out.append("\n**Cache policies vs Belady** (hit rate over the whole trace, cold start; no I/O)\n")
        rows = [
            [
                r["trace"],
                f"{r['budget_fraction']:.0%}",
                r["policy"],
                f"{r['hit_rate']:.3f}",
                f"{r['over_belady']:.3f}",
            ]
            for r in report["policies"]
        ]
        out.append(_table(["trace", "budget", "policy", "hit rate", "/ Belady"], rows))
    if report.get("decode"):
        out.append(
            "\n**Decode** (after warm-up; ms per token; shares of wall time; hit = served from memory, "
            "own cache or page cache)\n"
        )
        rows = []
        for r in report["decode"]:
            sh = r["time_shares"]
            hit = r.get("hit_rate_combined", r.get("hit_rate"))
            rows.append(
                [
                    r["name"],
                    _mib(r.get("memory_bytes")),
                    f"{r['tokens_per_s']:.2f}",
                    _ms(r["seconds_per_token"]),
                    "—" if hit is None else f"{hit:.3f}",
                    "—" if r.get("belady_hit_rate") is None else f"{r['belady_hit_rate']:.3f}",
                    _mib(r.get("bytes_read_per_token")),
                    _mib(r.get("disk_bytes_per_token")),
                    _pct(sh.get("io_wait")),
                    _pct(sh.get("expert_compute")),
                    _pct(sh.get("rest")),
                    _ms(r.get("floor_seconds_per_token")),
                    "—" if r.get("measured_over_floor") is None else f"{r['measured_over_floor']:.2f}",
                    "—"
                    if not r.get("disk_bytes_per_s_around_run")
                    else "/".join(f"{x / 1e9:.2f}" for x in r["disk_bytes_per_s_around_run"]),
                    "—" if not r.get("load_average") else "/".join(f"{x:.1f}" for x in r["load_average"]),
                ]
            )
        out.append(
            _table(
                [
                    "run",
                    "memory MiB",
                    "tok/s",
                    "ms/token",
                    "hit",
                    "Belady hit",
                    "MiB read/tok",
                    "MiB from disk/tok",
                    "I/O wait",
                    "expert compute",
                    "rest",
                    "floor ms/tok",
                    "measured/floor",
                    "disk GB/s before/after",
                    "load before/after",
                ],
                rows,
            )
        )
    if report.get("prefill"):
        p = report["prefill"]
        out.append(
            f"\n**Prefill** of {p['prompt_tokens']} tokens (layer-major, cold): needs "
            f"{p['experts_needed']} experts ({p['experts_needed_share']:.0%} of the store, "
            f"{p['bytes_needed'] / GiB:.2f} GiB) in {p['groups']} group(s)\n"
        )
        out.append(
            _table(
                [
                    "prefill s",
                    "of which I/O wait s",
                    "expert compute s",
                    "one raw pass s",
                    "one pass GB/s",
                    "prefill / one pass",
                ],
                [
                    [
                        f"{p['seconds']:.2f}",
                        f"{p['io_seconds']:.2f}",
                        f"{p['expert_compute_seconds']:.2f}",
                        f"{p['one_pass_seconds']:.2f}",
                        f"{p['one_pass_bytes_per_s'] / 1e9:.2f}",
                        f"{p['over_one_pass']:.2f}",
                    ]
                ],
            )
        )
    if report.get("targets"):
        out.append("\n**Targets**\n")
        rows = [
            [k, f"{v['value']:.3f}", v["target"], "met" if v["met"] else "NOT met"]
            for k, v in report["targets"].items()
        ]
        out.append(_table(["target", "measured", "goal", ""], rows))
    if report.get("decisions"):
        out.append("\n**Decisions**\n")
        out.append("```json\n" + json.dumps(report["decisions"], indent=1) + "\n```")
    return "\n".join(out) + "\n"


# =============================================================================================
# Command line
# =============================================================================================


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``flashmoe bench`` arguments (subcommands ``synthetic`` and ``model``)."""
    sub = parser.add_subparsers(dest="bench_mode", required=True)
    p = sub.add_parser("synthetic", help="Qwen3.5-397B-sized synthetic store + calibrated routing trace")
    p.add_argument(
        "--store",
        type=Path,
        default=None,
        help="synthetic store directory: reused if it exists, else built there (default: a temp dir)",
    )
    p.add_argument("--keep-store", action="store_true", help="keep a store this run built (default: delete)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=QWEN35["experts"])
    p.add_argument("--hidden", type=int, default=QWEN35["hidden"])
    p.add_argument("--intermediate", type=int, default=QWEN35["intermediate"])
    p.add_argument("-k", type=int, default=QWEN35["k"], help="experts per token of the trace")
    p.add_argument("--budget-frac", type=float, default=0.25, help="cache budget, share of the expert bytes")
    p.add_argument("--decode-tokens", type=int, default=96, help="tokens timed per decode run")
    p.add_argument("--warmup", type=int, default=48, help="tokens decoded before timing (from cold)")
    p.add_argument("--policy-tokens", type=int, default=2048, help="trace length of the policy study")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--write-threads", type=int, default=2)
    p.add_argument("--half-life", type=float, default=None, help="lfu half-life (default: cache.py's)")
    p.add_argument(
        "--half-lives",
        type=_float_list,
        default=[640, 2560, math.inf],
        help="lfu half-lives compared in the policy study",
    )
    p.add_argument("--guard", type=int, default=None, help="lfu recency guard (default: cache.py's)")
    p.add_argument("--quick-policies", action="store_true", help="policy study on the calibrated trace only")
    p.add_argument("--prefetch-recalls", type=_float_list, default=[0.9, 0.6])
    p.add_argument(
        "--compute-ms",
        type=float,
        default=2.0,
        help="emulated non-expert compute per layer for the prefetch-overlap runs (0: skip)",
    )
    p.add_argument(
        "--no-touch",
        dest="touch",
        action="store_false",
        help="skip the expert-compute stand-in (one read of each needed record from memory)",
    )
    p.add_argument("--disk-sample-bytes", type=float, default=1.5e9)
    p.add_argument("--memory-sample-bytes", type=float, default=3e8)
    p.add_argument(
        "--mmap-random",
        action="store_true",
        help="also run the mmap baseline with MADV_RANDOM (4 KiB faults: very slow)",
    )
    p.add_argument("--drop-caches", action="store_true", help="also write /proc/sys/vm/drop_caches (root)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of the decode runs (round-robin); each configuration keeps its fastest",
    )
    p.add_argument("--experiments", default="all", help=f"comma list of {','.join(EXPERIMENTS)} (or all)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a seconds-long smoke run (CI)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--markdown", type=Path, default=None, help="write the markdown report here")
    p = sub.add_parser("model", help="FlashMoE.generate on a real store")
    p.add_argument("store", type=Path)
    p.add_argument("--cache-gb", type=float, default=None, help="default: --budget-frac of the expert bytes")
    p.add_argument("--budget-frac", type=float, default=0.25)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY)
    p.add_argument("--page-cache", choices=("bypass", "keep"), default="bypass")
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-k4", dest="with_k4", action="store_false", help="skip the K=4 run")
    p.add_argument(
        "--no-mlx-lm",
        dest="with_mlx_lm",
        action="store_false",
        help="skip mlx-lm with the whole model in memory",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)


TINY = dict(
    layers=3,
    experts=32,
    hidden=128,
    intermediate=64,
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


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark ``args`` describes; write and return its report."""
    from . import cache as cache_module

    if argv is None:  # through the ``flashmoe`` command
        args.command_line = shlex.join(["flashmoe", *sys.argv[1:]])
    else:
        args.command_line = shlex.join(["python", "-m", "flashmoe_backend.bench", *argv])
    shimmed = ensure_reader_bf16()
    if args.bench_mode == "synthetic":
        if args.tiny:
            for key, value in TINY.items():
                setattr(args, key, value)
        if args.half_life is None:
            args.half_life = cache_module.DEFAULT_HALF_LIFE
        if args.half_life not in args.half_lives:
            args.half_lives = [args.half_life, *args.half_lives]
        if args.guard is None:
            args.guard = min(cache_module.DEFAULT_GUARD, args.k) if args.tiny else cache_module.DEFAULT_GUARD
        report = run_synthetic(args)
    else:
        report = run_model(args)
    report["reader_bf16_shim"] = shimmed
    text = to_markdown(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if not args.out and not args.markdown:
        print(text)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashmoe bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    run(parser.parse_args(argv), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
