"""GatedDeltaNet recurrence off Apple GPUs: a chunked (matmul) form for CPU and a CUDA kernel.

Qwen3.5 and Qwen3-Next run most of their layers as GatedDeltaNet linear attention. mlx-lm
computes its recurrence with a Metal kernel, but only on Apple GPUs: on CUDA and on CPU,
``mlx_lm.models.gated_delta.gated_delta_update`` falls back to ``gated_delta_ops``, a Python loop
of T compiled one-token steps, i.e. 2,048 dependent steps per layer for a 2,048-token prompt.

The recurrence, per batch row and value head (state ``S`` is ``[Dv, Dk]``; value head ``h`` reads
key head ``h // (Hv // Hk)``)::

    S_t = g_t S_{t-1} + beta_t (v_t - g_t S_{t-1} k_t) k_t^T        y_t = S_t q_t

Everything here keeps the contract of mlx-lm's ``gated_delta_kernel(q, k, v, g, beta, state,
mask=None) -> (y, state)``: q, k ``[B, T, Hk, Dk]``; v ``[B, T, Hv, Dv]``; g (the decay, already
exponentiated, in (0, 1]) and beta ``[B, T, Hv]``; state ``[B, Hv, Dv, Dk]`` float32; mask
``[B, T]`` bool or None; y ``[B, T, Hv, Dv]`` in q's dtype, state float32. A masked token (mask
False) leaves the state untouched (no decay, no update) and gets y = 0, as in mlx-lm's Metal
kernel. (``gated_delta_ops`` keeps the state too, but returns the read-out of the update it then
discards; callers ignore y at padded positions.)

* :func:`gated_delta_chunked`: plain MLX ops, the chunked "WY" form of the delta rule: inside a
  chunk of C tokens everything is matmuls, and only T / C steps are sequential.
* :func:`gated_delta_cuda`: a CUDA kernel (``mx.fast.cuda_kernel``), one warp per value row.
* :func:`gated_delta_update_fast`: drop-in for mlx-lm's ``gated_delta_update`` (same gates, same
  arguments) that dispatches, see :func:`select_gated_delta_path`:

  - ``use_kernel=False`` (training): mlx-lm's ``gated_delta_ops``, as mlx-lm does;
  - Metal GPU, Dk a multiple of 32: mlx-lm's own ``gated_delta_kernel``;
  - CUDA GPU, scalar gates, Dk a multiple of 32: :func:`gated_delta_cuda`;
  - otherwise (CPU): :func:`gated_delta_chunked` for T > 1 with scalar gates, else
    ``gated_delta_ops`` (one decode step is already a single compiled call).

* :func:`install_fast_gated_delta` / :func:`uninstall_fast_gated_delta` /
  :func:`fast_gated_delta` route mlx-lm's ``qwen3_5`` (hence ``qwen3_5_moe``) and ``qwen3_next``
  models through :func:`gated_delta_update_fast`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from collections.abc import Callable, Iterable, Iterator
from functools import cache

import mlx.core as mx
from mlx_lm.models import gated_delta as _mlx_gd

__all__ = [
    "fast_gated_delta",
    "gated_delta_chunked",
    "gated_delta_cuda",
    "gated_delta_update_fast",
    "install_fast_gated_delta",
    "select_gated_delta_path",
    "uninstall_fast_gated_delta",
]

#: Modules whose ``gated_delta_update`` name :func:`install_fast_gated_delta` replaces
#: (``qwen3_5_moe`` builds its layers from ``qwen3_5``).
PATCHED_MODULES: tuple[str, ...] = ("mlx_lm.models.qwen3_5", "mlx_lm.models.qwen3_next")

#: Chunk size :func:`gated_delta_update_fast` uses on CPU. The scan's sequential matmuls cost
#: 3 Dk Dv per token whatever the chunk; the in-chunk ones grow with it, so on a CPU a smaller
#: chunk than the GPU-friendly 64 wins (Qwen3.5-397B heads, T=2048, 2-core x86, MLX's bundled
#: BLAS: 8.4 s at 32 against 10.3 s at 64).
CPU_CHUNK = 32

# log(g) is clamped here so that a gate that underflowed to 0 gives a finite log. exp(-200) is
# already 0 in float32 (the smallest subnormal is exp(-103.3)), so the clamp changes no result.
_LOG_G_FLOOR = -200.0
# Decay factors below exp(-69) ~ 1e-30 are flushed to 0: far below float32 resolution of any
# term they multiply, and it keeps subnormal numbers (slow in x86 SIMD arithmetic) out of the
# matmuls.
_LOG_TINY = -69.0
# Leaf size of the all-matmul triangular inverse (see _unit_lower_inverse_blocked).
_LEAF = 8


def _check_shapes(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None,
    mask: mx.array | None,
) -> tuple[int, int, int, int, int, int]:
    """Validate the kernel contract's shapes; return ``(B, T, Hk, Dk, Hv, Dv)``."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, Hk, Dk]; got {q.shape} and {k.shape}")
    B, T, Hk, Dk = q.shape
    if v.ndim != 4 or tuple(v.shape[:2]) != (B, T):
        raise ValueError(f"v must be [B, T, Hv, Dv] with B={B}, T={T}; got {v.shape}")
    Hv, Dv = v.shape[2:]
    if Hv % Hk != 0:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    if g.ndim not in (3, 4) or tuple(g.shape[:3]) != (B, T, Hv) or (g.ndim == 4 and g.shape[3] != Dk):
        raise ValueError(f"g must be [B, T, Hv] or [B, T, Hv, Dk]; got {g.shape}")
    if tuple(beta.shape) != (B, T, Hv):
        raise ValueError(f"beta must be [B, T, Hv] = {(B, T, Hv)}; got {beta.shape}")
    if state is not None and tuple(state.shape) != (B, Hv, Dv, Dk):
        raise ValueError(f"state must be [B, Hv, Dv, Dk] = {(B, Hv, Dv, Dk)}; got {state.shape}")
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must be [B, T] = {(B, T)}; got {mask.shape}")
    return B, T, Hk, Dk, Hv, Dv


# --------------------------------------------------------------------------------------------
# Chunked form (plain MLX ops)
# --------------------------------------------------------------------------------------------


def _unit_lower_inverse_blocked(a: mx.array) -> mx.array:
    """``(I + a)^-1`` for strictly lower-triangular ``a [..., n, n]``, with matmuls only.

    Works on any device (``mx.linalg.tri_inv`` is CPU-only). Leaf blocks of 8 are inverted
    exactly by the finite Neumann product ``(I - a)(I + a^2)(I + a^4)`` (``a^8 = 0``); with 8 rows
    the powers stay small, so it does not cancel badly even for entries of magnitude 1. The
    blocks are then merged pairwise, ``[[X11, 0], [L21, X22]]^-1 = [[X11, 0],
    [-X22 L21 X11, X22]]``, the blocked inversion LAPACK uses too.
    """
    n = a.shape[-1]
    lead = list(a.shape[:-2])
    size = _LEAF
    while size < n:
        size *= 2
    if size != n:
        # Extending with an identity block leaves the leading n x n block of the inverse as is.
        a = mx.pad(a, [(0, 0)] * len(lead) + [(0, size - n), (0, size - n)])

    def diag_blocks(x: mx.array, s: int, offset: int) -> mx.array:
        """Blocks (i + offset, i) of size s of x, as [..., m, s, s]."""
        m = size // s
        tiles = x.reshape(*lead, m, s, m, s)
        return mx.moveaxis(mx.diagonal(tiles, offset=offset, axis1=-4, axis2=-2), -1, -3)

    d = diag_blocks(a, _LEAF, 0)
    x = mx.eye(_LEAF, dtype=a.dtype) - d
    power, span = d, 2
    while span < _LEAF:
        power = power @ power
        x = x + x @ power
        span *= 2

    s = _LEAF
    while s < size:
        x11, x22 = x[..., 0::2, :, :], x[..., 1::2, :, :]
        a21 = diag_blocks(a, s, -1)[..., 0::2, :, :]
        x21 = -(x22 @ (a21 @ x11))
        top = mx.concatenate([x11, mx.zeros_like(x11)], axis=-1)
        bottom = mx.concatenate([x21, x22], axis=-1)
        x = mx.concatenate([top, bottom], axis=-2)
        s *= 2
    return x[..., 0, :n, :n]


def _unit_lower_inverse(a: mx.array, *, lapack: bool | None = None) -> mx.array:
    """``(I + a)^-1`` for strictly lower-triangular ``a``.

    On CPU, LAPACK's triangular inverse (``mx.linalg.tri_inv``, a backward-stable blocked
    substitution) is the fastest here; elsewhere the all-matmul blocked inverse. ``lapack``
    forces one or the other (tests).
    """
    if lapack is None:
        lapack = mx.default_device() == mx.cpu
    if lapack:
        n = a.shape[-1]
        return mx.linalg.tri_inv(a + mx.eye(n, dtype=a.dtype), upper=False, stream=mx.cpu)
    return _unit_lower_inverse_blocked(a)


def _exp_flush(x: mx.array) -> mx.array:
    return mx.where(x > _LOG_TINY, mx.exp(x), 0.0)


@mx.compile
def _chunk_step(
    st: mx.array, wp: mx.array, u0: mx.array, y0: mx.array, k_end: mx.array, g_end: mx.array
) -> tuple[mx.array, mx.array]:
    """One sequential step of the chunked scan: carry the state across a chunk of C tokens.

    The state is carried transposed, ``st = S^T [Dk, Dv]``, so neither matmul needs a transposed
    right operand (a reference BLAS runs those at half speed). ``wp`` stacks ``W`` over ``P``
    ([2C, Dk]) so that both read the incoming state in one matmul: the chunk's corrected values
    are ``U = u0 - W S^T``, its outputs ``Y = y0 + P S^T``, and the outgoing state is
    ``S^T = g_end S^T + k_end^T U``.
    """
    c = u0.shape[-2]
    x = wp @ st
    u = u0 - x[..., :c, :]
    y = y0 + x[..., c:, :]
    st = g_end[..., None, None] * st + k_end.swapaxes(-1, -2) @ u
    return st, y


def gated_delta_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    mask: mx.array | None = None,
    chunk: int = 64,
    *,
    lapack: bool | None = None,
) -> tuple[mx.array, mx.array]:
    """Gated delta rule over a whole sequence in chunked (WY / UT-transform) form.

    Same contract as mlx-lm's ``gated_delta_kernel`` (see the module docstring); masked tokens
    keep the state and get y = 0. Computes in float32; y is returned in q's dtype.

    Inside a chunk, with ``gamma_t`` the product of the gates from the chunk start to t and
    ``S0`` the state entering the chunk, the recurrence unrolls to::

        S_t = gamma_t S0 + sum_{j<=t} (gamma_t / gamma_j) u_j k_j^T
        u_t = beta_t (v_t - gamma_t S0 k_t - sum_{j<t} (gamma_t / gamma_j) (k_t . k_j) u_j)

    so the corrected values ``U`` solve the unit lower-triangular system ``(I + A) U =
    diag(beta) (V - diag(gamma) K S0^T)`` with ``A[t, j] = beta_t (gamma_t / gamma_j) k_t . k_j``
    for j < t. With ``Tinv = (I + A)^-1``, ``W = Tinv diag(beta gamma) K`` and
    ``U0 = Tinv diag(beta) V`` (both independent of S0, so computed for all chunks at once),
    ``U = U0 - W S0^T``, ``Y = diag(gamma) Q S0^T + (D * Q K^T) U`` with the causal decay mask
    ``D[t, j] = gamma_t / gamma_j``, and ``S_C = gamma_C S0 + U^T diag(gamma_C / gamma_j) K``.
    Only the last three are sequential, T / chunk steps of two matmuls each.

    Numerics: the decay ratios come from per-pair sums of log g (a cumsum down each column of a
    masked [C, C] matrix), never from the difference of two long cumulative sums, which loses
    precision when decays are strong; no ratio exceeds 1 and nothing overflows. The triangular
    inverse is LAPACK's on CPU, an all-matmul blocked inverse elsewhere (``lapack`` forces
    one). A tail shorter than ``chunk`` is padded with g = 1, beta = 0, k = q = v = 0, which
    leaves the state as is. Vectorized gates (g ``[B, T, Hv, Dk]``) raise NotImplementedError.
    """
    B, T, Hk, Dk, Hv, Dv = _check_shapes(q, k, v, g, beta, state, mask)
    if g.ndim == 4:
        raise NotImplementedError(
            "gated_delta_chunked supports scalar gates g [B, T, Hv] only; for per-channel gates "
            "[B, T, Hv, Dk] use mlx_lm.models.gated_delta.gated_delta_ops"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    f32 = mx.float32
    state = mx.zeros((B, Hv, Dv, Dk), dtype=f32) if state is None else state.astype(f32)
    if T == 0:
        return mx.zeros((B, 0, Hv, Dv), dtype=q.dtype), state

    r = Hv // Hk
    C = min(chunk, T)
    N = -(-T // C)
    pad = N * C - T

    log_g = mx.maximum(mx.log(g.astype(f32)), _LOG_G_FLOOR)
    bt = beta.astype(f32)
    if mask is not None:
        # A masked token must neither decay nor update the state: g = 1, beta = 0.
        keep = mask.astype(mx.bool_)[..., None]
        log_g = mx.where(keep, log_g, 0.0)
        bt = mx.where(keep, bt, 0.0)
    qf, kf, vf = q.astype(f32), k.astype(f32), v.astype(f32)
    if pad:

        def pad_time(x: mx.array) -> mx.array:
            return mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))

        qf, kf, vf, log_g, bt = (pad_time(x) for x in (qf, kf, vf, log_g, bt))

    # Chunk-major layouts (N first, so the scan's per-chunk slices are contiguous), with the
    # r value heads of a key head on their own axis: q/k broadcast over it instead of repeating.
    qc = qf.reshape(B, N, C, Hk, 1, Dk).transpose(1, 0, 3, 4, 2, 5)  # [N, B, Hk, 1, C, Dk]
    kc = kf.reshape(B, N, C, Hk, 1, Dk).transpose(1, 0, 3, 4, 2, 5)
    vc = vf.reshape(B, N, C, Hk, r, Dv).transpose(1, 0, 3, 4, 2, 5)  # [N, B, Hk, r, C, Dv]
    log_g = log_g.reshape(B, N, C, Hk, r).transpose(1, 0, 3, 4, 2)  # [N, B, Hk, r, C]
    bt = bt.reshape(B, N, C, Hk, r).transpose(1, 0, 3, 4, 2)

    idx = mx.arange(C)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    # seg[t, j] = sum_{j < i <= t} log g_i, so exp(seg) = gamma_t / gamma_j.
    seg = mx.cumsum(mx.where(strict, log_g[..., :, None], 0.0), axis=-2)
    decay = mx.where(causal & (seg > _LOG_TINY), mx.exp(seg), 0.0)  # [N, B, Hk, r, C, C]
    gamma = _exp_flush(mx.cumsum(log_g, axis=-1))  # [N, B, Hk, r, C]
    to_end = _exp_flush(seg[..., -1, :])  # gamma_C / gamma_j
    gamma_end = gamma[..., -1]  # [N, B, Hk, r]

    kt = mx.contiguous(kc.swapaxes(-1, -2))  # [.., Dk, C], so the two matmuls below need no transpose
    a = mx.where(strict, bt[..., :, None] * decay * (kc @ kt), 0.0)
    t_inv = _unit_lower_inverse(a, lapack=lapack)
    rhs = mx.concatenate(
        [
            mx.broadcast_to((bt * gamma)[..., None] * kc, (N, B, Hk, r, C, Dk)),
            bt[..., None] * vc,
        ],
        axis=-1,
    )
    wu = t_inv @ rhs
    w, u0 = wu[..., :Dk], wu[..., Dk:]
    qk_decay = (qc @ kt) * decay
    p = gamma[..., None] * qc - qk_decay @ w  # Y = P S0^T + qk_decay U0
    y0 = qk_decay @ u0
    wp = mx.concatenate([w, p], axis=-2)  # [N, B, Hk, r, 2C, Dk]
    k_end = to_end[..., None] * kc  # [N, B, Hk, r, C, Dk]

    st = mx.contiguous(state.reshape(B, Hk, r, Dv, Dk).swapaxes(-1, -2))
    ys = []
    for n in range(N):
        st, y_n = _chunk_step(st, wp[n], u0[n], y0[n], k_end[n], gamma_end[n])
        ys.append(y_n)
    y = mx.stack(ys).transpose(1, 0, 4, 2, 3, 5).reshape(B, N * C, Hv, Dv)
    if pad:
        y = y[:, :T]
    if mask is not None:
        y = mx.where(mask.astype(mx.bool_)[..., None, None], y, 0.0)
    return y.astype(q.dtype), st.swapaxes(-1, -2).reshape(B, Hv, Dv, Dk)


# --------------------------------------------------------------------------------------------
# CUDA kernel
# --------------------------------------------------------------------------------------------

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


def _cuda_available() -> bool:
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
    B, T, Hk, Dk, Hv, Dv = _check_shapes(q, k, v, g, beta, state, mask)
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
    if not _cuda_available():
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


# --------------------------------------------------------------------------------------------
# Dispatch and installation into mlx-lm
# --------------------------------------------------------------------------------------------


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
    if on_gpu and _cuda_available() and dk_ok and g_ndim == 3:
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
def fast_gated_delta(modules: Iterable[str] = PATCHED_MODULES) -> Iterator[bool]:
    """Context manager: install :func:`gated_delta_update_fast` for the block, then restore what
    this installation changed (an installation already in place is left in place). Yields
    whether anything changed."""
    changed = _install(modules)
    try:
        yield bool(changed)
    finally:
        _restore(changed)
