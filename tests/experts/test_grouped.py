"""The expert-by-expert path of a prompt chunk (grouped_experts.py) against mlx-lm's SwitchGLU."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from flashmoe_backend.experts import grouped as grouped_experts
from flashmoe_backend.experts.grouped import ExpertPath, grouped_switch, use_grouped


def _routes(tokens: int, experts: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])[None]


@pytest.mark.parametrize("kind", ["glu", "glu-4bit", "mlp", "mlp-4bit"])
def test_grouped_switch_matches_gather(kind):
    mx.random.seed(0)
    module = SwitchGLU(64, 32, 8, bias=False) if kind.startswith("glu") else SwitchMLP(64, 32, 8, bias=True)
    if kind.endswith("4bit"):
        nn.quantize(module, group_size=32, bits=4)
    x = mx.random.normal((1, 40, 64))
    slots = _routes(40, 8, 3)
    want = module(x, mx.array(slots))
    got = grouped_switch(module, x, slots)
    assert got.shape == want.shape == (1, 40, 3, 64)
    # Same matmuls on the same rows, only batched differently.
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    # Each expert's own tensors, in arrival order (not sorted), handed over in chunks: the same.
    params = tree_flatten(module.parameters())
    arriving = [(e, {name: p[e] for name, p in params}) for e in (5, 0, 7, 2, 6, 1, 4, 3)]
    got = grouped_switch(module, x, slots, iter(arriving), eval_every=3)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_grouped_switch_names_the_experts_it_was_not_given():
    module = SwitchGLU(64, 32, 8)
    slots = _routes(40, 8, 3)
    params = tree_flatten(module.parameters())
    some = [(e, {name: p[e] for name, p in params}) for e in range(6)]
    with pytest.raises(ValueError, match=r"experts \[6, 7\] are routed to but were not given"):
        grouped_switch(module, mx.zeros((1, 40, 64)), slots, some)


def test_use_grouped_only_on_cuda_and_for_many_rows():
    module = SwitchGLU(64, 32, 8)
    many, few = _routes(40, 8, 3), _routes(2, 8, 3)
    assert not use_grouped(module, many)  # this machine's CPU: gather_qmm
    anywhere = ExpertPath(cuda_only=False)  # the rule as on CUDA
    assert use_grouped(module, many, anywhere)
    assert not use_grouped(module, few, anywhere)  # decode: a row or two per expert
    assert not use_grouped(nn.Linear(4, 4), many, anywhere)


def test_engine_logits_unchanged_with_the_grouped_path(monkeypatch):
    from flashmoe_backend import FlashMoE
    from flashmoe_backend.store.source import default_store

    engine = FlashMoE.load(default_store(), cache_gb=1.0)  # 4-bit experts, Qwen3.5-MoE
    ids = mx.array([[(5 * i + 1) % 2000 for i in range(48)]])
    want = engine.model(ids)
    mx.eval(want)
    calls = []
    engine.streamer.path = ExpertPath(cuda_only=False)  # CUDA's rule, on this CPU
    real = grouped_experts.grouped_switch
    monkeypatch.setattr("flashmoe_backend.experts.switch.grouped_switch",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = engine.model(ids)
    mx.eval(got)
    assert calls  # the streaming layer took the grouped path
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


def test_fetch_iter_gives_cached_experts_first_then_each_read_once():
    from flashmoe_backend import FlashMoE
    from flashmoe_backend.store.source import default_store

    streamer = FlashMoE.load(default_store(), cache_gb=1.0).streamer
    streamer.fetch(0, [1, 3])
    streamer.release()
    before = (streamer.counters.experts_read, streamer.cache.counters.hits)
    got = list(streamer.fetch_iter(0, [0, 1, 2, 3]))
    assert [e for e, _ in got] == [1, 3, 0, 2]  # the cached ones need no wait
    assert (streamer.counters.experts_read, streamer.cache.counters.hits) == (before[0] + 2, before[1] + 2)
    again = dict(streamer.fetch_iter(0, [0, 2]))  # the misses are cached now, same arrays
    assert all(again[e] is dict(got)[e] for e in (0, 2))
    streamer.release()
