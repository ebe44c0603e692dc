"""Shared pytest fixtures: tiny random checkpoints built on the fly, cached for the session.

* ``tiny_hf_dir(arch="qwen3_5_moe", **options) -> Path`` (alias ``tiny_checkpoint``): a Hugging
  Face checkpoint made by :func:`tests.fixtures.tiny.build_tiny_checkpoint` (``options`` are
  its keyword arguments).
* ``tiny_quantized_dir(arch="qwen3_5_moe", bits=4, group_size=32, **options) -> Path``: the
  mlx-community style copy of that checkpoint made by ``mlx_lm.convert``.
* ``tiny_tokenizer_dir(tool_format="xml") -> Path``: just the tokenizer + chat template.

Each distinct set of arguments is built once per session; treat the directories as read-only
(copy one before damaging it).

``FLASHMOE_HOME`` (flashmoe's index cache of checkpoints read in place) points into the session's
temporary directory, so that no test writes to the user's cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def _flashmoe_home(tmp_path_factory: pytest.TempPathFactory):
    """Keep the tests' checkpoint indexes out of the user's cache directory."""
    import os

    previous = os.environ.get("FLASHMOE_HOME")
    os.environ["FLASHMOE_HOME"] = str(tmp_path_factory.mktemp("flashmoe-home"))
    yield
    if previous is None:
        os.environ.pop("FLASHMOE_HOME", None)
    else:
        os.environ["FLASHMOE_HOME"] = previous


@pytest.fixture(autouse=True, scope="session")
def _cpu_default_device():
    """The CPU as the default device for the whole session, module fixtures included: the CPU
    paths' exact comparisons must hold on a GPU machine too. A GPU test runs its GPU part under
    ``mx.stream(mx.gpu)`` itself."""
    import mlx.core as mx

    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


def _key(*parts: Any, **options: Any) -> tuple:
    return (*parts, *sorted(options.items()))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_hf_dir(arch="qwen3_5_moe", **build_tiny_checkpoint_options) -> Path``."""
    from tests.fixtures.tiny import build_tiny_checkpoint

    built: dict[tuple, Path] = {}

    def get(arch: str = "qwen3_5_moe", **options: Any) -> Path:
        key = _key(arch, **options)
        if key not in built:
            root = tmp_path_factory.mktemp(f"tiny-{arch}")
            built[key] = build_tiny_checkpoint(root / "hf", arch, **options)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_hf_dir: Callable[..., Path]) -> Callable[..., Path]:
    """Alias of :func:`tiny_hf_dir`."""
    return tiny_hf_dir


@pytest.fixture(scope="session")
def tiny_quantized_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Callable[..., Path]
) -> Callable[..., Path]:
    """Factory: ``tiny_quantized_dir(arch="qwen3_5_moe", bits=4, group_size=32, **options)``."""
    from tests.fixtures.tiny import build_quantized_checkpoint

    built: dict[tuple, Path] = {}

    def get(
        arch: str = "qwen3_5_moe", bits: int = 4, group_size: int = 32, **options: Any
    ) -> Path:
        key = _key(arch, bits, group_size, **options)
        if key not in built:
            hf = tiny_hf_dir(arch, **options)
            root = tmp_path_factory.mktemp(f"tiny-{arch}-q{bits}g{group_size}")
            built[key] = build_quantized_checkpoint(hf, root / "mlx", bits=bits,
                                                    group_size=group_size)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_tokenizer_dir(tool_format="xml", **build_tokenizer_options) -> Path``."""
    from tests.fixtures.tiny import build_tokenizer

    built: dict[tuple, Path] = {}

    def get(tool_format: str = "xml", **options: Any) -> Path:
        key = _key(tool_format, **options)
        if key not in built:
            root = tmp_path_factory.mktemp(f"tok-{tool_format}")
            built[key] = build_tokenizer(root / "tok", tool_format=tool_format, **options)
        return built[key]

    return get
