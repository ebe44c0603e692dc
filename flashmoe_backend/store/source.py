"""Where a model comes from: a store directory, or the name of the embedded demo store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flashmoe_backend.errors import ParameterError, StoreNotFoundError
from flashmoe_backend.store.format import MANIFEST

DEMO_STORE = Path(__file__).parent.parent / "assets" / "demo-qwen3_5_moe-4bit"
DEMO_NAME = "demo"  # what the commands accept for DEMO_STORE wherever they take a STORE


def default_store() -> Path:
    """The embedded default model's store (read-only, inside the package)."""
    return DEMO_STORE


def find_store(store: Any) -> Path:
    """The store directory of ``store`` (a path, or ``"demo"``: the embedded demo store, as on the
    command line); ``StoreNotFoundError`` (a ``FileNotFoundError`` and a ``StoreError``) when
    there is no directory or no manifest in it."""
    if not isinstance(store, (str, os.PathLike)):
        raise ParameterError(f"store must be a path to a store directory, got {type(store).__name__}")
    if store == DEMO_NAME:
        return default_store()
    path = Path(store).expanduser()
    if not path.is_dir():
        raise StoreNotFoundError(f"{path}: no such store directory; make a store with `flashmoe pack`")
    if not (path / MANIFEST).is_file():
        raise StoreNotFoundError(
            f"{path}: not a flashmoe store (no {MANIFEST}); make one with `flashmoe pack`"
        )
    return path
