"""Fixtures of the LlamaIndex integration tests: one tiny random-weights Qwen3.5-MoE store per
session, and ``FlashMoE`` LLMs over it with an expert cache smaller than the experts."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

# Work from a plain checkout too (without `pip install -e integrations/llama-index-llms-flashmoe`):
# llama_index is a namespace package, so the integration's folder can simply join sys.path.
def _installed() -> bool:
    try:
        return importlib.util.find_spec("llama_index.llms.flashmoe") is not None
    except ModuleNotFoundError:  # no llama_index.llms package at all
        return False


if not _installed():  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed tiny Qwen3.5-MoE store (4-bit experts), built once per session."""
    from flashmoe_backend import PackOptions, pack
    from tests.fixtures.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("llama-index-flashmoe")
    hf = build_tiny_checkpoint(root / "hf", "qwen3_5_moe", seed=0)
    out = root / "store"
    pack(hf, out, PackOptions(bits=4, group_size=32, progress=False))
    return out


@pytest.fixture(scope="session")
def cache_gb(store: Path) -> float:
    """Half the store's expert bytes, so the cache really evicts."""
    expert_bytes = sum(p.stat().st_size for p in (store / "experts").rglob("*") if p.is_file())
    assert expert_bytes > 0
    return expert_bytes / 2 / 1024**3


@pytest.fixture(scope="session")
def make_llm(store: Path, cache_gb: float) -> Callable[..., object]:
    """``make_llm(**fields) -> FlashMoE`` over the tiny store: greedy, no thinking, short."""
    from llama_index.llms.flashmoe import FlashMoE

    def make(**fields: object) -> FlashMoE:
        options = {"model": str(store), "cache_gb": cache_gb, "temperature": 0.0,
                   "max_tokens": 16, "enable_thinking": False}
        options.update(fields)
        return FlashMoE(**options)

    return make


@pytest.fixture
def llm(make_llm: Callable[..., object]) -> object:
    return make_llm()
