"""Packing: quantization chosen per tensor, `info` per tensor kind, the disk-space check, and
bad input named before anything is written.

The checkpoints are tiny float32 Qwen3.5-MoE models (hidden 64, experts 32 wide by default),
so at the default group size 64 the experts' and the shared expert's ``down_proj`` (input 32)
need group 32.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import stream_generate

from flashmoe_backend import FlashMoE, PackOptions, StoreError, pack
from flashmoe_backend.cli.commands import main
from flashmoe_backend.store.format import (
    LayerSpec,
    layer_quantization,
    read_manifest,
    required_version,
    tensor_kind,
)
from flashmoe_backend.store.pack import choose_group_size

PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 128, 3, 77, 11]
G32 = {"group_size": 32, "bits": 4, "mode": "affine"}
G64 = {"group_size": 64, "bits": 4, "mode": "affine"}


def _pack(src: Path, dst: Path, **options) -> list[str]:
    """Pack; returns the lines pack printed to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        pack(src, dst, PackOptions(progress=False, **options))
    return [line for line in err.getvalue().splitlines() if line.startswith("flashmoe pack:")]


@pytest.fixture(scope="module")
def hf(tiny_hf_dir) -> Path:
    return tiny_hf_dir("qwen3_5_moe", seed=2)


@pytest.fixture(scope="module")
def packed64(hf, tmp_path_factory) -> tuple[Path, list[str]]:
    """The checkpoint packed at the default 4-bit group 64, and pack's notices."""
    out = tmp_path_factory.mktemp("packing") / "g64"
    return out, _pack(hf, out)


def _greedy(model, tokenizer, n: int) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, mx.array(PROMPT), max_tokens=n)]


def _assert_generates_like(store: Path, reference: Path, n: int = 24) -> None:
    ref, tokenizer = mlx_lm.load(str(reference))
    result = FlashMoE.load(store, cache_gb=0.01).generate(PROMPT, max_tokens=n)
    assert len(result.token_ids) >= 8
    assert result.token_ids == _greedy(ref, tokenizer, n)[: len(result.token_ids)]


# -- pure helpers ------------------------------------------------------------------------------


def test_choose_group_size():
    assert choose_group_size(4096, 64) == 64  # the requested one when it divides
    assert choose_group_size(32, 64) == 32
    assert choose_group_size(192, 128) == 64  # else the largest that divides
    assert choose_group_size(384, 32) == 32
    assert choose_group_size(48, 64) is None  # none divides: keep it in float
    assert choose_group_size(48, 64, mode="mxfp4") is None
    assert choose_group_size(64, 32, mode="mxfp4") == 32  # other modes: their own group only


def test_layer_quantization_is_mlx_lm_style():
    uniform = layer_quantization({"gate_proj": G64, "up_proj": G64, "down_proj": G64})
    assert uniform == G64
    mixed = layer_quantization({"gate_proj": G64, "up_proj": G64, "down_proj": G32})
    assert mixed == {**G64, "down_proj": G32}
    floated = layer_quantization({"gate_proj": G64, "up_proj": G64, "down_proj": None})
    assert floated == {**G64, "down_proj": False}
    assert layer_quantization({"gate_proj": None, "down_proj": None}) is None
    # Only overrides need format version 2; a uniform store stays readable by older readers.
    spec = lambda q: LayerSpec("m", "experts/layer_000.bin", 1, 4096, [], q)  # noqa: E731
    assert required_version([spec(uniform), spec(None)]) == 1
    assert required_version([spec(uniform), spec(mixed)]) == 2


def test_tensor_kinds():
    experts = {"language_model.model.layers.0.mlp.switch_mlp"}
    assert tensor_kind("language_model.model.layers.0.mlp.switch_mlp.down_proj", experts) == (
        "experts",
        "down_proj",
    )
    assert tensor_kind("model.layers.3.self_attn.q_proj") == ("attention", "q_proj")
    assert tensor_kind("model.layers.0.linear_attn.in_proj_qkv") == ("attention", "in_proj_qkv")
    assert tensor_kind("model.layers.0.mlp.shared_expert.down_proj") == ("shared expert", "down_proj")
    assert tensor_kind("model.layers.0.mlp.gate") == ("router", "gate")
    assert tensor_kind("model.layers.0.mlp.shared_expert_gate") == ("router", "shared_expert_gate")
    assert tensor_kind("language_model.model.embed_tokens") == ("embed", "embed_tokens")
    assert tensor_kind("language_model.lm_head") == ("lm_head", "lm_head")


# -- the fallback group size -------------------------------------------------------------------


def test_fallback_group_size_is_recorded_per_tensor(packed64):
    store, notices = packed64
    manifest = read_manifest(store)
    assert manifest.version == 2  # per-tensor overrides: older readers refuse it cleanly
    for layer in manifest.layers:
        assert layer.quantization == {**G64, "down_proj": G32}
        assert layer.module_quantization("gate_proj") == G64
        assert layer.module_quantization("down_proj") == G32
    q = json.loads((store / "config.json").read_text())["quantization"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == G64
    for layer in manifest.layers:  # mlx-lm's per-module entries, for experts and resident alike
        assert q[f"{layer.module}.down_proj"] == G32
        assert f"{layer.module}.gate_proj" not in q  # the default needs no entry
        shared = layer.module.replace("switch_mlp", "shared_expert") + ".down_proj"
        assert q[shared] == G32
    assert notices == [
        "flashmoe pack: experts down_proj: input size 32 is not a multiple of group size 64; "
        "quantized 4-bit g32 instead (4 modules)",
        "flashmoe pack: shared expert down_proj: input size 32 is not a multiple of group size 64; "
        "quantized 4-bit g32 instead (4 modules)",
    ]
    assert main(["verify", str(store), "-q"]) == 0


def test_fallback_store_generates_like_mlx_lm_quantized_the_same_way(hf, packed64, tmp_path):
    """The oracle: mlx_lm.convert with a predicate giving each module the same choice."""
    store, _ = packed64

    def same_choice(path, module):
        group = 64 if module.weight.shape[-1] % 64 == 0 else 32
        return {"group_size": group, "bits": 8 if path.endswith(("mlp.gate", "shared_expert_gate")) else 4}

    reference = tmp_path / "ref"
    with contextlib.redirect_stdout(io.StringIO()):
        mlx_lm.convert(
            str(hf),
            str(reference),
            quantize=True,
            q_bits=4,
            q_group_size=32,
            dtype="float32",
            quant_predicate=same_choice,
        )
    weights = mx.load(str(reference / "model.safetensors"))
    for key, value in mx.load(str(store / "model.safetensors")).items():
        assert mx.array_equal(value, weights[key]), key
    layer = read_manifest(store).layers[0]
    records = np.fromfile(store / layer.file, dtype=np.uint8).reshape(layer.num_experts, -1)
    for t in layer.tensors:
        expected = np.array(weights[f"{layer.module}.{t.name}"])
        got = records[:, t.offset : t.offset + t.nbytes].copy().view(expected.dtype)
        assert np.array_equal(got.reshape(expected.shape), expected), t.name
    _assert_generates_like(store, reference)


def test_plain_mlx_lm_reads_the_stores_per_tensor_config(packed64, tmp_path):
    """config.json records the choice the way mlx-lm's loader reads it: the store's resident
    weights plus its experts stacked back as `switch_mlp` tensors load in mlx-lm as they are."""
    store, _ = packed64
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in store.iterdir():
        if f.is_file() and f.name not in ("manifest.json", "model.safetensors"):
            shutil.copy(f, flat / f.name)
    weights = dict(mx.load(str(store / "model.safetensors")))
    for layer in read_manifest(store).layers:
        records = np.fromfile(store / layer.file, dtype=np.uint8).reshape(layer.num_experts, -1)
        for t in layer.tensors:
            block = records[:, t.offset : t.offset + t.nbytes].copy().view(t.dtype)
            weights[f"{layer.module}.{t.name}"] = mx.array(block.reshape(layer.num_experts, *t.shape))
    mx.save_safetensors(str(flat / "model.safetensors"), weights, metadata={"format": "mlx"})
    _assert_generates_like(store, flat)


def test_info_shows_quantization_per_tensor_kind(packed64, capsys):
    store, _ = packed64
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    for line in (
        "experts gate/up: 4-bit g64, down: 4-bit g32",
        "attention: 4-bit g64",
        "shared expert gate/up: 4-bit g64, down: 4-bit g32",
        "router: 8-bit g64",
        "embed: 4-bit g64",
        "lm_head: 4-bit g64",
    ):
        assert re.search(rf"^(quantization)?\s+{re.escape(line)}$", out, re.MULTILINE), line
    assert main(["info", str(store), "--json"]) == 0
    quantization = json.loads(capsys.readouterr().out)["quantization"]
    assert quantization["experts"] == "gate/up: 4-bit g64, down: 4-bit g32"
    assert quantization["attention"] == "4-bit g64"


def test_no_group_size_divides_keeps_the_tensor_float(tiny_hf_dir, tiny_quantized_dir, tmp_path, capsys):
    """Experts 48 wide: no group size divides, so down_proj stays float, as mlx-lm leaves it."""
    hf48 = tiny_hf_dir("qwen3_5_moe", seed=2, moe_intermediate_size=48)
    store = tmp_path / "s48"
    notices = _pack(hf48, store)
    assert notices == [
        f"flashmoe pack: {kind} down_proj: input size 48 is not a multiple of any group size MLX "
        f"supports (32, 64, 128); kept unquantized (4 modules)"
        for kind in ("experts", "shared expert")
    ]
    manifest = read_manifest(store)
    assert all(layer.quantization == {**G64, "down_proj": False} for layer in manifest.layers)
    q = json.loads((store / "config.json").read_text())["quantization"]
    assert all(q[f"{layer.module}.down_proj"] is False for layer in manifest.layers)
    # mlx_lm.convert at group 64 leaves exactly these in float: the same model.
    _assert_generates_like(
        store, tiny_quantized_dir("qwen3_5_moe", group_size=64, seed=2, moe_intermediate_size=48)
    )
    capsys.readouterr()
    assert main(["info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantization"]["experts"] == "gate/up: 4-bit g64, down: unquantized float32"


def test_mlx_community_source_with_a_float_down_proj(tiny_quantized_dir, tmp_path):
    """mlx_lm.convert at group 64 silently left down_proj in float: the copy records that."""
    source = tiny_quantized_dir("qwen3_5_moe", group_size=64, seed=2)
    store = tmp_path / "community"
    assert _pack(source, store) == []  # copied as it is: nothing was chosen here
    for layer in read_manifest(store).layers:
        assert layer.quantization == {**G64, "down_proj": False}
    _assert_generates_like(store, source)


def test_misrecorded_store_names_the_tensor(tiny_quantized_dir, tmp_path):
    """A store packed before per-tensor quantization: one quantization for a whole layer whose
    down_proj is float. Loading names that tensor instead of failing inside mlx-lm."""
    store = tmp_path / "old"
    _pack(tiny_quantized_dir("qwen3_5_moe", group_size=64, seed=2), store)
    path = store / "manifest.json"
    data = json.loads(path.read_text())
    for layer in data["layers"]:
        del layer["quantization"]["down_proj"]
    data["version"] = 1
    path.write_text(json.dumps(data))
    message = (
        r"manifest\.json: language_model\.model\.layers\.0\.mlp\.switch_mlp\.down_proj is stored "
        r"unquantized \(no down_proj\.scales\) but the manifest says 4-bit g64; .* re-pack it"
    )
    with pytest.raises(StoreError, match=message):
        FlashMoE.load(store)
    assert main(["verify", str(store), "-q"]) == 2
    data["layers"][0]["quantization"] = {"group_size": "64", "bits": 4}
    path.write_text(json.dumps(data))
    with pytest.raises(
        StoreError, match=r"switch_mlp\.down_proj: malformed quantization \{'group_size': '64', 'bits': 4\}"
    ):
        FlashMoE.load(store)


# -- disk space --------------------------------------------------------------------------------


def test_refuses_without_disk_space_and_writes_nothing(hf, packed64, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    asked = []

    def full_disk(path):
        asked.append(Path(path))
        return usage(10**9, 10**9 - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", full_disk)
    dst = tmp_path / "not" / "yet" / "store"
    with pytest.raises(StoreError) as refused:
        pack(hf, dst, PackOptions(progress=False))
    message = str(refused.value)
    assert message.startswith(f"{dst}: not enough free disk space")
    assert f"but {tmp_path} has 1,000 bytes free" in message
    assert asked == [tmp_path]  # the nearest existing parent of the destination
    assert os.listdir(tmp_path) == []  # no store, no partial directory, no parent made
    # The estimate covers the real store (same checkpoint and options) with little to spare.
    needed = int(re.search(r"needs about ([\d,]+) bytes", message).group(1).replace(",", ""))
    store, _ = packed64
    actual = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert actual <= needed <= actual + 2 * 2**20
    assert main(["pack", str(hf), str(dst)]) == 2
    assert "not enough free disk space" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# -- bad input ---------------------------------------------------------------------------------


def _edit_config(edit):
    def apply(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        edit(config)
        (d / "config.json").write_text(json.dumps(config))

    return apply


def _edit_weights(edit):
    def apply(d: Path) -> None:
        weights = dict(mx.load(str(d / "model.safetensors")))
        edit(weights)
        mx.save_safetensors(str(d / "model.safetensors"), weights)

    return apply


def _truncate(d: Path) -> None:
    path = d / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def _garbage_header(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json........")


_DOWN = "model.language_model.layers.1.mlp.experts.down_proj"

BAD_SOURCES = {
    "config is not an object": (
        lambda d: (d / "config.json").write_text("[1]"),
        r"config\.json: must hold a JSON object, not list",
    ),
    "quantization field": (
        _edit_config(lambda c: c.update(quantization=4)),
        r"config\.json: field 'quantization' must be an object with integer 'bits'",
    ),
    "field of the wrong type": (
        _edit_config(lambda c: c["text_config"].update(hidden_size="64")),
        r"config\.json: field 'text_config\.hidden_size' must be an integer, got '64'",
    ),
    "truncated weights": (_truncate, r"model\.safetensors: tensor '.*' has data offsets .* truncated"),
    "corrupt header": (_garbage_header, r"model\.safetensors: not a readable safetensors file"),
    "missing tensor": (
        _edit_weights(lambda w: w.pop(_DOWN)),
        r"tensor 'language_model\.model\.layers\.1\.mlp\.experts\.down_proj' \(mlx-lm's "
        r"name\) is missing from the weight files",
    ),
    "wrong shape": (
        _edit_weights(lambda w: w.update({_DOWN: w[_DOWN][:, :, :16]})),
        r"Expected shape \(16, 64, 32\) but received shape \(16, 64, 16\) for parameter "
        r"language_model\.model\.layers\.1\.mlp\.switch_mlp\.down_proj\.weight",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_is_named_and_nothing_is_written(hf, tmp_path, case):
    damage, message = BAD_SOURCES[case]
    src = shutil.copytree(hf, tmp_path / "src")
    damage(src)
    out = tmp_path / "out"
    with pytest.raises(StoreError, match=message):
        pack(src, out / "store", PackOptions(progress=False))
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param(
            dict(group_size=48),
            r"--group-size 48 is not supported; choose one of \(32, 64, 128\)",
            id="group-size-48",
        ),
        pytest.param(
            dict(dtype="float8"),
            r"--dtype 'float8' is not supported; choose one of float16, bfloat16",
            id="dtype-float8",
        ),
    ],
)
def test_bad_options(hf, tmp_path, options, message):
    with pytest.raises(StoreError, match=message):
        pack(hf, tmp_path / "out", PackOptions(progress=False, **options))
    assert os.listdir(tmp_path) == []


def test_destination_under_a_file(hf, tmp_path):
    (tmp_path / "file").write_text("")
    dst = tmp_path / "file" / "sub" / "store"
    with pytest.raises(StoreError, match=rf"file: is not a directory; cannot create {dst} under it"):
        pack(hf, dst, PackOptions(progress=False))
    assert os.listdir(tmp_path) == ["file"]


def test_destination_not_writable(hf, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *_args, **_kwargs: False)  # root may write anywhere
    dst = tmp_path / "store"
    with pytest.raises(StoreError, match=rf"{tmp_path}: not writable; cannot create {dst} there"):
        pack(hf, dst, PackOptions(progress=False))
    assert os.listdir(tmp_path) == []
