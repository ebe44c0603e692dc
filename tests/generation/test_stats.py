"""Per-layer counters and per-pass steps of the statistics: they add up to the totals, follow the
prompt chunks and decoded tokens, and accumulate (or not, for steps) in ``engine.stats``."""

from __future__ import annotations

import pytest

from flashmoe_backend import FlashMoE, PackOptions, Stats, pack
from flashmoe_backend.generation.stats import Step
from flashmoe_backend.store.format import read_manifest

PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 128, 3, 77, 11]


def test_add_sums_layers_and_keeps_no_steps():
    total = Stats(layer_hits=[1, 2], layer_misses=[0, 1], layer_bytes_read=[0, 10])
    total.add(Stats(hits=3, layer_hits=[1, 1, 1], layer_misses=[2], steps=[Step(1, hits=3)]))
    assert total.hits == 3 and total.layer_hits == [2, 3, 1]
    assert total.layer_misses == [2, 1] and total.layer_bytes_read == [0, 10]
    assert total.steps == []
    assert "steps" not in total.to_dict() and total.to_dict()["layer_hits"] == [2, 3, 1]
    one = Stats(steps=[Step(4, hits=1, misses=3)])
    assert one.to_dict(steps=True)["steps"] == [
        {"tokens": 4, "hits": 1, "misses": 3, "bytes_read": 0, "io_seconds": 0.0}]
    assert one.steps[0].hit_rate == 0.25 and Step(1).hit_rate == 0.0


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_hf_dir):
    out = tmp_path_factory.mktemp("stats") / "store"
    pack(tiny_hf_dir("qwen3_5_moe", seed=1), out, PackOptions(bits=4, group_size=32, progress=False))
    return out


@pytest.mark.parametrize("fraction", [0.25, 0.05])  # 0.05: a prompt chunk is run in groups
def test_layers_and_steps_add_up(store, fraction):
    manifest = read_manifest(store)
    engine = FlashMoE.load(store, cache_gb=fraction * manifest.expert_bytes / 1024**3,
                           prefill_step_size=4)
    stats = engine.generate(PROMPT, max_tokens=8).stats
    assert stats.misses > 0
    assert len(stats.layer_hits) == len(stats.layer_misses) == len(manifest.layers)
    assert sum(stats.layer_hits) == stats.hits and sum(stats.layer_misses) == stats.misses
    assert sum(stats.layer_bytes_read) == stats.bytes_read
    assert sum(s.hits for s in stats.steps) == stats.hits
    assert sum(s.misses for s in stats.steps) == stats.misses
    assert sum(s.bytes_read for s in stats.steps) == stats.bytes_read
    assert sum(s.io_seconds for s in stats.steps) == pytest.approx(stats.io_seconds)
    # Prefill: all but the last prompt token in chunks of 4; then one token per pass (the last
    # prompt token, then the decoded ones; mlx-lm computes one pass ahead).
    tokens = [s.tokens for s in stats.steps]
    assert tokens[:3] == [4, 4, 3] and set(tokens[3:]) == {1}
    assert stats.generated_tokens <= len(tokens) - 3 <= stats.generated_tokens + 1

    again = engine.generate(PROMPT, max_tokens=8).stats  # the prompt's snapshot is reused
    assert again.prompt_cached_tokens == len(PROMPT) - 1 and again.steps[0].tokens == 1
    assert engine.stats.layer_misses == [a + b for a, b in zip(stats.layer_misses, again.layer_misses,
                                                                strict=True)]
    assert engine.stats.steps == [] and engine.streamer.steps is None  # recording only while generating


def test_steps_are_not_recorded_outside_generation(store):
    engine = FlashMoE.load(store, cache_gb=1.0)
    stream = engine.stream(PROMPT, max_tokens=8)
    next(stream)
    assert engine.streamer.steps  # recording
    stream.close()  # abandoned mid-way: recording stops
    assert engine.streamer.steps is None
