"""Helpers shared by the training scripts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_tiny() -> ModuleType:
    """``tests/fixtures/tiny.py``, loaded by path.

    Importing ``tests.fixtures.tiny`` the normal way runs ``flashmoe_backend/__init__.py``, which
    imports MLX; the GPU training machine has torch and transformers but no MLX. tiny.py itself
    only needs the standard library at import time.
    """
    name = "_flashmoe_tiny"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "flashmoe_backend" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
