"""Kernels for the models flashmoe runs, one kernel per subpackage, each tested against a
plain-MLX reference (``kernels/tests``).

* :mod:`.gated_delta`: the GatedDeltaNet recurrence of Qwen3.5 / Qwen3-Next (a CUDA kernel, a
  chunked matmul form for CPU, and the dispatch that routes mlx-lm's models through them;
  ``FlashMoE.load`` calls :func:`install_fast_gated_delta`).
"""

from .gated_delta import (
    fast_gated_delta,
    gated_delta_chunked,
    gated_delta_cuda,
    gated_delta_update_fast,
    install_fast_gated_delta,
    recorded_gated_delta_paths,
    select_gated_delta_path,
    uninstall_fast_gated_delta,
)

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
