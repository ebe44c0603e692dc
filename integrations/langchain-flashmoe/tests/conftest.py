"""Fixtures of the langchain-flashmoe tests: one tiny packed store per session, built offline.

``tiny_store`` is a store packed from the random-weights Qwen3.5-MoE fixture checkpoint of
``tests.fixtures.tiny``; ``tiny_store_copy`` is the same store at a second path (a second engine
in the registry, used for per-call ``model`` overrides). Both are read-only.
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Importable without an install (the repository's own test run); an installed copy is the same code.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
if _PACKAGE_ROOT not in sys.path:
    sys.path.insert(0, _PACKAGE_ROOT)

#: Expert cache budget of the tests: 80% of the tiny store's expert bytes (~0.5 MiB), so that every
#: generation streams experts from disk and evicts.
CACHE_GB = 0.0004


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """Run the coroutine tests of this directory (langchain-tests' async tests included) under
    pytest-asyncio without asking the whole repository for ``asyncio_mode = "auto"``."""
    outcome = yield
    items = outcome.get_result()
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(getattr(item, "obj", None)):
            item.add_marker(pytest.mark.asyncio)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Apply a test module's ``EXPECTED_FAILURES`` (test name, with or without its parameters, ->
    xfail mark), so that inherited standard tests are marked without being overridden."""
    here = Path(__file__).parent
    for item in items:
        if here not in Path(str(item.path)).parents:
            continue
        expected = getattr(getattr(item, "module", None), "EXPECTED_FAILURES", None)
        if not expected or not isinstance(item, pytest.Function):
            continue
        mark = expected.get(item.name) or expected.get(item.originalname)
        if mark is not None:
            item.add_marker(mark)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import flashmoe_backend
    from tests.fixtures.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("lc-flashmoe")
    hf = build_tiny_checkpoint(root / "hf", "qwen3_5_moe", seed=0)
    store = root / "store"
    flashmoe_backend.pack(hf, store, flashmoe_backend.PackOptions(bits=4, group_size=32, progress=False))
    expert_bytes = sum(f.stat().st_size for f in (store / "experts").rglob("*") if f.is_file())
    assert expert_bytes > CACHE_GB * 1024**3, "the cache budget must be smaller than the experts"
    return store


@pytest.fixture(scope="session")
def cache_gb() -> float:
    return CACHE_GB


@pytest.fixture(scope="session")
def tiny_store_copy(tiny_store: Path) -> Path:
    copy = tiny_store.parent / "store-copy"
    if not copy.exists():
        shutil.copytree(tiny_store, copy)
    return copy


@pytest.fixture(scope="class")
def store_paths(request: pytest.FixtureRequest, tiny_store: Path, tiny_store_copy: Path) -> None:
    """Give a test class ``store``, ``store_copy`` and ``cache_gb`` attributes (for its properties)."""
    request.cls.store = str(tiny_store)
    request.cls.store_copy = str(tiny_store_copy)
    request.cls.cache_gb = CACHE_GB


@pytest.fixture(scope="class")
def demo_store_paths(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Like ``store_paths``, with flashmoe's embedded trained demo model (its store and a copy)."""
    from flashmoe_backend.store.format import read_manifest
    from flashmoe_backend.store.source import default_store

    store = default_store()
    copy = tmp_path_factory.mktemp("lc-demo") / "store-copy"
    shutil.copytree(store, copy)
    request.cls.store = str(store)
    request.cls.store_copy = str(copy)
    request.cls.cache_gb = read_manifest(store).expert_bytes / 4 / 1024**3  # a quarter: real streaming
