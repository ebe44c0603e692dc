"""Custom kernels for the models flashmoe runs.

Each kernel here is tested against a plain-MLX reference (``tests/test_kernels.py``):

* :mod:`flashmoe_backend.kernels.gated_delta`: the GatedDeltaNet recurrence of Qwen3.5 /
  Qwen3-Next, chunked (matmul) form for CPU and a CUDA kernel for MLX's CUDA backend, plus
  :func:`~flashmoe_backend.kernels.gated_delta.install_fast_gated_delta` to route mlx-lm's
  models through them.

Submodules are imported on demand, so importing this package costs nothing.
"""
