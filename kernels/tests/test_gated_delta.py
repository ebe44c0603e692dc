"""Tests of flashmoe_kernels.gated_delta against plain-MLX references (mlx-lm's own ops paths).

Every test runs on the CPU (the ``_cpu_default_device`` fixture), whatever the machine, except
the CUDA kernel's own run (``test_cuda_kernel_matches_ops``), which puts it on the GPU. The CUDA
tests all have ``cuda`` in their names (``pytest -k cuda``); those that need a GPU, nvcc or g++
skip without one.

Tolerances. Everything runs in float32 and compares two evaluation orders of the same sums
(sequential per token in mlx-lm's ``gated_delta_ops``, matmuls over chunks here), each with
rounding errors of a few float32 ulps (eps = 1.2e-7) per accumulated term; observed differences
are ~1e-7 of the values' magnitude. ``_assert_close`` allows 1e-5 of the reference's largest
magnitude (at least 1): ~100x the observed error, while a wrong term in the algebra shows up at
the size of the values themselves. Half-precision outputs may differ by one rounding step of
their dtype. The long-sequence test allows 5e-5, for error growth over 512 steps.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import flashmoe_kernels.gated_delta.chunked as chunked_mod
import flashmoe_kernels.gated_delta.cuda as cuda_mod
import flashmoe_kernels.gated_delta.dispatch as gd
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import gated_delta as mlx_gd

CUDA = mx.cuda.is_available()


def _assert_close(x: mx.array, ref: mx.array, rel: float = 1e-5, where: mx.array | None = None) -> None:
    x = np.array(x.astype(mx.float32), dtype=np.float64)
    ref = np.array(ref.astype(mx.float32), dtype=np.float64)
    if where is not None:
        keep = np.broadcast_to(np.array(where), x.shape)
        x, ref = x[keep], ref[keep]
    assert x.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    err = float(np.abs(x - ref).max(initial=0.0))
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x {scale:.3g}"


def _inputs(B, T, Hk, Hv, Dk, Dv, *, seed=0, dtype=mx.float32, state_scale=0.5):
    """Realistic inputs: q, k normalized as mlx-lm's normalize_qk does, mlx-lm's gate formula."""
    mx.random.seed(seed)
    q = mx.random.normal((B, T, Hk, Dk))
    k = mx.random.normal((B, T, Hk, Dk))
    q = q / mx.linalg.norm(q, axis=-1, keepdims=True) * Dk**-0.5
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    v = mx.random.normal((B, T, Hv, Dv))
    a = mx.random.normal((B, T, Hv))
    A_log = mx.log(mx.random.uniform(1.0, 16.0, (Hv,)))
    dt_bias = mx.random.normal((Hv,))
    b = mx.random.normal((B, T, Hv))
    g = mlx_gd.compute_g(A_log, a, dt_bias)
    beta = mx.sigmoid(b)
    state = state_scale * mx.random.normal((B, Hv, Dv, Dk))
    return dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype), g=g, beta=beta, state=state,
                a=a, b=b, A_log=A_log, dt_bias=dt_bias)


def _kernel_args(x):
    return x["q"], x["k"], x["v"], x["g"], x["beta"], x["state"]


# --------------------------------------------------------------------------------------------
# gated_delta_chunked
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B, T, Hk, Hv, Dk, Dv, chunk",
    [
        (1, 1, 2, 2, 32, 16, 64),  # T == 1
        (2, 5, 2, 4, 32, 16, 64),  # T < chunk, GQA
        (1, 100, 2, 4, 16, 8, 32),  # T not a multiple of chunk
        (2, 130, 1, 2, 64, 32, 64),  # two full chunks and a tail, GQA
        (1, 64, 2, 2, 32, 32, 16),  # T a multiple of chunk
        (1, 37, 1, 1, 24, 40, 8),  # Dk not a multiple of 32, Dv > Dk
    ],
)
def test_chunked_matches_ops(B, T, Hk, Hv, Dk, Dv, chunk):
    x = _inputs(B, T, Hk, Hv, Dk, Dv, seed=T)
    y_ref, s_ref = mlx_gd.gated_delta_ops(*_kernel_args(x))
    y, s = gd.gated_delta_chunked(*_kernel_args(x), chunk=chunk)
    assert y.shape == (B, T, Hv, Dv) and y.dtype == mx.float32
    assert s.shape == (B, Hv, Dv, Dk) and s.dtype == mx.float32
    _assert_close(y, y_ref)
    _assert_close(s, s_ref)
    # The all-matmul triangular inverse (used off CPU) gives the same result.
    y2, s2 = gd.gated_delta_chunked(*_kernel_args(x), chunk=chunk, lapack=False)
    _assert_close(y2, y_ref)
    _assert_close(s2, s_ref)


def test_chunked_zero_state_default_and_empty():
    x = _inputs(1, 20, 1, 2, 32, 16)
    y_ref, s_ref = mlx_gd.gated_delta_ops(x["q"], x["k"], x["v"], x["g"], x["beta"])
    y, s = gd.gated_delta_chunked(x["q"], x["k"], x["v"], x["g"], x["beta"])
    _assert_close(y, y_ref)
    _assert_close(s, s_ref)
    e = _inputs(1, 0, 1, 2, 32, 16)
    y, s = gd.gated_delta_chunked(*_kernel_args(e))
    assert y.shape == (1, 0, 2, 16)
    _assert_close(s, e["state"])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_chunked_half_inputs(dtype):
    x = _inputs(2, 70, 2, 4, 32, 16, dtype=dtype, seed=7)
    y_ref, s_ref = mlx_gd.gated_delta_ops(*_kernel_args(x))
    y, s = gd.gated_delta_chunked(*_kernel_args(x), chunk=32)
    assert y.dtype == dtype and s.dtype == mx.float32
    # Both compute in float32 from the same half inputs; y may round to the neighbouring
    # representable value: allow one ulp of the dtype at the largest magnitude.
    ulp = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}[dtype]
    _assert_close(y, y_ref, rel=ulp)
    _assert_close(s, s_ref)


def test_chunked_mask_keeps_state_and_zeroes_y():
    B, T = 3, 45
    x = _inputs(B, T, 2, 4, 32, 16, seed=11)
    mx.random.seed(5)
    mask = mx.random.uniform(shape=(B, T)) > 0.3
    # Row 1: left padding, as batched generation makes it; row 2: fully masked.
    mask = mx.concatenate(
        [mask[:1], (mx.arange(T) >= 17)[None], mx.zeros((1, T), dtype=mx.bool_)], axis=0
    )
    y_ref, s_ref = mlx_gd.gated_delta_ops(*_kernel_args(x), mask)
    y, s = gd.gated_delta_chunked(*_kernel_args(x), mask, chunk=16)
    _assert_close(s, s_ref)  # masked tokens leave the state as it was (no decay, no update)
    _assert_close(s[2], x["state"][2])
    keep = mask[..., None, None]
    _assert_close(y, y_ref, where=keep)
    # gated_delta_ops returns the read-out of a discarded update at masked tokens; we (like
    # mlx-lm's Metal kernel) return 0 there.
    assert float(mx.abs(mx.where(keep, 0.0, y)).max()) == 0.0


def test_chunked_long_sequence_near_one_decay():
    """T = 512 with decays in [0.99, 1] and beta near 1: the state carries information over the
    whole sequence, the regime where a chunked scan could accumulate error."""
    B, T, Hk, Hv, Dk, Dv = 1, 512, 1, 2, 32, 32
    x = _inputs(B, T, Hk, Hv, Dk, Dv, seed=3)
    mx.random.seed(4)
    g = mx.random.uniform(0.99, 1.0, (B, T, Hv))
    beta = mx.random.uniform(0.8, 1.0, (B, T, Hv))
    args = (x["q"], x["k"], x["v"], g, beta, x["state"])
    y_ref, s_ref = mlx_gd.gated_delta_ops(*args)
    y, s = gd.gated_delta_chunked(*args)
    assert float(mx.abs(s_ref).max()) > 0.5  # the state did not just decay away
    _assert_close(y, y_ref, rel=5e-5)
    _assert_close(s, s_ref, rel=5e-5)


def test_chunked_underflowing_and_repeated_gates():
    """Gates that underflow to 0 (log g = -inf) and a run of identical keys with beta = 1 (the
    triangular system's worst case) stay finite and exact."""
    x = _inputs(1, 40, 1, 2, 32, 16, seed=9)
    g = mx.where(mx.arange(40)[None, :, None] % 7 == 3, 0.0, x["g"])
    k = mx.broadcast_to(x["k"][:, :1], x["k"].shape)
    beta = mx.ones_like(x["beta"])
    args = (x["q"], k, x["v"], g, beta, x["state"])
    y_ref, s_ref = mlx_gd.gated_delta_ops(*args)
    for lapack in (True, False):
        y, s = gd.gated_delta_chunked(*args, lapack=lapack)
        _assert_close(y, y_ref)
        _assert_close(s, s_ref)


def test_chunked_rejects_vector_gates():
    x = _inputs(1, 4, 1, 2, 32, 16)
    g = mx.broadcast_to(x["g"][..., None], (1, 4, 2, 32))
    with pytest.raises(NotImplementedError, match="scalar gates"):
        gd.gated_delta_chunked(x["q"], x["k"], x["v"], g, x["beta"], x["state"])


@pytest.mark.parametrize("n", [5, 8, 50, 64])
def test_unit_lower_inverse(n):
    """Both triangular inverses on the matrices the chunked form builds (beta * decay * k.k with
    unit keys) and on the worst case, all ones below the diagonal (identical keys, beta = g = 1),
    whose inverse is exact in floating point."""
    mx.random.seed(n)
    eye = mx.eye(n)
    k = mx.random.normal((4, n, 32))
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    decay = mx.exp(mx.cumsum(mx.tril(mx.log(mx.random.uniform(0.8, 1.0, (4, n, n))), -1), axis=-2))
    realistic = mx.tril(mx.random.uniform(0, 1, (4, n, 1)) * decay * (k @ k.swapaxes(-1, -2)), -1)
    ones = mx.tril(mx.ones((2, n, n)), -1)
    for a in (realistic, ones):
        for lapack in (True, False):
            inv = chunked_mod._unit_lower_inverse(a, lapack=lapack)
            _assert_close(inv @ (eye + a), mx.broadcast_to(eye, a.shape))
    bidiagonal = eye - mx.eye(n, k=-1)
    inverse = chunked_mod._unit_lower_inverse(ones, lapack=False)
    _assert_close(inverse, mx.broadcast_to(bidiagonal, ones.shape), rel=0)


# --------------------------------------------------------------------------------------------
# gated_delta_update_fast, install_fast_gated_delta
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"lower_bound": -5.0}, {"allow_neg_eigval": True}, {"use_kernel": False}, {"mask": True}],
)
def test_update_fast_matches_mlx_lm_on_cpu(options):
    options = dict(options)
    x = _inputs(2, 33, 2, 4, 32, 16, seed=21)
    if options.pop("mask", False):
        options["mask"] = mx.arange(33)[None, :] >= mx.array([[0], [5]])
    ins = (x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"], x["state"])
    y_ref, s_ref = mlx_gd.gated_delta_update(*ins, **options)
    y, s = gd.gated_delta_update_fast(*ins, **options)
    _assert_close(s, s_ref)
    _assert_close(y, y_ref, where=None if "mask" not in options else options["mask"][..., None, None])


def test_dispatch_on_cpu():
    assert mx.default_device() == mx.cpu
    assert gd.select_gated_delta_path(T=100, Dk=128) == "chunked"
    assert gd.select_gated_delta_path(T=1, Dk=128) == "ops"
    assert gd.select_gated_delta_path(T=100, Dk=128, g_ndim=4) == "ops"
    assert gd.select_gated_delta_path(T=100, Dk=128, use_kernel=False) == "ops"
    # state=None and single-token decode go through mlx-lm's path.
    x = _inputs(1, 1, 1, 2, 32, 16)
    ins = (x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"])
    y_ref, s_ref = mlx_gd.gated_delta_update(*ins)
    y, s = gd.gated_delta_update_fast(*ins)
    _assert_close(y, y_ref)
    _assert_close(s, s_ref)


def _tiny_qwen35_moe():
    from mlx_lm.models import qwen3_5_moe

    text = dict(
        model_type="qwen3_5_moe_text",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,  # three GatedDeltaNet layers and one full-attention layer
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )
    mx.random.seed(0)
    args = qwen3_5_moe.ModelArgs.from_dict({"model_type": "qwen3_5_moe", "text_config": text})
    model = qwen3_5_moe.Model(args)
    model.eval()  # inference mode, as mlx_lm.load leaves it (training mode would take mlx-lm's ops path)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def uninstalled():
    """mlx-lm's own recurrence for the test (FlashMoE.load installs ours process-wide), then
    the installation as it was."""
    was_installed = gd.uninstall_fast_gated_delta()
    yield
    if was_installed:
        gd.install_fast_gated_delta()
    else:
        gd.uninstall_fast_gated_delta()


def test_install_routes_tiny_qwen35_moe(monkeypatch, uninstalled):
    from mlx_lm.models import qwen3_5, qwen3_next

    original = mlx_gd.gated_delta_update
    assert qwen3_5.gated_delta_update is original and qwen3_next.gated_delta_update is original
    model = _tiny_qwen35_moe()
    tokens = mx.array([[(7 * i + 3) % 97 for i in range(40)]])
    ref = model(tokens)
    mx.eval(ref)

    calls = []
    chunked = gd.gated_delta_chunked
    monkeypatch.setattr(gd, "gated_delta_chunked", lambda *a, **kw: calls.append(1) or chunked(*a, **kw))
    try:
        assert gd.install_fast_gated_delta() is True
        assert gd.install_fast_gated_delta() is False  # idempotent
        assert qwen3_5.gated_delta_update is gd.gated_delta_update_fast
        assert qwen3_next.gated_delta_update is gd.gated_delta_update_fast
        out = model(tokens)
        mx.eval(out)
    finally:
        assert gd.uninstall_fast_gated_delta() is True
    assert len(calls) == 3  # once per GatedDeltaNet layer
    # Four layers of norms, gating and MoE routing amplify the recurrence's ~1e-7 differences:
    # observed 2e-6 of the largest logit, allowed 1e-4.
    _assert_close(out, ref, rel=1e-4)
    assert qwen3_5.gated_delta_update is original and qwen3_next.gated_delta_update is original
    assert gd.uninstall_fast_gated_delta() is False

    # Context manager: installs for the block only, leaves an existing installation alone.
    with gd.fast_gated_delta() as changed:
        assert changed and qwen3_5.gated_delta_update is gd.gated_delta_update_fast
        with gd.fast_gated_delta() as changed_again:
            assert not changed_again
        assert qwen3_5.gated_delta_update is gd.gated_delta_update_fast
    assert qwen3_5.gated_delta_update is original


# --------------------------------------------------------------------------------------------
# gated_delta_cuda
# --------------------------------------------------------------------------------------------


def test_cuda_wrapper_checks_arguments():
    x = _inputs(1, 3, 1, 2, 48, 16)
    with pytest.raises(ValueError, match="multiple of 32"):
        gd.gated_delta_cuda(*_kernel_args(x))
    x = _inputs(1, 3, 1, 2, 32, 16)
    g4 = mx.broadcast_to(x["g"][..., None], (1, 3, 2, 32))
    with pytest.raises(NotImplementedError, match="scalar gates"):
        gd.gated_delta_cuda(x["q"], x["k"], x["v"], g4, x["beta"], x["state"])
    with pytest.raises(ValueError, match="state must be"):
        gd.gated_delta_cuda(x["q"], x["k"], x["v"], x["g"], x["beta"], x["state"][:, :1])
    if not CUDA:
        with pytest.raises(RuntimeError, match="CUDA"):
            gd.gated_delta_cuda(*_kernel_args(x))
    header, body = cuda_mod._cuda_kernel_source(has_mask=True)
    assert "q_shape[1]" in body and "__shfl_xor_sync" in header and "mask_b[" in body
    assert "mask_b" not in cuda_mod._cuda_kernel_source(has_mask=False)[1]


_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16"}


def _mlx_style_kernel(name: str, has_mask: bool, dtype: mx.Dtype, dims: dict[str, int]) -> str:
    """The kernel as MLX's CUDA backend assembles it (mlx/backend/cuda/custom_kernel.cpp:
    build_kernel): signature from the input/output names and dtypes, ``<name>_shape`` for inputs
    whose name_shape the source mentions, template args as ``using`` / ``constexpr int``, then the
    body, all inside ``namespace mlx::core::cu``. Our header goes before it."""
    header, body = cuda_mod._cuda_kernel_source(has_mask)
    t = _TYPES[dtype]
    inputs = [("q", t), ("k", t), ("v", t), ("g", "float"), ("beta", "float"), ("state_in", "float")]
    if has_mask:
        inputs.append(("mask", "bool"))
    params = []
    for n, ty in inputs:
        params.append(f"    const {ty}* {n}")
        if f"{n}_shape" in body:
            params.append(f"    const __grid_constant__ Shape {n}_shape")
    params += [f"    {t}* y", "    float* state_out"]
    consts = "".join(f"  using {n} = {t};\n" for n in ("QT", "KT", "VT"))
    consts += "".join(f"  constexpr int {n} = {v};\n" for n, v in dims.items())
    return (
        "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n" + consts + "\n" + body + "\n}\n\n}\n"
    )


_MLX_DEFAULT_HEADER = """
#include "mlx/backend/cuda/device/utils.cuh"

#include <cooperative_groups.h>

#define inf cuda::std::numeric_limits<float>::infinity()
"""

# What the kernel needs from MLX's device/utils.cuh (which is not in the CPU wheel).
_UTILS_STUB = """#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
"""


# A CPU emulation of just what the kernel uses: 32 threads per warp, __shfl_xor_sync through a
# shared buffer and a barrier, blocks and warps run one after another. (pthreads rather than
# <thread> / <barrier>: those headers alone take g++ a second to parse.)
_EMULATION_PRELUDE = r"""
#include <pthread.h>
#include <stdint.h>
#define __global__
#define __device__
#define __forceinline__ inline
#define __grid_constant__
struct dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim;
struct __half { float v; };
struct __nv_bfloat16 { float v; };
inline float __half2float(__half x) { return x.v; }
inline float __bfloat162float(__nv_bfloat16 x) { return x.v; }
inline __half __float2half_rn(float x) { return {x}; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return {x}; }
struct Warp { pthread_barrier_t bar; float buf[32]; };
static thread_local Warp* this_warp;
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  this_warp->buf[threadIdx.x] = v;
  pthread_barrier_wait(&this_warp->bar);
  float r = this_warp->buf[threadIdx.x ^ offset];
  pthread_barrier_wait(&this_warp->bar);
  return r;
}
namespace cooperative_groups {}
namespace mlx::core::cu {
struct Shape {
  int32_t v[10];
  int32_t operator[](int i) const { return v[i]; }
};
}
struct LaneArgs {
  const float *q, *k, *v, *g, *beta, *state_in;
  const bool* mask;
  float *y, *state_out;
  mlx::core::cu::Shape shape;
  dim3 tid, bid;
  Warp* warp;
};
"""


def _emulation_launcher(name: str, has_mask: bool, Hv: int, Dv: int, rows: int) -> str:
    args = "a.q, a.shape, a.k, a.v, a.g, a.beta, a.state_in, " + ("a.mask, " if has_mask else "")
    return f"""
static void* lane_{name}(void* p) {{
  LaneArgs& a = *static_cast<LaneArgs*>(p);
  threadIdx = a.tid;
  blockIdx = a.bid;
  this_warp = a.warp;
  mlx::core::cu::{name}({args}a.y, a.state_out);
  return nullptr;
}}

extern "C" void run_{name}(const float* q, const float* k, const float* v, const float* g,
    const float* beta, const float* state_in, const bool* mask, float* y, float* state_out,
    int B, int T) {{
  blockDim = dim3{{32, {rows}, 1}};
  for (unsigned z = 0; z < unsigned(B * {Hv}); ++z)
    for (unsigned by = 0; by < unsigned(({Dv} + {rows} - 1) / {rows}); ++by)
      for (unsigned wy = 0; wy < {rows}; ++wy) {{
        Warp warp;
        pthread_barrier_init(&warp.bar, nullptr, 32);
        LaneArgs args[32];
        pthread_t threads[32];
        for (unsigned lane = 0; lane < 32; ++lane) {{
          args[lane] = LaneArgs{{q, k, v, g, beta, state_in, mask, y, state_out, {{}},
                                 dim3{{lane, wy, 0}}, dim3{{0, by, z}}, &warp}};
          args[lane].shape.v[0] = B;
          args[lane].shape.v[1] = T;
          pthread_create(&threads[lane], nullptr, lane_{name}, &args[lane]);
        }}
        for (unsigned lane = 0; lane < 32; ++lane) pthread_join(threads[lane], nullptr);
        pthread_barrier_destroy(&warp.bar);
      }}
}}
"""


# Shapes of the emulated run.
_EMU = {"B": 2, "T": 9, "Hk": 1, "Hv": 2, "Dk": 64, "Dv": 6}


@pytest.fixture(scope="module")
def cuda_source_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.Popen, Path]]:
    """Starts both compilers at once (they take a few seconds each): ``"nvcc"``, every variant
    (3 dtypes x mask) of the kernel as MLX would assemble it, for sm_90 (H100/H200); ``"g++"``, a
    CPU build of the float32 variants with warps emulated by threads. Values: (process, output)."""
    root = tmp_path_factory.mktemp("cuda_source")
    jobs: dict[str, tuple[subprocess.Popen, Path]] = {}
    if shutil.which("nvcc"):
        stub = root / "mlx/backend/cuda/device/utils.cuh"
        stub.parent.mkdir(parents=True)
        stub.write_text(_UTILS_STUB)
        source = _MLX_DEFAULT_HEADER + cuda_mod._cuda_kernel_source(False)[0]
        dims = {"Dk": 128, "Dv": 128, "Hk": 16, "Hv": 64}
        variants = [(mx.float32, False), (mx.float32, True), (mx.float16, False), (mx.bfloat16, True)]
        for i, (dtype, has_mask) in enumerate(variants):
            source += _mlx_style_kernel(f"gdn{i}", has_mask, dtype, dims)
        (root / "k.cu").write_text(source)
        cmd = ["nvcc", "-I", str(root), "-arch=sm_90", "-ptx", "k.cu", "-o", "k.ptx"]
        jobs["nvcc"] = (_start(cmd, root), root / "k.ptx")
    if shutil.which("g++"):
        dims = {n: _EMU[n] for n in ("Dk", "Dv", "Hk", "Hv")}
        source = _EMULATION_PRELUDE + cuda_mod._cuda_kernel_source(False)[0]
        for name, has_mask in (("plain", False), ("masked", True)):
            source += _mlx_style_kernel(name, has_mask, mx.float32, dims)
            rows = cuda_mod._CUDA_ROWS_PER_BLOCK
            source += _emulation_launcher(name, has_mask, _EMU["Hv"], _EMU["Dv"], rows)
        (root / "emu.cpp").write_text(source)
        cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
               "emu.cpp", "-o", "emu.so"]
        jobs["g++"] = (_start(cmd, root), root / "emu.so")
    yield jobs
    for proc, _ in jobs.values():
        proc.kill()
        proc.wait()


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit) to compile")
def test_cuda_kernel_source_compiles(cuda_source_builds):
    """Every variant (3 dtypes x mask) compiles for sm_90, with no warnings either."""
    proc, ptx = cuda_source_builds["nvcc"]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert err.strip() == "", err
    assert ptx.stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to emulate the kernel on CPU")
def test_cuda_kernel_source_emulated_on_cpu(cuda_source_builds):
    """The kernel's exact source, compiled for the CPU with warps emulated by threads, computes
    what gated_delta_ops does (float32; masked and unmasked; Dv not a multiple of the block's
    rows, so some warps retire early)."""
    proc, lib_path = cuda_source_builds["g++"]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lib = ctypes.CDLL(str(lib_path))
    B, T, Hk, Hv, Dk, Dv = (_EMU[n] for n in ("B", "T", "Hk", "Hv", "Dk", "Dv"))

    x = _inputs(B, T, Hk, Hv, Dk, Dv, seed=13)
    mask = mx.array([[True] * 4 + [False] * 2 + [True] * 3, [False] * 3 + [True] * 6])
    for name, m in (("plain", None), ("masked", mask)):
        arrays = [np.ascontiguousarray(np.array(a, dtype=np.float32)) for a in _kernel_args(x)]
        mask_np = np.ascontiguousarray(np.array(m if m is not None else mx.ones((B, T)), dtype=np.bool_))
        y = np.full((B, T, Hv, Dv), np.nan, dtype=np.float32)
        s = np.full((B, Hv, Dv, Dk), np.nan, dtype=np.float32)
        ptrs = [a.ctypes.data_as(ctypes.c_void_p) for a in (*arrays, mask_np, y, s)]
        getattr(lib, f"run_{name}")(*ptrs, ctypes.c_int(B), ctypes.c_int(T))
        y_ref, s_ref = mlx_gd.gated_delta_ops(*_kernel_args(x), m)
        _assert_close(mx.array(s), s_ref)
        if m is None:
            _assert_close(mx.array(y), y_ref)
        else:
            keep = m[..., None, None]
            _assert_close(mx.array(y), y_ref, where=keep)
            assert float(np.abs(np.where(np.array(keep), 0.0, y)).max()) == 0.0


@pytest.mark.skipif(
    not CUDA, reason="needs MLX's CUDA backend (a GPU), which CI lacks; run on the H200: bench/RESULTS.md"
)
@pytest.mark.parametrize(
    "B, T, Hk, Hv, Dk, Dv, dtype, masked",
    [
        (1, 1, 2, 2, 32, 16, mx.float32, False),
        (2, 77, 2, 4, 64, 24, mx.float32, True),
        (1, 300, 16, 64, 128, 128, mx.bfloat16, False),
        (2, 50, 1, 2, 128, 32, mx.float16, True),
    ],
)
def test_cuda_kernel_matches_ops(B, T, Hk, Hv, Dk, Dv, dtype, masked):
    x = _inputs(B, T, Hk, Hv, Dk, Dv, dtype=dtype, seed=T)
    mask = (mx.random.uniform(shape=(B, T)) > 0.25) if masked else None
    y_ref, s_ref = mlx_gd.gated_delta_ops(*_kernel_args(x), mask)
    with mx.stream(mx.gpu):
        y, s = gd.gated_delta_cuda(*_kernel_args(x), mask)
    assert y.dtype == dtype and s.dtype == mx.float32
    rel = {mx.float32: 1e-5, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}[dtype]
    _assert_close(s, s_ref)
    _assert_close(y, y_ref, rel=rel, where=None if mask is None else mask[..., None, None])
    if mask is not None:
        assert float(mx.abs(mx.where(mask[..., None, None], 0.0, y.astype(mx.float32))).max()) == 0.0

