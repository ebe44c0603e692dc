"""The engine against its references: mlx-lm's in-memory model and transformers.

Every store here is built from a tiny random checkpoint made on the fly; the reference is the
same weights loaded whole by mlx-lm (and, unquantized, by transformers in torch).
"""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache

from flashmoe_backend import FlashMoE, PackOptions, pack

ARCHS = ["qwen3_5_moe", "qwen3_next", "qwen3_moe"]
PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 128, 3, 77, 11]
DECODE_STEPS = 16
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_hf_dir, tiny_quantized_dir):
    """arch -> (hf dir, float store, 4-bit mlx-lm-converted dir, store packed from that)."""
    built = {}

    def get(arch):
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            hf = tiny_hf_dir(arch, seed=1)
            store = root / "store"
            pack(hf, store, PackOptions(bits=16, progress=False))
            quant = tiny_quantized_dir(arch, bits=4, group_size=32, seed=1)
            qstore = root / "qstore"
            pack(quant, qstore, PackOptions(progress=False))
            built[arch] = hf, store, quant, qstore
        return built[arch]

    return get


def logits_trace(model, prompt, steps, drive=None):
    """Logits of a prefill then ``steps`` cached decode steps; tokens from ``drive`` if given
    (so two models are fed the same tokens), else greedy. Returns (logits [T+steps, V], tokens)."""
    cache = make_prompt_cache(model)
    out = [model(mx.array(prompt)[None], cache=cache)[0]]
    tokens = []
    for i in range(steps):
        tok = drive[i] if drive is not None else int(mx.argmax(out[-1][-1]).item())
        tokens.append(tok)
        out.append(model(mx.array([[tok]]), cache=cache)[0])
    return mx.concatenate(out, axis=0), tokens


def max_diff(a, b) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item())


@pytest.mark.parametrize("arch", ARCHS)
def test_float_store_matches_mlx_lm_and_transformers(checkpoints, arch):
    import torch
    from transformers import AutoModelForCausalLM

    hf, store, _, _ = checkpoints(arch)
    ref, _ = mlx_lm.load(str(hf))
    engine = FlashMoE.load(store, cache_gb=1.0)
    expected, tokens = logits_trace(ref, PROMPT, DECODE_STEPS)
    got, _ = logits_trace(engine.model, PROMPT, DECODE_STEPS, drive=tokens)
    assert max_diff(got, expected) <= TOL

    hf_model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        torch_logits = hf_model(torch.tensor([PROMPT + tokens])).logits[0].numpy()
    # The traces hold logits for every prompt position and after each decode step.
    n = len(PROMPT) + DECODE_STEPS
    assert np.abs(np.array(got)[:n] - torch_logits).max() <= TOL
    assert engine.stats.misses == 0 or engine.streamer.counters.bytes_read > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_store_matches_mlx_lm(checkpoints, arch, tmp_path):
    hf, _, quant, qstore = checkpoints(arch)
    ref, _ = mlx_lm.load(str(quant))
    expected, tokens = logits_trace(ref, PROMPT, DECODE_STEPS)
    # The mlx-community path (experts copied as they are) ...
    engine = FlashMoE.load(qstore, cache_gb=1.0)
    got, _ = logits_trace(engine.model, PROMPT, DECODE_STEPS, drive=tokens)
    assert max_diff(got, expected) <= TOL
    # ... and the HF path quantized by `flashmoe pack` hold the same model.
    packed = tmp_path / "packed4"
    pack(hf, packed, PackOptions(bits=4, group_size=32, progress=False))
    engine = FlashMoE.load(packed, cache_gb=1.0)
    got, _ = logits_trace(engine.model, PROMPT, DECODE_STEPS, drive=tokens)
    assert max_diff(got, expected) <= TOL


def test_bfloat16_checkpoint(tiny_hf_dir, tmp_path):
    """Real checkpoints are bf16 (mlx-community scales and biases too): records carry bf16."""
    hf = tiny_hf_dir("qwen3_5_moe", dtype="bfloat16")
    store = tmp_path / "bf16"
    pack(hf, store, PackOptions(bits=4, group_size=32, progress=False))
    from flashmoe_backend.store.format import read_manifest

    assert {t.dtype for t in read_manifest(store).layers[0].tensors} == {"uint32", "bfloat16"}
    converted = tmp_path / "conv"
    mlx_lm.convert(str(hf), str(converted), quantize=True, q_bits=4, q_group_size=32)
    ref, _ = mlx_lm.load(str(converted))
    engine = FlashMoE.load(store, cache_gb=0.3 * _expert_gb(store))
    expected, tokens = logits_trace(ref, PROMPT, 4)
    got, _ = logits_trace(engine.model, PROMPT, 4, drive=tokens)
    assert max_diff(got, expected) <= 1e-4  # same weights, same bf16 arithmetic
    assert engine.streamer.counters.bytes_read > 0


def mlx_lm_greedy(model, tokenizer, prompt, n):
    return [r.token for r in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=n)]


@pytest.mark.parametrize("path", ["hf", "mlx-community"])
def test_greedy_generation_is_identical_to_mlx_lm(checkpoints, path):
    hf, store, quant, qstore = checkpoints("qwen3_5_moe")
    ref_dir, our_store = (hf, store) if path == "hf" else (quant, qstore)
    ref, tokenizer = mlx_lm.load(str(ref_dir))
    # A tight budget: the generation streams for real (misses every token), output unchanged.
    engine = FlashMoE.load(our_store, cache_gb=0.25 * _expert_gb(engine_store=our_store))
    result = engine.generate(PROMPT, max_tokens=40)
    expected = mlx_lm_greedy(ref, tokenizer, PROMPT, 40)
    assert len(result.token_ids) >= 32
    assert result.token_ids == expected[: len(result.token_ids)]
    assert result.stats.misses > 0 and result.stats.bytes_read > 0


def _expert_gb(engine_store) -> float:
    from flashmoe_backend.store.format import read_manifest

    return read_manifest(engine_store).expert_bytes / 1024**3


def test_budget_is_respected_and_output_exact(checkpoints):
    hf, store, _, _ = checkpoints("qwen3_next")
    budget_gb = _expert_gb(store) / 5  # expert bytes are 5x the budget
    engine = FlashMoE.load(store, cache_gb=budget_gb)
    ref, tokenizer = mlx_lm.load(str(hf))
    result = engine.generate(PROMPT, max_tokens=24)
    assert result.token_ids == mlx_lm_greedy(ref, tokenizer, PROMPT, 24)[: len(result.token_ids)]
    stats = result.stats
    assert stats.misses > 0 and stats.bytes_read > 0 and stats.io_seconds > 0
    assert 0 < stats.cache_bytes_peak <= budget_gb * 1024**3
    assert stats.generated_tokens == len(result.token_ids)
    assert stats.prompt_tokens == len(PROMPT)
    assert engine.stats.misses == stats.misses  # cumulative == the only generation so far


def _recording(read, log):
    def recorded(layer, experts):
        log.append((layer, list(experts)))
        return read(layer, experts)

    return recorded


def test_prefill_reads_each_needed_expert_once_per_chunk(checkpoints):
    """A 256-token prompt in one layer-major chunk: each needed expert read at most once, also
    when the chunk needs more experts than the budget holds (grouped processing)."""
    _, store, _, _ = checkpoints("qwen3_moe")
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 500, size=257).tolist()
    from flashmoe_backend.store.format import read_manifest

    layer_gb = read_manifest(store).layers[0].file_bytes / 1024**3
    for budget_fraction in (1.0, 0.3):  # of ONE layer's experts: 0.3 forces groups
        engine = FlashMoE.load(store, cache_gb=budget_fraction * layer_gb, prefill_step_size=256)
        reads = []
        engine.streamer.reader.read_iter = _recording(engine.streamer.reader.read_iter, reads)
        engine.model(mx.array(prompt[:256])[None], cache=make_prompt_cache(engine.model))
        per_layer = {}
        for layer, experts in reads:
            per_layer.setdefault(layer, []).extend(experts)
        assert per_layer, "prefill read nothing"
        for experts in per_layer.values():
            assert len(experts) == len(set(experts))
        if budget_fraction < 1.0:
            assert engine.streamer.counters.groups > engine.streamer.counters.calls


def test_experts_per_token_override(checkpoints, tmp_path):
    import json
    import shutil

    hf, store, _, _ = checkpoints("qwen3_moe")
    engine = FlashMoE.load(store, cache_gb=1.0, experts_per_token=2)
    assert all(layer.mlp.top_k == 2 for layer in engine.model.layers)
    # The reference: the same weights with num_experts_per_tok=2 in the config.
    ref_dir = tmp_path / "k2"
    shutil.copytree(hf, ref_dir)
    config = json.loads((ref_dir / "config.json").read_text())
    config["num_experts_per_tok"] = 2
    (ref_dir / "config.json").write_text(json.dumps(config))
    ref, _ = mlx_lm.load(str(ref_dir))
    expected, tokens = logits_trace(ref, PROMPT, 4)
    got, _ = logits_trace(engine.model, PROMPT, 4, drive=tokens)
    assert max_diff(got, expected) <= TOL
    default = FlashMoE.load(store, cache_gb=1.0)
    assert all(layer.mlp.top_k == 4 for layer in default.model.layers)


def test_prompt_cache_reuses_prefixes_exactly(checkpoints):
    """Multi-turn chat on the hybrid (GatedDeltaNet) model: snapshots restore the exact state."""
    _, store, _, _ = checkpoints("qwen3_5_moe")
    cached = FlashMoE.load(store, cache_gb=1.0)
    fresh = FlashMoE.load(store, cache_gb=1.0, prompt_cache_entries=0)
    messages = [{"role": "system", "content": "You answer from the records of the clinic."},
                {"role": "user", "content": "Which room is the meeting in?"}]
    for turn in range(3):
        a = cached.generate(messages, max_tokens=8, enable_thinking=False)
        b = fresh.generate(messages, max_tokens=8, enable_thinking=False)
        assert a.token_ids == b.token_ids
        if turn:
            assert a.stats.prompt_cached_tokens > 0
        assert b.stats.prompt_cached_tokens == 0
        messages += [{"role": "assistant", "content": a.text},
                     {"role": "user", "content": f"And the next one, number {turn}?"}]


def test_stream_stop_strings_and_seed(checkpoints):
    _, store, _, _ = checkpoints("qwen3_moe")
    engine = FlashMoE.load(store, cache_gb=1.0)
    full = engine.generate("The records say", max_tokens=30, temperature=0.9, seed=3)
    again = engine.generate("The records say", max_tokens=30, temperature=0.9, seed=3)
    assert full.token_ids == again.token_ids  # seeded sampling is reproducible
    pieces = list(engine.stream("The records say", max_tokens=30, temperature=0.9, seed=3))
    result = pieces[-1]
    assert "".join(p.text for p in pieces[:-1]) == result.text == full.text
    # 30 tokens, or fewer if the random model sampled its end-of-turn token.
    eos_hit = result.finish_reason == "stop" and len(result.token_ids) < 30
    assert (result.finish_reason == "length" and len(result.token_ids) == 30) or eos_hit
    # Stop at a string that occurs in the text: it never reaches the output.
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), "the random text should have printable characters mid-way"
    stopped = engine.generate("The records say", max_tokens=30, temperature=0.9, seed=3,
                              stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert full.text.startswith(stopped.text)
    streamed = list(engine.stream("The records say", max_tokens=30, temperature=0.9, seed=3,
                                  stop=[stop]))
    assert "".join(p.text for p in streamed[:-1]) == stopped.text


def test_bad_generation_arguments(checkpoints):
    _, store, _, _ = checkpoints("qwen3_moe")
    engine = FlashMoE.load(store, cache_gb=1.0)
    with pytest.raises(TypeError, match="temprature"):
        engine.generate("hi", temprature=0.5)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate("hi", max_tokens=0)
    with pytest.raises(ValueError, match="cache budget"):
        FlashMoE.load(store, cache_gb=1e-9)


def test_astream_matches_stream_and_frees_the_engine(checkpoints):
    import asyncio

    _, store, _, _ = checkpoints("qwen3_moe")
    engine = FlashMoE.load(store, cache_gb=1.0)
    expected = engine.generate("The records say", max_tokens=12)

    async def collect():
        return [item async for item in engine.astream("The records say", max_tokens=12)]

    async def abandon():
        async for _ in engine.astream("The records say", max_tokens=200):
            break

    items = asyncio.run(collect())
    assert items[-1].token_ids == expected.token_ids
    assert "".join(i.text for i in items[:-1]) == expected.text
    asyncio.run(abandon())
    assert engine.generate("x", max_tokens=2).finish_reason in ("length", "stop")  # lock free
    assert not engine.lock.locked()
