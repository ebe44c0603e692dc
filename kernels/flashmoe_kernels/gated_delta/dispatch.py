"""GatedDeltaNet off Apple GPUs: pick the fastest recurrence per device and route mlx-lm to it.

Qwen3.5 and Qwen3-Next run most of their layers as GatedDeltaNet linear attention. mlx-lm
computes its recurrence with a Metal kernel, but only on Apple GPUs: on CUDA and on CPU,
``mlx_lm.models.gated_delta.gated_delta_update`` falls back to ``gated_delta_ops``, a Python loop
of T compiled one-token steps, i.e. 2,048 dependent steps per layer for a 2,048-token prompt
(6.8 s on an H200, bench/RESULTS.md).

* :func:`gated_delta_update_fast`: drop-in for mlx-lm's ``gated_delta_update`` (same gates, same
  arguments) that dispatches, see :func:`select_gated_delta_path`:

  - ``use_kernel=False`` (training): mlx-lm's ``gated_delta_ops``, as mlx-lm does;
  - Metal GPU, Dk a multiple of 32: mlx-lm's own ``gated_delta_kernel``;
  - CUDA GPU, scalar gates, Dk a multiple of 32: :func:`~.cuda.gated_delta_cuda`;
  - otherwise (CPU): :func:`~.chunked.gated_delta_chunked` for T > 1 with scalar
    gates, else ``gated_delta_ops`` (one decode step is already a single compiled call).

* :func:`install_fast_gated_delta` / :func:`uninstall_fast_gated_delta` /
  :func:`fast_gated_delta` route mlx-lm's ``qwen3_5`` (hence ``qwen3_5_moe``) and ``qwen3_next``
  models through :func:`gated_delta_update_fast`.
* :func:`recorded_gated_delta_paths`: the path each call took, for benchmarks.

The shared contract (shapes, dtypes, masks): :mod:`.contract`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator

import mlx.core as mx
from mlx_lm.models import gated_delta as _mlx_gd

from .chunked import gated_delta_chunked
from .cuda import cuda_available, gated_delta_cuda

__all__ = [
    "fast_gated_delta",
    "gated_delta_chunked",
    "gated_delta_cuda",
    "gated_delta_update_fast",
    "install_fast_gated_delta",
    "recorded_gated_delta_paths",
    "select_gated_delta_path",
    "uninstall_fast_gated_delta",
]

#: Modules whose ``gated_delta_update`` name :func:`install_fast_gated_delta` replaces
#: (``qwen3_5_moe`` builds its layers from ``qwen3_5``).
PATCHED_MODULES: tuple[str, ...] = ("mlx_lm.models.qwen3_5", "mlx_lm.models.qwen3_next")

#: Chunk size :func:`gated_delta_update_fast` uses on CPU. The scan's sequential matmuls cost
#: 3 Dk Dv per token whatever the chunk; the in-chunk ones grow with it, so on a CPU a smaller
#: chunk than the GPU-friendly 64 wins (Qwen3.5-397B heads, T=2048, 2-core x86, MLX's bundled
#: BLAS: 5.3 s at 32 against 8.7 s at 64; bench/RESULTS.md).
CPU_CHUNK = 32

# The lists recorded_gated_delta_paths yields, while their blocks run.
_recorders: list[list[str]] = []


def select_gated_delta_path(T: int, Dk: int, g_ndim: int = 3, use_kernel: bool = True) -> str:
    """Which implementation :func:`gated_delta_update_fast` uses, on the current default device.

    Returns ``"ops"`` (mlx-lm's ``gated_delta_ops``), ``"metal"`` (mlx-lm's
    ``gated_delta_kernel``), ``"cuda"`` (:func:`gated_delta_cuda`) or ``"chunked"``
    (:func:`gated_delta_chunked`).
    """
    if not use_kernel:
        return "ops"  # training: mlx-lm's differentiable path
    on_gpu = mx.default_device() == mx.gpu
    dk_ok = Dk >= 32 and Dk % 32 == 0
    if on_gpu and mx.metal.is_available() and dk_ok:
        return "metal"
    if on_gpu and cuda_available() and dk_ok and g_ndim == 3:
        return "cuda"
    if T > 1 and g_ndim == 3:
        return "chunked"
    return "ops"


def gated_delta_update_fast(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: mx.array | None = None,
    mask: mx.array | None = None,
    *,
    use_kernel: bool = True,
    lower_bound: float | None = None,
    allow_neg_eigval: bool = False,
) -> tuple[mx.array, mx.array]:
    """Drop-in for mlx-lm's ``gated_delta_update`` that is fast off Apple GPUs too.

    Computes beta and the gate g exactly as mlx-lm does (``sigmoid(b)``, doubled with
    ``allow_neg_eigval``; mlx-lm's ``compute_g`` or ``compute_lower_bound_g``), then runs the
    implementation :func:`select_gated_delta_path` picks. Returns ``(y, state)``.
    """
    beta = mx.sigmoid(b)
    if allow_neg_eigval:
        beta = beta * 2.0
    if lower_bound is None:
        g = _mlx_gd.compute_g(A_log, a, dt_bias)
    else:
        g = _mlx_gd.compute_lower_bound_g(A_log, a, dt_bias, lower_bound)
    B, T, _, Dk = q.shape
    if state is None:
        Hv, Dv = v.shape[-2:]
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)

    path = select_gated_delta_path(T, Dk, g.ndim, use_kernel)
    for paths in _recorders:
        paths.append(path)
    if path == "metal":
        return _mlx_gd.gated_delta_kernel(q, k, v, g, beta, state, mask)
    if path == "cuda":
        return gated_delta_cuda(q, k, v, g, beta, state, mask)
    if path == "chunked":
        chunk = CPU_CHUNK if mx.default_device() == mx.cpu else 64
        return gated_delta_chunked(q, k, v, g, beta, state, mask, chunk=chunk)
    return _mlx_gd.gated_delta_ops(q, k, v, g, beta, state, mask)


# Originals replaced by install_fast_gated_delta, by module name.
_originals: dict[str, Callable] = {}


def _install(modules: Iterable[str]) -> list[str]:
    changed = []
    for name in modules:
        module = importlib.import_module(name)
        current = getattr(module, "gated_delta_update", None)
        if current is None or current is gated_delta_update_fast:
            continue
        _originals[name] = current
        module.gated_delta_update = gated_delta_update_fast
        changed.append(name)
    return changed


def _restore(names: Iterable[str]) -> list[str]:
    restored = []
    for name in list(names):
        original = _originals.pop(name, None)
        module = importlib.import_module(name)
        # Leave the name alone if someone replaced it again after us.
        if original is not None and getattr(module, "gated_delta_update", None) is gated_delta_update_fast:
            module.gated_delta_update = original
            restored.append(name)
    return restored


def install_fast_gated_delta(modules: Iterable[str] = PATCHED_MODULES) -> bool:
    """Make mlx-lm's Qwen3.5 / Qwen3-Next layers call :func:`gated_delta_update_fast`.

    Replaces the module-level name ``gated_delta_update`` (which those modules import from
    ``mlx_lm.models.gated_delta`` and look up at call time) in each of ``modules``. Idempotent;
    returns whether anything changed. Undo with :func:`uninstall_fast_gated_delta`, or use
    :func:`fast_gated_delta` as a context manager.
    """
    return bool(_install(modules))


def uninstall_fast_gated_delta() -> bool:
    """Put back every original that :func:`install_fast_gated_delta` replaced; return whether
    anything changed."""
    return bool(_restore(list(_originals)))


@contextlib.contextmanager
def recorded_gated_delta_paths() -> Iterator[list[str]]:
    """Context manager: the path :func:`gated_delta_update_fast` takes for each call in the
    block (what :func:`select_gated_delta_path` returned), appended to the list yielded; for
    benchmarks that report which recurrence a model ran."""
    paths: list[str] = []
    _recorders.append(paths)
    try:
        yield paths
    finally:
        _recorders.remove(paths)


@contextlib.contextmanager
def fast_gated_delta(modules: Iterable[str] = PATCHED_MODULES) -> Iterator[bool]:
    """Context manager: install :func:`gated_delta_update_fast` for the block, then restore what
    this installation changed (an installation already in place is left in place). Yields
    whether anything changed."""
    changed = _install(modules)
    try:
        yield bool(changed)
    finally:
        _restore(changed)

