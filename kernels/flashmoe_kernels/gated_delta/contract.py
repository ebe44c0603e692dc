"""The contract shared by the GatedDeltaNet recurrences of this subpackage.

The recurrence, per batch row and value head (state ``S`` is ``[Dv, Dk]``; value head ``h`` reads
key head ``h // (Hv // Hk)``)::

    S_t = g_t S_{t-1} + beta_t (v_t - g_t S_{t-1} k_t) k_t^T        y_t = S_t q_t

It is the contract of mlx-lm's ``gated_delta_kernel(q, k, v, g, beta, state, mask=None) -> (y,
state)``: q, k ``[B, T, Hk, Dk]``; v ``[B, T, Hv, Dv]``; g (the decay, already exponentiated, in
(0, 1]) and beta ``[B, T, Hv]``; state ``[B, Hv, Dv, Dk]`` float32; mask ``[B, T]`` bool or None;
y ``[B, T, Hv, Dv]`` in q's dtype, state float32. A masked token (mask False) leaves the state
untouched (no decay, no update) and gets y = 0, as in mlx-lm's Metal kernel. (``gated_delta_ops``
keeps the state too, but returns the read-out of the update it then discards; callers ignore y
at padded positions.)

:func:`make_inputs` builds random inputs that keep the contract and look like a model's, for
tests and benchmarks.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.gated_delta import compute_g


def check_shapes(
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



def make_inputs(B: int, T: int, Hk: int, Hv: int, Dk: int, Dv: int, seed: int = 0,
                dtype: mx.Dtype = mx.float32) -> tuple[mx.array, ...]:
    """Random ``(q, k, v, g, beta, state)``, evaluated, distributed as a model passes them: k of
    unit norm and q of norm ``Dk**-0.5`` (mlx-lm's ``normalize_qk``), g from mlx-lm's
    ``compute_g``, beta a sigmoid, a small random state; q, k, v in ``dtype``, the gates and the
    state float32."""
    mx.random.seed(seed)
    q = mx.random.normal((B, T, Hk, Dk))
    k = mx.random.normal((B, T, Hk, Dk))
    q = (q / mx.linalg.norm(q, axis=-1, keepdims=True) * Dk**-0.5).astype(dtype)
    k = (k / mx.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = mx.random.normal((B, T, Hv, Dv)).astype(dtype)
    a = mx.random.normal((B, T, Hv))
    A_log = mx.log(mx.random.uniform(1.0, 16.0, (Hv,)))
    g = compute_g(A_log, a, mx.ones((Hv,)))
    beta = mx.sigmoid(mx.random.normal((B, T, Hv)))
    state = 0.1 * mx.random.normal((B, Hv, Dv, Dk))
    mx.eval(q, k, v, g, beta, state)
    return q, k, v, g, beta, state
