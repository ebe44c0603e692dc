"""Hugging Face repo ids: resolved from the local cache through huggingface_hub, offline; never
downloaded unless asked (``flashmoe download`` or ``--download``); ``flashmoe verify`` checks each
shard against the sha256 its blob is named by.

The cache is a fake one built on the fly (``tests.fixtures.tiny.fake_hf_cache``); no test
touches the network (the loads run under flashmoe's network guard).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashmoe_backend import FlashMoE, StoreNotFoundError
from flashmoe_backend.cli.commands import main
from flashmoe_backend.offline import NetworkGuard
from tests.fixtures.tiny import fake_hf_cache, reshard_checkpoint

REPO = "mlx-community/Tiny-Qwen3-MoE-4bit"
REVISION = "1234567890abcdef1234567890abcdef12345678"
PROMPT = [5, 17, 42, 99, 7, 250, 31, 64]


@pytest.fixture(scope="module")
def checkpoint(tiny_quantized_dir, tmp_path_factory) -> Path:
    return reshard_checkpoint(tiny_quantized_dir("qwen3_moe"), tmp_path_factory.mktemp("hub") / "ckpt")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, checkpoint) -> Path:
    """A fake Hugging Face cache holding REPO, in effect as HF_HUB_CACHE (huggingface_hub reads
    its environment at import, so its constant is set too)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    fake_hf_cache(cache, REPO, checkpoint, REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_repo_id_loads_offline_from_the_cache(hf_cache, checkpoint):
    with NetworkGuard() as guard:
        engine = FlashMoE.load(REPO, cache_gb=0.001)
        try:
            repo_dir = hf_cache / "models--mlx-community--Tiny-Qwen3-MoE-4bit"
            assert engine.store == repo_dir / "snapshots" / REVISION
            ids = engine.generate(PROMPT, max_tokens=8).token_ids
        finally:
            engine.close()
    assert not guard.blocked
    direct = FlashMoE.load(checkpoint, cache_gb=0.001)
    try:
        assert direct.generate(PROMPT, max_tokens=8).token_ids == ids
    finally:
        direct.close()
    # Nothing of ours inside the snapshot or the cache.
    assert sorted(p.name for p in engine.store.iterdir()) == sorted(p.name for p in checkpoint.iterdir())


def test_repo_not_cached_says_how_to_download(hf_cache):
    with NetworkGuard() as guard, pytest.raises(
        StoreNotFoundError,
        match=r"org/missing: no such store or checkpoint directory, and not in the local Hugging Face "
        r"cache \(.*hf-cache\); download it with `flashmoe download org/missing` \(or pass --download\)",
    ):
        FlashMoE.load("org/missing")
    assert not guard.blocked


def test_not_cached_never_downloads_silently(hf_cache, monkeypatch, capsys):
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    code = main(["info", "org/missing"])
    assert code == 2
    assert "flashmoe download org/missing" in capsys.readouterr().err
    assert calls and all(c.get("local_files_only") for c in calls)


def test_download_only_when_asked(hf_cache, checkpoint, monkeypatch, capsys, tmp_path):
    import huggingface_hub

    fetched = []

    def fake_download(repo, *, revision=None, local_files_only=False, **kwargs):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        fetched.append((repo, revision, kwargs.get("allow_patterns")))
        return str(fake_hf_cache(hf_cache, repo, checkpoint, REVISION))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert main(["info", "org/new", "--json"]) == 2  # not cached, not asked: refused
    assert fetched == []
    assert main(["download", "org/new"]) == 0
    assert fetched[0][0] == "org/new" and "model*.safetensors" in fetched[0][2]
    assert "flashmoe chat org/new" in capsys.readouterr().out
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _cached_or(fake_download, hf_cache))
    fetched.clear()
    assert main(["generate", "org/other", "-p", "Hi", "-m", "2", "--cache-gb", "0.001", "--download"]) == 0
    assert [f[0] for f in fetched] == ["org/other"]


def _cached_or(download, cache: Path):
    """A snapshot_download that finds what the fake cache holds, and else calls ``download``."""
    def lookup(repo, *, revision=None, local_files_only=False, **kwargs):
        snapshot = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / REVISION
        if local_files_only and snapshot.is_dir():
            return str(snapshot)
        return download(repo, revision=revision, local_files_only=local_files_only, **kwargs)
    return lookup


def test_verify_checks_blob_sha256(hf_cache, capsys):
    assert main(["verify", REPO, "-q"]) == 0
    assert "3 weight files, 3 checked against their Hugging Face sha256" in capsys.readouterr().out
    snapshot = hf_cache / "models--mlx-community--Tiny-Qwen3-MoE-4bit" / "snapshots" / REVISION
    shard = sorted(snapshot.glob("model-*.safetensors"))[1]
    blob = shard.resolve()
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01  # in the data, not the header: the checkpoint still opens
    blob.write_bytes(bytes(data))
    assert main(["verify", REPO, "-q"]) == 1
    err = capsys.readouterr().err
    assert f"CORRUPT {shard}: sha256 " in err and f"differs from {blob.name}" in err


def test_hf_home_is_honoured_by_a_fresh_process(checkpoint, tmp_path):
    home = tmp_path / "hf-home"
    fake_hf_cache(home / "hub", REPO, checkpoint, REVISION)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", FLASHMOE_HOME=str(tmp_path / "fm"))
    done = subprocess.run([sys.executable, "-m", "flashmoe_backend.cli", "info", REPO, "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f'"path": "{home / "hub"}' in done.stdout and '"moe_layers": 4' in done.stdout
