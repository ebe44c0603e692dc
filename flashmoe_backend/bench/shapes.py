"""Qwen3.5-397B-A17B's shapes, defined once for every benchmark, and a tiny stand-in.

``QWEN35`` is the text model as the mlx-community 4-bit checkpoints hold it: hidden size, routed
experts and experts per token (``k``), expert and shared-expert widths, vocabulary, full
attention heads, GatedDeltaNet (linear attention) key/value heads and their widths, and the
experts' quantization (4 bits, groups of 64: one expert record is 7,077,888 bytes). ``TINY`` is
the same architecture small enough to run on a CPU in seconds (tests, ``--tiny``). How many layers
a benchmark builds and how many tokens it times are its own settings, not shapes.
"""

from __future__ import annotations

QWEN35 = dict(
    hidden=4096,
    experts=512,
    k=10,
    intermediate=1024,
    shared=1024,
    vocab=248_320,
    heads=32,
    kv_heads=2,
    head_dim=256,
    lin_k_heads=16,
    lin_v_heads=64,
    lin_k_dim=128,
    lin_v_dim=128,
    bits=4,
    group_size=64,
)

TINY = dict(
    hidden=128,
    experts=32,
    k=4,
    intermediate=64,
    shared=64,
    vocab=512,
    heads=4,
    kv_heads=2,
    head_dim=32,
    lin_k_heads=2,
    lin_v_heads=4,
    lin_k_dim=32,
    lin_v_dim=32,
    bits=4,
    group_size=64,
)
