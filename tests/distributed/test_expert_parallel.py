"""One model over two ranks (``mlx.launch -n 2 --backend ring``, loopback): expert parallelism
against one process on the same tiny float32 store.

Each launch starts two Python processes that load the model (tens of seconds on a busy 2-core
machine); the in-process tests below them cover ownership and the layer math without a launch.
"""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe_backend import FlashMoE, PackOptions, pack
from flashmoe_backend.distributed import SPLITS, detect_group, owners, sever_ring_connections
from flashmoe_backend.errors import DistributedError, ParameterError
from flashmoe_backend.experts.switch import StreamingSwitch
from flashmoe_backend.store.format import read_manifest
from tests.distributed.common import (
    ASK,
    GREEDY_TOKENS,
    PROMPT,
    SCHEMA,
    TRACE_STEPS,
    WEATHER,
    launch,
    logits_trace,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def store(tiny_hf_dir, tmp_path_factory):
    """A float32 store of the tiny Qwen3.5-MoE (16 experts, top-4, 4 MoE layers)."""
    out = tmp_path_factory.mktemp("dist") / "store"
    pack(tiny_hf_dir("qwen3_5_moe", seed=1), out, PackOptions(bits=16, progress=False))
    return out


def budget_gb(store) -> float:
    """A quarter of the expert bytes: tokens miss and read for real."""
    return read_manifest(store).expert_bytes / 4 / 1024**3


@pytest.fixture(scope="module")
def single(store):
    """What one process does with the requests ``ranks.py`` sends in the "exact" scenario."""
    engine = FlashMoE.load(store, cache_gb=budget_gb(store), group=None)
    result = engine.generate(PROMPT, max_tokens=GREEDY_TOKENS)
    logits, _ = logits_trace(engine.model, PROMPT, TRACE_STEPS, drive=result.token_ids)
    structured = engine.generate(ASK, response_format=SCHEMA, max_tokens=40, temperature=1.0, seed=1)
    tool = engine.generate(ASK, tools=[WEATHER], tool_choice="required", max_tokens=120,
                           temperature=1.0, seed=0, parallel_tool_calls=False)
    engine.close()
    return {"tokens": result.token_ids, "stats": result.stats, "logits": np.array(logits),
            "structured": structured, "tool": tool}


# -- two ranks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_two_ranks_match_one_process(store, single, split, tmp_path):
    run = launch({"scenario": "exact", "store": str(store),
                  "load": {"cache_gb": budget_gb(store), "expert_split": split}}, tmp_path)
    assert run.returncode == 0 and set(run.results) == {0, 1}, run.stderr[-3000:]
    got = run.results[0]
    assert run.results[1]["followed"]  # rank 1 served until rank 0 closed, then returned

    # Greedy tokens identical to one process, and the logits too (the shares add up exactly).
    assert len(single["tokens"]) >= 32
    assert got["tokens"] == single["tokens"]
    logits = np.load(tmp_path / "logits.npy")
    assert np.abs(logits - single["logits"]).max() <= TOL

    # Each rank read only its share: at most 0.6x one process's bytes at the same budget, and
    # its cache never held more than its own budget.
    stats = got["greedy_stats"]
    assert [r["rank"] for r in stats["ranks"]] == [0, 1]
    for rank in stats["ranks"]:
        assert 0 < rank["bytes_read"] <= 0.6 * single["stats"].bytes_read, rank
        assert 0 < rank["cache_bytes_peak"] <= rank["budget_bytes"], rank
        assert rank["passes"] == len(single["stats"].steps), rank
    assert stats["generated_tokens"] == len(single["tokens"])
    assert stats["comm_seconds_per_token"] > 0

    # Constrained decoding and a forced tool call run on rank 0 unchanged: same sampled text as
    # one process (same seed, same logits), valid against the schema.
    assert got["structured"]["text"] == single["structured"].text
    assert got["structured"]["parsed"] == single["structured"].parsed
    assert isinstance(got["structured"]["parsed"]["ok"], bool)
    assert got["tool"]["raw_text"] == single["tool"].raw_text
    assert got["tool"]["finish_reason"] == "tool_calls"
    assert got["tool"]["calls"] == [[c.name, c.arguments] for c in single["tool"].tool_calls]
    assert got["tool"]["calls"][0][0] == "get_weather"


def test_two_ranks_match_one_process_in_bfloat16(tiny_hf_dir, tmp_path):
    """A bf16 checkpoint at 4 bits (what real stores hold): bf16 rows travel two to an int32
    word, and the greedy tokens are still one process's."""
    bf16 = tmp_path / "bf16"
    pack(tiny_hf_dir("qwen3_5_moe", dtype="bfloat16"), bf16,
         PackOptions(bits=4, group_size=32, progress=False))
    engine = FlashMoE.load(bf16, cache_gb=budget_gb(bf16), group=None)
    expected = engine.generate(PROMPT, max_tokens=GREEDY_TOKENS).token_ids
    engine.close()
    run = launch({"scenario": "greedy", "store": str(bf16), "load": {"cache_gb": budget_gb(bf16)}},
                 tmp_path / "run")
    assert run.returncode == 0 and 0 in run.results, run.stderr[-3000:]
    assert run.results[0]["tokens"] == expected and len(expected) >= 16


def test_a_rank_that_exits_is_a_clear_error_on_rank_0(store, tmp_path):
    run = launch({"scenario": "die", "store": str(store), "after": 20,
                  "load": {"cache_gb": budget_gb(store), "distributed_timeout": 20}}, tmp_path,
                 timeout=240)
    got = run.results.get(0)
    assert got is not None, run.stderr[-3000:]
    assert got["type"] == "DistributedError"
    assert "lost the connection to another rank" in got["error"]
    assert "restart all ranks" in got["error"]
    assert got["seconds"] < 30
    assert got["again"] and "broken" in got["again"]


def test_a_rank_that_hangs_is_a_clear_error_on_rank_0_within_the_timeout(store, tmp_path):
    run = launch({"scenario": "hang", "store": str(store), "after": 20,
                  "load": {"cache_gb": budget_gb(store), "distributed_timeout": 5}}, tmp_path,
                 timeout=240, wait_for=0)
    got = run.results.get(0)
    assert got is not None, run.stderr[-3000:]
    assert got["type"] == "DistributedError"
    assert "no answer from the other ranks within 5 s" in got["error"]
    assert 5 <= got["seconds"] < 30
    assert got["again"] and "broken" in got["again"]


# -- in one process ------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_every_expert_has_exactly_one_owner(split, size):
    owner = owners(16, size, split)
    assert owner.shape == (16,) and set(owner.tolist()) == set(range(size))
    counts = np.bincount(owner, minlength=size)
    assert counts.max() - counts.min() <= 1  # balanced to one expert
    if split == "blocks":
        assert (np.diff(owner) >= 0).all()  # contiguous ranges


def test_shares_add_up_to_the_layer_exactly(store):
    """The rows each rank computes (``StreamingSwitch.partial``) sum to one process's layer output
    bit for bit, for a decode step and for a prompt chunk (the sorted path of SwitchGLU)."""
    import mlx.core as mx

    engine = FlashMoE.load(store, cache_gb=1.0, group=None)
    switch = next(m for _, m in engine.model.named_modules() if isinstance(m, StreamingSwitch))
    rng = np.random.default_rng(0)
    for tokens in (1, 5, 40):
        x = mx.array(rng.standard_normal((1, tokens, 64)).astype(np.float32))
        host = np.stack([rng.choice(16, 4, replace=False) for _ in range(tokens)])[None]
        indices = mx.array(host.astype(np.uint32))
        full = switch(x, indices)
        for size in (2, 3):
            owner = owners(16, size)
            parts = [switch.partial(x, host, indices.dtype, [e for e in range(16) if owner[e] == r])
                     for r in range(size)]
            assert mx.array_equal(sum(parts[1:], parts[0]), full).item()
    engine.close()


def test_one_process_has_no_group(store):
    assert detect_group(None) is None
    assert detect_group("auto") is None  # not under mlx.launch: a group of one
    engine = FlashMoE.load(store, cache_gb=1.0)
    assert engine.distributed is None and engine.distributed_stats is None
    with pytest.raises(DistributedError, match="mlx.launch"):
        engine.follow()
    engine.close()
    assert sever_ring_connections() == 0  # no ring here: nothing to sever


@pytest.mark.parametrize("options", [{"expert_split": "random"}, {"distributed_timeout": 0},
                                     {"group": "ring"}])
def test_bad_distributed_options(store, options):
    with pytest.raises(ParameterError):
        FlashMoE.load(store, cache_gb=1.0, **options)


@pytest.mark.parametrize("width", [64, 63])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_layer_inputs_travel_bit_for_bit(dtype, width):
    """Rank 0 sends a layer's input rows as int32 words (two 16-bit elements a word where the
    width is even); the other ranks get them back bit for bit, also from a non-contiguous view."""
    import mlx.core as mx

    from flashmoe_backend.distributed import _CODES, _from_words, _to_words, _words_per_row

    dt = getattr(mx, dtype)
    x = mx.random.normal((width, 3), key=mx.random.key(width)).astype(dt).T  # a transposed view
    words = _to_words(x).reshape(-1)
    assert words.dtype == mx.int32 and words.size == 3 * _words_per_row(_CODES[dt], width)
    back = _from_words(words, _CODES[dt], width).reshape(3, width)
    assert back.dtype == dt and mx.array_equal(back, x).item()
