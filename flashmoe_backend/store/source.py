"""Where a model comes from: a store directory, a checkpoint directory read in place, a Hugging
Face repo id, or the name of the embedded demo store.

``find_source`` turns what a user typed into a directory; ``open_source`` opens it as the
``ExpertSource`` (``store/layout.py``) the engine runs: a ``PackedStore`` when the directory holds
a flashmoe manifest, else a ``Checkpoint`` read in place (``store/checkpoint.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flashmoe_backend.errors import ParameterError, StoreNotFoundError
from flashmoe_backend.store.format import CONFIG, MANIFEST

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


def repo_id_of(source: Any) -> str | None:
    """``source`` as a Hugging Face repo id (``org/name``) when it names no existing path and
    reads as one, else None."""
    from flashmoe_backend.store.hub import is_repo_id

    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if text is None or not is_repo_id(text) or Path(text).expanduser().exists():
        return None
    return text


def find_source(source: Any) -> Path:
    """The directory of a model source: a store directory (``manifest.json``), a checkpoint
    directory (``config.json``: an mlx-community checkpoint, read in place), a Hugging Face repo id
    ``org/name`` (its snapshot in the local Hugging Face cache; nothing is downloaded), or
    ``"demo"``. ``StoreNotFoundError`` (a ``FileNotFoundError`` and a ``StoreError``) when there
    is none, saying how to make or get one."""
    if not isinstance(source, (str, os.PathLike)):
        raise ParameterError(f"store must be a path to a store directory, got {type(source).__name__}")
    if source == DEMO_NAME:
        return default_store()
    path = Path(source).expanduser()
    if not path.exists() and (repo := repo_id_of(source)) is not None:
        from flashmoe_backend.store.hub import cached_snapshot

        return cached_snapshot(repo)
    if not path.is_dir():
        raise StoreNotFoundError(f"{path}: no such store directory; make a store with `flashmoe pack`")
    if not (path / MANIFEST).is_file() and not (path / CONFIG).is_file():
        raise StoreNotFoundError(
            f"{path}: not a flashmoe store (no {MANIFEST}) nor a model checkpoint (no {CONFIG}); "
            f"make a store with `flashmoe pack`, or pass an mlx-community checkpoint directory"
        )
    return path


def is_packed_store(path: Path) -> bool:
    """Whether the directory ``find_source`` returned is a packed store (else a checkpoint)."""
    return (Path(path) / MANIFEST).is_file()


def open_source(source: Any):
    """The ``ExpertSource`` of ``source`` (anything ``find_source`` takes), read and checked:
    a ``PackedStore`` or a ``Checkpoint`` read in place. ``StoreError`` naming the file at fault."""
    path = find_source(source)
    if is_packed_store(path):
        from flashmoe_backend.store.layout import PackedStore

        return PackedStore.open(path)
    from flashmoe_backend.store.checkpoint import Checkpoint

    return Checkpoint.open(path)
