"""Packing and the store: layout, equivalence with mlx_lm.convert, atomicity, bad input."""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

from flashmoe_backend import FlashMoE, PackOptions, StoreError, pack, verify_store
from flashmoe_backend.cli.commands import main
from flashmoe_backend.store.format import ALIGNMENT, read_manifest
from tests.fixtures.tiny import build_quantized_checkpoint


@pytest.fixture(scope="module")
def hf_dir(tiny_hf_dir):
    return tiny_hf_dir("qwen3_5_moe", seed=2)


@pytest.fixture(scope="module")
def store(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "s4"
    pack(hf_dir, out, PackOptions(bits=4, group_size=32, progress=False))
    return out


@pytest.fixture
def store_copy(store, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(store, tmp_path / "copy")


def test_store_layout(store):
    manifest = read_manifest(store)
    config = json.loads((store / "config.json").read_text())
    text = config["text_config"]
    assert len(manifest.layers) == text["num_hidden_layers"]
    for layer in manifest.layers:
        assert layer.record_bytes % ALIGNMENT == 0
        assert (store / layer.file).stat().st_size == layer.num_experts * layer.record_bytes
        assert {t.name for t in layer.tensors} == {
            f"{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("weight", "scales", "biases")
        }
        assert layer.quantization == {"group_size": 32, "bits": 4, "mode": "affine"}
        assert len(layer.checksums) == layer.num_experts
    resident = mx.load(str(store / "model.safetensors"))
    assert not any("switch_mlp" in k or "experts" in k for k in resident)
    assert any(k.endswith("mlp.gate.scales") for k in resident)  # router quantized (8-bit)
    assert (store / "tokenizer.json").is_file() and (store / "chat_template.jinja").is_file()


def test_pack_equals_mlx_lm_convert(hf_dir, store, tmp_path):
    """The store holds exactly the weights mlx_lm.convert writes; only the layout differs."""
    converted = build_quantized_checkpoint(hf_dir, tmp_path / "conv", bits=4, group_size=32)
    reference = {}
    for f in converted.glob("model*.safetensors"):
        reference.update(mx.load(str(f)))
    resident = mx.load(str(store / "model.safetensors"))
    for key, value in resident.items():
        assert mx.array_equal(value, reference[key]), key
    manifest = read_manifest(store)
    layer = manifest.layers[1]
    raw = np.fromfile(store / layer.file, dtype=np.uint8)
    for e in (0, layer.num_experts - 1):
        record = raw[e * layer.record_bytes : (e + 1) * layer.record_bytes]
        for t in layer.tensors:
            expected = np.array(reference[f"{layer.module}.{t.name}"][e])
            got = record[t.offset : t.offset + t.nbytes].view(expected.dtype).reshape(t.shape)
            assert np.array_equal(got, expected), (e, t.name)


def test_mlx_community_source_is_copied_not_requantized(hf_dir, tmp_path):
    converted = build_quantized_checkpoint(hf_dir, tmp_path / "conv8", bits=8, group_size=32)
    out = tmp_path / "s8"
    pack(converted, out, PackOptions(bits=16, progress=False))  # 16: keep what the source has
    assert read_manifest(out).layers[0].quantization["bits"] == 8
    with pytest.raises(StoreError, match="already quantized at 8 bits"):
        pack(converted, tmp_path / "s4", PackOptions(bits=4, progress=False))
    assert not (tmp_path / "s4").exists()


def test_interrupted_pack_leaves_no_store(hf_dir, tmp_path, monkeypatch):
    import flashmoe_backend.store.pack as packing

    real = packing._write_layer
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(packing, "_write_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(hf_dir, tmp_path / "half", PackOptions(progress=False))
    # No store: only the hidden partial one a rerun resumes (tests/store/test_resume.py).
    assert os.listdir(tmp_path) == [".half.partial"]
    with pytest.raises(StoreError, match="no such store"):
        FlashMoE.load(tmp_path / "half")


def test_pack_refuses_bad_sources(hf_dir, tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
        "intermediate_size": 64, "num_attention_heads": 2, "rms_norm_eps": 1e-5,
        "vocab_size": 100, "num_key_value_heads": 2}))
    shutil.copy(hf_dir / "tokenizer.json", dense)
    mx.save_safetensors(str(dense / "model.safetensors"), {"x": mx.zeros(1)})
    with pytest.raises(StoreError, match=r"config\.json.*'llama'"):
        pack(dense, tmp_path / "out", PackOptions(progress=False))
    (dense / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    with pytest.raises(StoreError, match="no_such_arch"):
        pack(dense, tmp_path / "out", PackOptions(progress=False))
    with pytest.raises(StoreError, match="nowhere: no such checkpoint directory"):
        pack(tmp_path / "nowhere", tmp_path / "out", PackOptions(progress=False))
    no_tok = shutil.copytree(hf_dir, tmp_path / "notok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(StoreError, match="tokenizer"):
        pack(no_tok, tmp_path / "out", PackOptions(progress=False))
    with pytest.raises(StoreError, match="--bits 7"):
        pack(hf_dir, tmp_path / "out", PackOptions(bits=7, progress=False))
    assert not (tmp_path / "out").exists()


def test_truncated_expert_file(store_copy):
    layer = read_manifest(store_copy).layers[2]
    path = store_copy / layer.file
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(StoreError, match=rf"{layer.file}.*truncated"):
        FlashMoE.load(store_copy)
    assert main(["verify", str(store_copy), "-q"]) == 2


def test_flipped_byte_never_yields_tokens(store_copy, capsys):
    manifest = read_manifest(store_copy)
    for layer in manifest.layers:  # corrupt every expert of every layer: any read hits one
        with open(store_copy / layer.file, "r+b") as f:
            for e in range(layer.num_experts):
                f.seek(e * layer.record_bytes + 10)
                byte = f.read(1)
                f.seek(e * layer.record_bytes + 10)
                f.write(bytes([byte[0] ^ 0xFF]))
    engine = FlashMoE.load(store_copy)  # structure is fine; contents are checked on read
    produced = []
    with pytest.raises(StoreError, match=r"layer_000\.bin: checksum mismatch"):
        for item in engine.stream("hello", max_tokens=5):
            produced.append(item)
    assert produced == []
    report = verify_store(store_copy)
    assert not report.ok and len(report.bad) == sum(lay.num_experts for lay in manifest.layers)
    assert main(["verify", str(store_copy), "-q"]) == 1
    assert "CORRUPT" in capsys.readouterr().err


def test_one_flipped_byte_found_by_verify(store_copy):
    layer = read_manifest(store_copy).layers[1]
    with open(store_copy / layer.file, "r+b") as f:
        f.seek(3 * layer.record_bytes + 100)
        byte = f.read(1)
        f.seek(3 * layer.record_bytes + 100)
        f.write(bytes([byte[0] ^ 1]))
    report = verify_store(store_copy)
    assert report.bad == [(layer.file, 3)]


def test_manifest_disagreeing_with_config(store_copy):
    config_path = store_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["num_experts"] = 32
    config_path.write_text(json.dumps(config))
    with pytest.raises(StoreError, match=r"manifest\.json.*num_experts=32"):
        FlashMoE.load(store_copy)
    config["text_config"]["num_experts"] = 16
    config["text_config"]["hidden_size"] = 96
    config_path.write_text(json.dumps(config))
    with pytest.raises(StoreError, match="hidden_size=96"):
        FlashMoE.load(store_copy)


def test_missing_tokenizer_file(store_copy):
    (store_copy / "tokenizer_config.json").unlink()
    with pytest.raises(StoreError, match=r"tokenizer_config\.json: missing tokenizer file"):
        FlashMoE.load(store_copy)


def test_corrupt_manifest(store_copy):
    text = (store_copy / "manifest.json").read_text()
    (store_copy / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest\.json: not valid JSON"):
        FlashMoE.load(store_copy)
    (store_copy / "manifest.json").write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(StoreError, match=r"manifest\.json: not valid JSON \(.* line \d+ column \d+"):
        FlashMoE.load(store_copy)
    (store_copy / "manifest.json").write_text(json.dumps({"format": "flashmoe-store",
                                                          "version": 1}))
    with pytest.raises(StoreError, match="malformed manifest: missing field 'layers'; re-pack the store"):
        FlashMoE.load(store_copy)


def _set(path: str, value):
    """An edit of the manifest's data: the field at ``path`` ("layers.0.num_experts") set to
    ``value``, or removed when ``value`` is ``_DELETE``."""

    def edit(data):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in parents:
            data = data[key]
        if value is _DELETE:
            del data[last]
        else:
            data[last] = value

    return edit


_DELETE = object()

# (id, edit of manifest.json's data, the message after "manifest.json: ")
# fmt: off
MALFORMED_MANIFESTS = [
    ("num-experts-str", _set("layers.0.num_experts", "lots"),
     "malformed manifest: field 'layers[0].num_experts' must be a positive integer, got 'lots'; "
     "re-pack the store"),
    ("num-experts-float", _set("layers.1.num_experts", 15.5),
     "field 'layers[1].num_experts' must be a positive integer, got 15.5"),
    ("record-bytes-zero", _set("layers.0.record_bytes", 0),
     "field 'layers[0].record_bytes' must be a positive integer, got 0"),
    ("alignment-str", _set("alignment", "lots"), "field 'alignment' must be a positive integer, got 'lots'"),
    ("checksum-str", _set("layers.0.checksums.3", "x"),
     "field 'layers[0].checksums[3]' must be a CRC32 (an integer in [0, 2**32)), got 'x'"),
    ("checksums-not-list", _set("layers.0.checksums", 7),
     "field 'layers[0].checksums' must be a list of integers, got 7"),
    ("offset-str", _set("layers.0.tensors.0.offset", "x"),
     "field 'layers[0].tensors[0].offset' must be an integer >= 0, got 'x'"),
    ("shape-not-list", _set("layers.0.tensors.1.shape", 7),
     "field 'layers[0].tensors[1].shape' must be a list of integers, got 7"),
    ("dtype-not-str", _set("layers.0.tensors.0.dtype", 4),
     "field 'layers[0].tensors[0].dtype' must be a string, got 4"),
    ("layers-empty", _set("layers", []), "field 'layers' must be a non-empty list of objects, got []"),
    ("layer-not-object", _set("layers.0", "layer"), "field 'layers[0]' must be an object, got 'layer'"),
    ("file-missing", _set("layers.0.file", _DELETE), "malformed manifest: missing field 'layers[0].file'"),
    ("tokenizer-file-int", _set("tokenizer_files.0", 1),
     "field 'tokenizer_files[0]' must be a string, got 1"),
    ("version-unsupported", _set("version", 9),
     "store format version 9 is not supported (this flashmoe reads versions 1, 2); re-pack the model"),
]
# fmt: on


@pytest.mark.parametrize(
    ("edit", "message"), [pytest.param(*case[1:], id=case[0]) for case in MALFORMED_MANIFESTS]
)
def test_malformed_manifest_field_is_named(store_copy, capsys, edit, message):
    path = store_copy / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(StoreError) as caught:
        FlashMoE.load(store_copy)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    assert main(["info", str(store_copy)]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert err == f"flashmoe: error: {caught.value}\n"


def test_cli_pack_info_verify_generate(hf_dir, tmp_path, capsys):
    out = tmp_path / "cli-store"
    assert main(["pack", str(hf_dir), str(out), "--bits", "8", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "qwen3_5_moe" and info["experts_per_layer"] == 16
    assert info["expert_quantization"]["bits"] == 8
    assert info["expert_bytes"] == read_manifest(out).expert_bytes
    assert main(["verify", str(out), "-q"]) == 0
    assert main(["generate", str(out), "-p", "hello", "-m", "5", "--cache-gb", "0.001"]) == 0
    err = capsys.readouterr().err
    assert "generated 5 tok" in err and "misses" in err
    assert main(["pack", str(hf_dir), str(out)]) == 2  # destination exists: clear error
    assert "already exists" in capsys.readouterr().err
