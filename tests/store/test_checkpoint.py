"""An mlx-community checkpoint read in place: the same model as mlx-lm's, no second copy, and every
damage named before (or instead of) a wrong token.

The checkpoints are tiny float32 Qwen3.5-MoE, Qwen3-Next and Qwen3-MoE models quantized by
``mlx_lm.convert`` itself (4-bit group 32, router and shared-expert gate at 8 bits), split over 3
shards so that a layer's expert tensors lie in more than one file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from flashmoe_backend import FlashMoE, StoreError
from flashmoe_backend.cli.commands import main
from flashmoe_backend.store.checkpoint import Checkpoint
from flashmoe_backend.store.format import read_safetensors_header
from tests.fixtures.tiny import ARCHS, reshard_checkpoint

PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 128, 3, 77, 11]
GB = 1024**3


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Each test its own index cache: first reads are first reads."""
    monkeypatch.setenv("FLASHMOE_HOME", str(tmp_path / "flashmoe-home"))


@pytest.fixture(scope="module")
def sharded(tiny_quantized_dir, tmp_path_factory):
    """Factory: the arch's mlx-community-style checkpoint, in 3 shards (read-only: copy to damage)."""
    built: dict[str, Path] = {}

    def get(arch: str = "qwen3_5_moe") -> Path:
        if arch not in built:
            built[arch] = reshard_checkpoint(
                tiny_quantized_dir(arch), tmp_path_factory.mktemp(f"sharded-{arch}") / "ckpt"
            )
        return built[arch]

    return get


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy"))


def _greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """``n`` greedy tokens (no stop at EOS) and the logits of each step."""
    cache = make_prompt_cache(model)
    x, tokens, logits = mx.array([prompt]), [], []
    for _ in range(n):
        out = model(x, cache=cache)[0, -1].astype(mx.float32)
        logits.append(np.array(out))
        tokens.append(int(mx.argmax(out)))
        x = mx.array([[tokens[-1]]])
    return tokens, logits


@pytest.mark.parametrize("arch", ARCHS)
def test_in_place_matches_mlx_lm(sharded, arch):
    src = sharded(arch)
    ref, _ = mlx_lm.load(str(src))
    # A budget of 25% of the expert bytes: experts really stream (evicted and read again).
    expert_bytes = Checkpoint.open(src).manifest.expert_bytes
    engine = FlashMoE.load(src, cache_gb=0.25 * expert_bytes / GB)
    try:
        assert engine.source.__class__.__name__ == "Checkpoint"
        assert len({x.file for layer in range(len(engine.manifest.layers))
                    for x in engine.source.extents(layer, 0)}) > 1  # experts span shards
        x = mx.array([PROMPT])
        assert float(mx.abs(engine.model(x) - ref(x)).max()) <= 1e-4
        tokens, logits = _greedy(engine.model, PROMPT, 32)
        ref_tokens, ref_logits = _greedy(ref, PROMPT, 32)
        assert tokens == ref_tokens
        assert max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits, strict=True)) <= 1e-4
        counters = engine.streamer.cache.counters
        assert counters.misses > engine.streamer.cache.budget_bytes // engine.manifest.layers[0].record_bytes
        assert counters.bytes_peak <= engine.streamer.cache.budget_bytes
        # The engine's own generation (stop strings, EOS) agrees too.
        result = engine.generate(PROMPT, max_tokens=32)
        assert result.token_ids == ref_tokens[: len(result.token_ids)]
    finally:
        engine.close()


def test_index_is_fast_and_matches_a_packed_store(sharded, tmp_path):
    import time

    from flashmoe_backend import PackOptions, pack
    from flashmoe_backend.store.format import read_manifest

    src = sharded("qwen3_5_moe")
    tic = time.perf_counter()
    checkpoint = Checkpoint.open(src)
    assert time.perf_counter() - tic < 1.0
    store = tmp_path / "store"
    pack(src, store, PackOptions(progress=False))
    packed = read_manifest(store)
    # Same modules, record sizes (the cache's unit: equal budgets hold equal experts) and
    # quantization as the store packed from the same checkpoint.
    for ours, theirs in zip(checkpoint.manifest.layers, packed.layers, strict=True):
        assert (ours.module, ours.num_experts, ours.record_bytes, ours.quantization) == (
            theirs.module, theirs.num_experts, theirs.record_bytes, theirs.quantization
        )
        assert [(t.name, t.dtype, t.shape, t.nbytes) for t in ours.tensors] == [
            (t.name, t.dtype, t.shape, t.nbytes) for t in theirs.tensors
        ]


def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under the roots."""
    found = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                st = os.stat(os.path.join(dirpath, name))
                found[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return found


def test_loading_in_place_writes_little(sharded, tmp_path, monkeypatch):
    src = _copy(sharded("qwen3_5_moe"), tmp_path)
    home, cache_home, tmp = tmp_path / "home", tmp_path / "xdg-cache", tmp_path / "tmp"
    for d in (home, cache_home, tmp):
        d.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    flashmoe_home = Path(os.environ["FLASHMOE_HOME"])
    flashmoe_home.mkdir(parents=True)
    roots = (src, home, cache_home, tmp, flashmoe_home)
    before = _tree(*roots)
    engine = FlashMoE.load(src, cache_gb=0.001)
    engine.generate(PROMPT, max_tokens=16)
    engine.close()
    after = _tree(*roots)
    written = {p: s for p, (s, m) in after.items() if before.get(p) != (s, m)}
    assert not [p for p in written if p.startswith(str(src))]  # nothing inside the checkpoint
    assert written and all(p.startswith(str(flashmoe_home)) for p in written)
    assert sum(written.values()) <= 1 << 20


def test_truncated_shard_is_named_before_any_token(sharded, tmp_path):
    src = _copy(sharded("qwen3_5_moe"), tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(StoreError, match=rf"{shard}: tensor .* outside the file's .*truncated"):
        FlashMoE.load(src)


def test_flipped_byte_after_first_read_fails_loudly(sharded, tmp_path):
    src = _copy(sharded("qwen3_5_moe"), tmp_path)
    engine = FlashMoE.load(src, cache_gb=0.001)
    first = engine.generate(PROMPT, max_tokens=8)
    engine.close()  # the first-read checksums are saved in the index cache
    checkpoint = Checkpoint.open(src)
    layer, expert, k = checkpoint.recorded_slices()[0]
    extent = checkpoint.extents(layer, expert)[k]
    path = checkpoint.files[extent.file]
    with open(path, "r+b") as f:
        f.seek(extent.offset + 3)
        byte = f.read(1)
        f.seek(extent.offset + 3)
        f.write(bytes([byte[0] ^ 0x10]))
    engine = FlashMoE.load(src, cache_gb=0.001)  # the header is unchanged: loads
    try:
        module = engine.manifest.layers[layer].module
        with pytest.raises(StoreError) as caught:
            engine.generate(PROMPT, max_tokens=8)
        message = str(caught.value)
        assert f"{path}: expert {expert} of layer {layer} ({module})" in message
        assert "differs from" in message and "recorded on its first read" in message
    finally:
        engine.close()
    assert first.token_ids  # the undamaged checkpoint generated


def test_header_that_disagrees_with_config(sharded, tmp_path):
    src = _copy(sharded("qwen3_5_moe"), tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 64
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(StoreError, match=r"model-0000\d-of-00003\.safetensors: tensor .*switch_mlp"
                       r".* has shape .* but .*config\.json describes"):
        FlashMoE.load(src)


def _rewrite_without(shard: Path, drop: str) -> None:
    tensors = mx.load(str(shard))
    del tensors[drop]
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})


def test_missing_tensor_and_missing_shard(sharded, tmp_path):
    src = _copy(sharded("qwen3_5_moe"), tmp_path)
    shard = next(
        p for p in sorted(src.glob("model-*.safetensors"))
        if any("switch_mlp.down_proj.scales" in k for k in read_safetensors_header(p).tensors)
    )
    name = next(k for k in read_safetensors_header(shard).tensors if "switch_mlp.down_proj.scales" in k)
    _rewrite_without(shard, name)
    missing = rf"is quantized \(uint32\) but tensor {name} .* is in none of the weight"
    with pytest.raises(StoreError, match=missing):
        FlashMoE.load(src)
    shard.unlink()
    with pytest.raises(StoreError, match=rf"{shard}: missing, but model.safetensors.index.json lists it"):
        FlashMoE.load(src)


def test_missing_resident_tensor(sharded, tmp_path):
    src = _copy(sharded("qwen3_5_moe"), tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    name = next(k for k in read_safetensors_header(shard).tensors if "norm" in k)
    _rewrite_without(shard, name)
    with pytest.raises(StoreError, match=rf"tensor {name} is in none of the weight files"):
        FlashMoE.load(src)


def test_shard_replaced_since_first_use(sharded, tmp_path):
    src = _copy(sharded("qwen3_5_moe"), tmp_path)
    FlashMoE.load(src, cache_gb=0.001).close()
    shard = sorted(src.glob("model-*.safetensors"))[0]
    tensors = mx.load(str(shard))
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx", "edited": "yes"})
    with pytest.raises(StoreError, match=rf"{shard}: changed since flashmoe first read this checkpoint"):
        FlashMoE.load(src)


def test_hugging_face_checkpoint_is_refused_with_advice(tiny_hf_dir):
    src = tiny_hf_dir("qwen3_5_moe")
    with pytest.raises(StoreError, match=r"not stored stacked .* pack the checkpoint with `flashmoe pack"):
        FlashMoE.load(src)


def test_commands_take_a_checkpoint(sharded, capsys):
    src = sharded("qwen3_moe")
    assert main(["info", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["moe_layers"] == 4 and info["source"] == "checkpoint (read in place)"
    assert info["quantization"]["experts"] == "4-bit g32"
    code = main(["generate", str(src), "-p", "Hello", "--max-tokens", "4", "--cache-gb", "0.001"])
    assert code == 0
    capsys.readouterr()
    assert main(["verify", str(src), "-q"]) == 0  # the slices generate read, against their CRC32s
    out = capsys.readouterr().out
    assert "3 with no Hugging Face sha256" in out and " 0 expert slices" not in out


def test_integrations_take_a_checkpoint(sharded):
    from langchain_flashmoe import ChatFlashMoE
    from llama_index.llms.flashmoe import FlashMoE as LlamaFlashMoE

    src = str(sharded("qwen3_moe"))
    message = ChatFlashMoE(model=src, cache_gb=0.001, max_tokens=4).invoke("Hello")
    assert isinstance(message.content, str)
    response = LlamaFlashMoE(model=src, cache_gb=0.001, max_tokens=4).complete("Hello")
    assert isinstance(response.text, str)


def test_bench_model_takes_a_checkpoint(sharded, tmp_path):
    src = sharded("qwen3_moe")
    out = tmp_path / "m.json"
    argv = ["bench", "model", str(src), "--prompt-tokens", "24", "--max-tokens", "4", "--prefill-step", "8",
            "--out", str(out), "--markdown", str(tmp_path / "m.md")]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["store"]["path"] == str(src)
    for run in report["runs"]:
        assert all(run["consistent"].values()), run["consistent"]
        assert run["decode_tokens_per_s"] > 0
    assert report["bandwidth"]["disk"]["bytes"] > 0
    assert report["mlx_lm_in_memory"]["generation_tps"] > 0
