"""The gated delta rule as a CUDA kernel (``mx.fast.cuda_kernel``): one warp per value row, the
loop over tokens inside the kernel. mlx-lm's CUDA path is a loop of T one-token steps. The
contract: :mod:`.contract`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import cache

import mlx.core as mx

from .contract import check_shapes

# Helpers placed before the kernel (after MLX's default header, which includes cuda_fp16.h and
# cuda_bf16.h). Conversions go through the documented intrinsics rather than relying on the
# half types' conversion operators.
_CUDA_HEADER = r"""
namespace flashmoe_gdn {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Butterfly sum over the 32 lanes of a warp; every lane ends with the total.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

}  // namespace flashmoe_gdn
"""


def _cuda_load(suffix: str, t: str, has_mask: bool) -> str:
    """Kernel source that loads token ``t``'s operands into the ``*_<suffix>`` registers."""
    on = f"mask_b[{t}]" if has_mask else "true"
    return f"""
      on_{suffix} = {on};
      g_{suffix} = g_h[({t}) * Hv];
      beta_{suffix} = beta_h[({t}) * Hv];
      v_{suffix} = flashmoe_gdn::to_f32(v_row[({t}) * Hv * Dv]);
#pragma unroll
      for (int i = 0; i < NPL; ++i) {{
        k_{suffix}[i] = flashmoe_gdn::to_f32(k_lane[({t}) * Hk * Dk + 32 * i]);
        q_{suffix}[i] = flashmoe_gdn::to_f32(q_lane[({t}) * Hk * Dk + 32 * i]);
      }}"""


def _cuda_kernel_source(has_mask: bool) -> tuple[str, str]:
    """``(header, body)`` of the CUDA kernel, as given to ``mx.fast.cuda_kernel``.

    Inputs ``q, k, v, g, beta, state_in[, mask]``, outputs ``y, state_out``; template args
    ``QT, KT, VT`` (input dtypes: they also key MLX's kernel cache, whose name ignores input
    dtypes), ``Dk, Dv, Hk, Hv``. T is read from ``q_shape[1]`` so one compiled kernel serves
    every sequence length. Launch: grid ``(32, Dv, B * Hv)``, block ``(32, R, 1)``: one warp
    per (batch, value head, value row); lane l keeps state columns ``l, l + 32, ...`` in
    registers (so the warp's loads of q, k and the state are coalesced).
    """
    mask_setup = "const bool* mask_b = mask + b * T;" if has_mask else ""
    body = f"""
    constexpr int NPL = Dk / 32;  // state elements per lane
    const int lane = threadIdx.x;
    const int dv = blockIdx.y * blockDim.y + threadIdx.y;
    // A warp shares threadIdx.y, so this retires whole warps and never splits a shuffle.
    if (dv >= Dv) {{
      return;
    }}
    const int n = blockIdx.z;  // b * Hv + hv
    const int64_t b = n / Hv;
    const int hv = n % Hv;
    const int hk = hv / (Hv / Hk);
    const int64_t T = q_shape[1];

    const auto* q_lane = q + (b * T * Hk + hk) * Dk + lane;
    const auto* k_lane = k + (b * T * Hk + hk) * Dk + lane;
    const auto* v_row = v + (b * T * Hv + hv) * Dv + dv;
    const float* g_h = g + b * T * Hv + hv;
    const float* beta_h = beta + b * T * Hv + hv;
    auto* y_row = y + (b * T * Hv + hv) * Dv + dv;
    {mask_setup}

    const int64_t state_row = (int64_t(n) * Dv + dv) * Dk + lane;
    float s[NPL];
#pragma unroll
    for (int i = 0; i < NPL; ++i) {{
      s[i] = state_in[state_row + 32 * i];
    }}

    // Token t's operands sit in the *_cur registers; token t + 1's are loaded while token t
    // computes, so the loads overlap the two warp reductions.
    float k_cur[NPL], q_cur[NPL];
    float v_cur = 0.0f, g_cur = 1.0f, beta_cur = 0.0f;
    bool on_cur = false;
    if (T > 0) {{{_cuda_load("cur", "0", has_mask)}
    }}
    for (int64_t t = 0; t < T; ++t) {{
      float k_nxt[NPL] = {{}}, q_nxt[NPL] = {{}};
      float v_nxt = 0.0f, g_nxt = 1.0f, beta_nxt = 0.0f;
      bool on_nxt = false;
      if (t + 1 < T) {{{_cuda_load("nxt", "t + 1", has_mask)}
      }}

      float out = 0.0f;
      if (on_cur) {{  // uniform across the warp: the mask depends on (b, t) only
        float kv = 0.0f;
#pragma unroll
        for (int i = 0; i < NPL; ++i) {{
          s[i] *= g_cur;
          kv += s[i] * k_cur[i];
        }}
        kv = flashmoe_gdn::warp_sum(kv);
        const float delta = (v_cur - kv) * beta_cur;
#pragma unroll
        for (int i = 0; i < NPL; ++i) {{
          s[i] += k_cur[i] * delta;
          out += s[i] * q_cur[i];
        }}
        out = flashmoe_gdn::warp_sum(out);
      }}
      if (lane == 0) {{
        y_row[t * Hv * Dv] = flashmoe_gdn::from_f32<QT>(out);  // 0 for a masked token
      }}

#pragma unroll
      for (int i = 0; i < NPL; ++i) {{
        k_cur[i] = k_nxt[i];
        q_cur[i] = q_nxt[i];
      }}
      v_cur = v_nxt;
      g_cur = g_nxt;
      beta_cur = beta_nxt;
      on_cur = on_nxt;
    }}

#pragma unroll
    for (int i = 0; i < NPL; ++i) {{
      state_out[state_row + 32 * i] = s[i];
    }}
"""
    return _CUDA_HEADER, body


_CUDA_INPUTS = ("q", "k", "v", "g", "beta", "state_in")
_CUDA_OUTPUTS = ("y", "state_out")
# Value rows (warps) per block.
_CUDA_ROWS_PER_BLOCK = 4


@cache
def _cuda_kernel(has_mask: bool) -> Callable:
    header, body = _cuda_kernel_source(has_mask)
    # MLX caches compiled kernels by name (also on disk, as PTX), so the name carries a digest
    # of the source: an edited kernel can never pick up a stale build.
    digest = hashlib.sha256((header + body).encode()).hexdigest()[:12]
    name = f"flashmoe_gated_delta{'_mask' if has_mask else ''}_{digest}"
    inputs = list(_CUDA_INPUTS) + (["mask"] if has_mask else [])
    return mx.fast.cuda_kernel(
        name=name, input_names=inputs, output_names=list(_CUDA_OUTPUTS), source=body, header=header
    )


def cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def gated_delta_cuda(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    mask: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Gated delta rule as a CUDA kernel (MLX's CUDA backend); the contract of the module.

    The CUDA analogue of mlx-lm's generic Metal kernel: one warp per (batch, value head, value
    row), each lane holding Dk / 32 state elements in float32 registers, two warp-shuffle dot
    products per token, the loop over T inside the kernel. Needs Dk % 32 == 0 and scalar gates
    (ValueError / NotImplementedError otherwise, checked first) and a CUDA device
    (RuntimeError). g, beta and the state are passed as float32; q, k, v in their own dtypes.
    Masked tokens keep the state and get y = 0.
    """
    B, T, Hk, Dk, Hv, Dv = check_shapes(q, k, v, g, beta, state, mask)
    if g.ndim != 3:
        raise NotImplementedError(
            "gated_delta_cuda supports scalar gates g [B, T, Hv] only; got g of shape "
            f"{g.shape} (use mlx_lm.models.gated_delta.gated_delta_ops)"
        )
    if Dk % 32 != 0:
        raise ValueError(
            f"gated_delta_cuda needs the key head dim Dk to be a multiple of 32 (a warp's 32 "
            f"lanes split each state row evenly); got Dk={Dk}"
        )
    if B * Hv > 65535:
        raise ValueError(f"gated_delta_cuda puts B * Hv = {B * Hv} blocks on grid z; CUDA allows 65535")
    if not cuda_available():
        raise RuntimeError(
            "gated_delta_cuda needs MLX's CUDA backend (a CUDA build of mlx and an NVIDIA GPU); "
            "mx.cuda.is_available() is False here"
        )
    f32 = mx.float32
    state = mx.zeros((B, Hv, Dv, Dk), dtype=f32) if state is None else state.astype(f32)
    inputs = [q, k, v, g.astype(f32), beta.astype(f32), state]
    if mask is not None:
        inputs.append(mask.astype(mx.bool_))
    y, state_out = _cuda_kernel(mask is not None)(
        inputs=inputs,
        template=[
            ("QT", q.dtype),
            ("KT", k.dtype),
            ("VT", v.dtype),
            ("Dk", Dk),
            ("Dv", Dv),
            ("Hk", Hk),
            ("Hv", Hv),
        ],
        grid=(32, Dv, B * Hv),
        threadgroup=(32, _CUDA_ROWS_PER_BLOCK, 1),
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        output_dtypes=[q.dtype, f32],
    )
    return y, state_out

