"""Custom kernels for the models flashmoe runs, each tested against a plain-MLX reference
(``tests/test_kernels.py``).

The GatedDeltaNet recurrence of Qwen3.5 / Qwen3-Next, whose fast path in mlx-lm is Metal-only:

* :mod:`.gated_delta_contract`: the recurrence and the shapes every implementation keeps;
* :mod:`.gated_delta_chunked`: the chunked (matmul) form, for CPU;
* :mod:`.gated_delta_cuda`: a CUDA kernel, for MLX's CUDA backend;
* :mod:`.gated_delta`: picks one per device and routes mlx-lm's models through it
  (:func:`~.gated_delta.install_fast_gated_delta`, called by ``FlashMoE.load``).

Submodules are imported on demand, so importing this package costs nothing.
"""
