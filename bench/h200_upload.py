"""Host->device paths for expert records on MLX's CUDA backend, and a reader that times disk and
upload apart (bench/h200_layers.py uses both).

``upload(method, ...)``: ``mx.array`` per tensor (what ``ExpertReader`` does), one ``mx.array`` per
record or per layer batch sliced into its tensors, ``mx.from_dlpack``; ``PhasedReader`` adds
``into_mlx``, reading straight into MLX-owned memory. ``upload_study`` times each on real records
and checks them byte for byte on the device.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from flashmoe_backend.bench.bandwidth import open_direct, pread_full
from flashmoe_backend.bench.pagecache import store_files
from flashmoe_backend.store.format import LayerSpec, Manifest, StoreError, checksum

UPLOADS = ("per_tensor", "per_record", "per_batch", "dlpack", "into_mlx")


def _tensor_views(flat: mx.array, base: int, spec: LayerSpec) -> dict:
    """The expert's tensors as views of a uint8 MLX array holding its record at ``base``."""
    return {
        t.name: flat[base + t.offset : base + t.offset + t.nbytes].view(getattr(mx, t.dtype)).reshape(t.shape)
        for t in spec.tensors
    }


def _np_view(record: np.ndarray, t) -> np.ndarray:
    carrier = np.uint16 if t.dtype == "bfloat16" else np.dtype(t.dtype)
    return record[t.offset : t.offset + t.nbytes].view(carrier).reshape(t.shape)


def _per_tensor(staged: np.ndarray, n: int, spec: LayerSpec, to_device) -> list[dict]:
    """Each tensor of each record to the device on its own, by ``to_device``."""
    rb = spec.record_bytes
    out = []
    for i in range(n):
        rec = staged[i * rb : (i + 1) * rb]
        w = {}
        for t in spec.tensors:
            a = to_device(_np_view(rec, t))
            w[t.name] = a.view(mx.bfloat16) if t.dtype == "bfloat16" else a
        out.append(w)
    return out


def upload(method: str, staged: np.ndarray, n: int, spec: LayerSpec) -> list[dict]:
    """Device arrays of ``n`` records lying back to back in ``staged`` (host memory)."""
    rb = spec.record_bytes
    if method == "per_tensor":  # what ExpertReader._to_mlx does
        return _per_tensor(staged, n, spec, mx.array)
    if method == "per_record":
        return [_tensor_views(mx.array(staged[i * rb : (i + 1) * rb]), 0, spec) for i in range(n)]
    if method == "per_batch":
        flat = mx.array(staged[: n * rb])
        return [_tensor_views(flat, i * rb, spec) for i in range(n)]
    if method == "dlpack":
        return _per_tensor(staged, n, spec, mx.from_dlpack)
    raise ValueError(method)


def _host_view(a: mx.array) -> np.ndarray:
    """A writable host view of an evaluated MLX array's memory (no copy where supported)."""
    return np.frombuffer(memoryview(a).cast("B"), dtype=np.uint8)


class PhasedReader:
    """Same ``read(layer, experts)`` as ExpertReader (checksums on first read, O_DIRECT), but in
    two timed phases: all records of the call from disk into host memory, then to the device with
    ``method``. ``into_mlx`` reads straight into MLX-owned buffers (no separate upload)."""

    def __init__(self, store: Path, manifest: Manifest, method: str, threads: int):
        self.manifest = manifest
        self.method = method
        self.fds = [open_direct(p)[0] for p in store_files(store, manifest)]
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="h200-io")
        self.verified: set[tuple[int, int]] = set()
        self.lock = threading.Lock()
        self.staging = np.empty(0, dtype=np.uint8)
        self.io_seconds = 0.0
        self.upload_seconds = 0.0
        self.direct_failed = None

    def _load(self, layer: int, expert: int, view: np.ndarray) -> None:
        spec = self.manifest.layers[layer]
        pread_full(self.fds[layer], view, expert * spec.record_bytes)
        key = (layer, expert)
        if key not in self.verified:
            if checksum(view) != spec.checksums[expert]:
                raise StoreError(f"checksum mismatch in layer {layer} expert {expert}")
            with self.lock:
                self.verified.add(key)

    def read(self, layer: int, experts: list[int]) -> list[dict]:
        spec = self.manifest.layers[layer]
        rb, n = spec.record_bytes, len(experts)
        if self.method == "into_mlx" and self.direct_failed is None:
            tic = time.perf_counter()
            slots = [mx.zeros((rb,), dtype=mx.uint8) for _ in experts]
            mx.eval(slots)
            views = [_host_view(s) for s in slots]
            try:
                list(self.pool.map(lambda i: self._load(layer, experts[i], views[i]), range(n)))
            except OSError as e:  # e.g. O_DIRECT into this memory refused: stage instead from now on
                self.direct_failed = repr(e)
                return self.read(layer, experts)
            mid = time.perf_counter()
            out = [_tensor_views(s, 0, spec) for s in slots]
            mx.eval(out)
            self.io_seconds += mid - tic
            self.upload_seconds += time.perf_counter() - mid
            return out
        if len(self.staging) < n * rb:
            self.staging = np.frombuffer(mmap.mmap(-1, n * rb), dtype=np.uint8)
        tic = time.perf_counter()
        list(
            self.pool.map(
                lambda i: self._load(layer, experts[i], self.staging[i * rb : (i + 1) * rb]), range(n)
            )
        )
        mid = time.perf_counter()
        method = "per_batch" if self.method == "into_mlx" else self.method
        out = upload(method, self.staging, n, spec)
        mx.eval(out)
        self.io_seconds += mid - tic
        self.upload_seconds += time.perf_counter() - mid
        return out

    def read_iter(self, layer: int, experts: list[int]):
        """``read``'s weights as the streamer takes them (all phases done first)."""
        return iter(self.read(layer, experts))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in self.fds:
            os.close(fd)


def upload_study(store: Path, manifest: Manifest, records: int, repeats: int = 3) -> list[dict]:
    """Each upload path on ``records`` real records staged in host memory: seconds to the device
    and to a first device use of every byte, and a byte-for-byte check of one record."""
    spec = manifest.layers[0]
    rb = spec.record_bytes
    n = min(records, spec.num_experts)
    staged = np.frombuffer(mmap.mmap(-1, n * rb), dtype=np.uint8)
    raw = PhasedReader(store, manifest, "per_batch", 8)
    try:
        for i in range(n):
            raw._load(0, i, staged[i * rb : (i + 1) * rb])
    finally:
        raw.close()

    def first_use(ws):
        mx.eval([mx.max(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a) for w in ws for a in w.values()])

    def exact(w, rec) -> bool:
        for t in spec.tensors:
            a = w[t.name]
            host = np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)
            if host.tobytes() != rec[t.offset : t.offset + t.nbytes].tobytes():
                return False
        return True

    results = []
    for method in UPLOADS:
        row = {"method": method, "records": n, "bytes": n * rb, "ok": False}
        try:
            best_up = best_use = float("inf")
            for _ in range(repeats):
                if method == "into_mlx":
                    slots = [mx.zeros((rb,), dtype=mx.uint8) for _ in range(n)]
                    mx.eval(slots)
                    tic = time.perf_counter()
                    for i, s in enumerate(slots):
                        np.copyto(_host_view(s), staged[i * rb : (i + 1) * rb])
                    ws = [_tensor_views(s, 0, spec) for s in slots]
                    mx.eval(ws)
                else:
                    tic = time.perf_counter()
                    ws = upload(method, staged, n, spec)
                    mx.eval(ws)
                mid = time.perf_counter()
                first_use(ws)
                end = time.perf_counter()
                best_up, best_use = min(best_up, mid - tic), min(best_use, end - tic)
            row.update(
                ok=exact(ws[-1], staged[(n - 1) * rb : n * rb]),
                upload_seconds=best_up,
                to_first_use_seconds=best_use,
                upload_gb_s=n * rb / best_up / 1e9,
                to_first_use_gb_s=n * rb / best_use / 1e9,
            )
        except Exception as e:  # a path this MLX build does not support
            row["error"] = f"{type(e).__name__}: {e}"
        results.append(row)
    return results
