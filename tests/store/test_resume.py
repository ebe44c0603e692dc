"""A resumable pack: killed mid-layer, run again, it verifies the finished layers, resumes at the
first unfinished one and produces the store an uninterrupted pack produces, byte for byte.

The source is a tiny float32 Hugging Face Qwen3.5-MoE checkpoint (4 MoE layers of 16 experts),
quantized while packing, as a bf16 checkpoint of the real model would be.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flashmoe_backend import FlashMoE, PackOptions, StoreError, pack
from flashmoe_backend.cli.commands import main
from flashmoe_backend.store.format import read_manifest
from tests.fixtures.tiny import reshard_checkpoint

RECORDS_PER_LAYER = 16  # the fixture's experts per layer


@pytest.fixture(scope="module")
def hf(tiny_hf_dir, tmp_path_factory) -> Path:
    """The HF checkpoint in 3 shards (read-only)."""
    return reshard_checkpoint(tiny_hf_dir("qwen3_5_moe", seed=3), tmp_path_factory.mktemp("resume") / "hf")


@pytest.fixture(scope="module")
def reference(hf, tmp_path_factory) -> Path:
    """The store an uninterrupted pack makes."""
    out = tmp_path_factory.mktemp("reference") / "store"
    pack(hf, out, PackOptions(progress=False))
    return out


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _assert_identical(store: Path, reference: Path) -> None:
    ours, theirs = _files(store), _files(reference)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name] == theirs[name], name
    assert read_manifest(store).to_json() == read_manifest(reference).to_json()


def _pack_quietly(src: Path, dst: Path, **options) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        pack(src, dst, PackOptions(progress=False, **options))
    return err.getvalue()


def _count_layer_writes(monkeypatch) -> list[str]:
    import flashmoe_backend.store.pack as packing

    real, written = packing._write_layer, []

    def spy(path, switch, out):
        written.append(out.name)
        return real(path, switch, out)

    monkeypatch.setattr(packing, "_write_layer", spy)
    return written


def _interrupt_after(monkeypatch, records: int) -> None:
    """Raise KeyboardInterrupt in the middle of packing, after ``records`` expert records."""
    import flashmoe_backend.store.pack as packing

    real, count = packing.checksum, [0]

    def counting(buffer):
        count[0] += 1
        if count[0] > records:
            raise KeyboardInterrupt
        return real(buffer)

    monkeypatch.setattr(packing, "checksum", counting)


def test_killed_pack_resumes_and_matches_an_uninterrupted_one(hf, reference, tmp_path, monkeypatch):
    dst = tmp_path / "store"
    # A child process SIGKILLed in the middle of layer 2's records: no cleanup of any kind runs.
    child = textwrap.dedent(f"""
        import os, signal
        import mlx.core as mx
        mx.set_default_device(mx.cpu)
        import flashmoe_backend.store.pack as packing
        real, count = packing.checksum, [0]
        def dying(buffer):
            count[0] += 1
            if count[0] == {2 * RECORDS_PER_LAYER + 5}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(buffer)
        packing.checksum = dying
        packing.pack({str(hf)!r}, {str(dst)!r}, packing.PackOptions(progress=False))
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=os.getcwd())
    assert done.returncode == -signal.SIGKILL, done.stderr
    partial = tmp_path / ".store.partial"
    assert sorted(os.listdir(tmp_path)) == [".store.partial"]  # no store: nothing loadable
    assert (partial / "experts" / "layer_002.bin").is_file()  # killed while writing it
    with pytest.raises(StoreError, match="no such store"):
        FlashMoE.load(dst)
    written = _count_layer_writes(monkeypatch)
    notices = _pack_quietly(hf, dst)
    assert f"resuming the partial pack in {partial}: 2 finished layer(s) verified" in notices
    assert written == ["layer_002.bin", "layer_003.bin"]  # resumed at the first unfinished layer
    assert not partial.exists()
    _assert_identical(dst, reference)


def test_a_damaged_finished_layer_is_written_again(hf, reference, tmp_path, monkeypatch):
    dst = tmp_path / "store"
    _interrupt_after(monkeypatch, 3 * RECORDS_PER_LAYER + 1)
    with pytest.raises(KeyboardInterrupt):
        _pack_quietly(hf, dst)
    monkeypatch.undo()
    layer = tmp_path / ".store.partial" / "experts" / "layer_001.bin"
    data = bytearray(layer.read_bytes())
    data[5000] ^= 0x01
    layer.write_bytes(bytes(data))
    written = _count_layer_writes(monkeypatch)
    notices = _pack_quietly(hf, dst)
    assert "1 finished layer(s) verified, 2 to write again" in notices
    assert "layer_001.bin: expert 1 fails its checksum" in notices
    assert written == ["layer_001.bin", "layer_002.bin", "layer_003.bin"]
    _assert_identical(dst, reference)


def test_a_partial_pack_with_other_options_is_discarded(hf, tmp_path, monkeypatch):
    dst = tmp_path / "store"
    _interrupt_after(monkeypatch, RECORDS_PER_LAYER + 2)
    with pytest.raises(KeyboardInterrupt):
        _pack_quietly(hf, dst)
    monkeypatch.undo()
    notices = _pack_quietly(hf, dst, bits=8)
    assert "discarding the partial pack" in notices
    assert read_manifest(dst).layers[0].quantization["bits"] == 8


def test_delete_source_shards_after_they_are_in_the_store(hf, reference, tmp_path, monkeypatch, capsys):
    src = Path(shutil.copytree(hf, tmp_path / "src"))
    dst = tmp_path / "store"
    # Interrupted after layer 1: the shards holding only finished layers are gone already ...
    _interrupt_after(monkeypatch, 2 * RECORDS_PER_LAYER + 3)
    with pytest.raises(KeyboardInterrupt):
        _pack_quietly(src, dst, delete_source_shards=True)
    monkeypatch.undo()
    left = sorted(p.name for p in src.glob("model*.safetensors"))
    assert len(left) < 3
    # ... and the resumed pack neither needs them nor differs for their absence.
    assert main(["pack", str(src), str(dst), "--delete-source-shards"]) == 0
    assert "deleted" in capsys.readouterr().err
    assert list(src.glob("model*.safetensors")) == []
    _assert_identical(dst, reference)


def test_two_packs_to_one_destination(hf, tmp_path, monkeypatch):
    import fcntl

    dst = tmp_path / "store"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _pack_quietly(hf, dst)
    monkeypatch.undo()
    fd = os.open(tmp_path / ".store.partial", os.O_RDONLY)  # as a pack still running holds it
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(StoreError, match=r"\.store\.partial: another flashmoe pack is writing"):
            _pack_quietly(hf, dst)
    finally:
        os.close(fd)
    _pack_quietly(hf, dst)
    assert read_manifest(dst).layers
