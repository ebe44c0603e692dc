"""The gated delta rule in chunked ("WY") form, with plain MLX ops: inside a chunk of C tokens
everything is matmuls, and only T / C steps are sequential. mlx-lm's CPU path is a loop of T
one-token steps. The contract: :mod:`.contract`.
"""

from __future__ import annotations

import mlx.core as mx

from .contract import check_shapes

# log(g) is clamped here so that a gate that underflowed to 0 gives a finite log. exp(-200) is
# already 0 in float32 (the smallest subnormal is exp(-103.3)), so the clamp changes no result.
_LOG_G_FLOOR = -200.0
# Decay factors below exp(-69) ~ 1e-30 are flushed to 0: far below float32 resolution of any
# term they multiply, and it keeps subnormal numbers (slow in x86 SIMD arithmetic) out of the
# matmuls.
_LOG_TINY = -69.0
# Leaf size of the all-matmul triangular inverse (see _unit_lower_inverse_blocked).
_LEAF = 8



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
    B, T, Hk, Dk, Hv, Dv = check_shapes(q, k, v, g, beta, state, mask)
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


