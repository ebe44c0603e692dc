"""The GatedDeltaNet recurrence of Qwen3.5 / Qwen3-Next, fast off Apple GPUs (mlx-lm's fast
path is a Metal kernel; elsewhere it loops over tokens).

* :mod:`.contract`: the recurrence, the shapes every implementation keeps, and
  :func:`~.contract.make_inputs` (model-like random inputs, for tests and benchmarks);
* :mod:`.chunked`: the chunked (matmul) form, for CPU;
* :mod:`.cuda`: a CUDA kernel, for MLX's CUDA backend;
* :mod:`.dispatch`: picks one per device (:func:`~.dispatch.select_gated_delta_path`) and
  routes mlx-lm's models through it (:func:`~.dispatch.install_fast_gated_delta`).
"""

from .chunked import gated_delta_chunked
from .contract import check_shapes, make_inputs
from .cuda import cuda_available, gated_delta_cuda
from .dispatch import (
    CPU_CHUNK,
    PATCHED_MODULES,
    fast_gated_delta,
    gated_delta_update_fast,
    install_fast_gated_delta,
    recorded_gated_delta_paths,
    select_gated_delta_path,
    uninstall_fast_gated_delta,
)

__all__ = [
    "CPU_CHUNK",
    "PATCHED_MODULES",
    "check_shapes",
    "cuda_available",
    "fast_gated_delta",
    "gated_delta_chunked",
    "gated_delta_cuda",
    "gated_delta_update_fast",
    "install_fast_gated_delta",
    "make_inputs",
    "recorded_gated_delta_paths",
    "select_gated_delta_path",
    "uninstall_fast_gated_delta",
]
