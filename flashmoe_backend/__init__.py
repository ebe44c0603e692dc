"""flashmoe: run Mixture-of-Experts LLMs larger than memory by streaming experts from SSD.

The pipeline, one module each: ``store`` (format) -> ``pack`` -> ``reader`` -> ``cache`` ->
``streaming`` (the MoE layer) -> ``generate`` / ``prompt_cache`` -> ``engine`` (``FlashMoE``).

The public names below are imported on first use (PEP 562): the engine pulls in mlx-lm and,
through it, transformers (seconds), which ``flashmoe --help`` or ``import flashmoe_backend.store``
should not pay for.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .engine import FlashMoE
    from .errors import (
        CacheBudgetWarning,
        ContextWindowError,
        FlashMoEError,
        InvalidRequestError,
        ParameterError,
        PromptError,
        ResponseFormatError,
        StoreNotFoundError,
        ToolError,
        UnknownArgumentError,
    )
    from .generate import Chunk, GenerationParams, GenerationResult
    from .packing import PackOptions, pack
    from .stats import Stats
    from .store import StoreError, verify_store

# public name -> the submodule that defines it
_dynamic_imports: dict[str, str] = {
    "CacheBudgetWarning": "errors",
    "Chunk": "generate",
    "ContextWindowError": "errors",
    "FlashMoE": "engine",
    "FlashMoEError": "errors",
    "GenerationParams": "generate",
    "GenerationResult": "generate",
    "InvalidRequestError": "errors",
    "PackOptions": "packing",
    "ParameterError": "errors",
    "PromptError": "errors",
    "ResponseFormatError": "errors",
    "Stats": "stats",
    "StoreError": "store",
    "StoreNotFoundError": "errors",
    "ToolError": "errors",
    "UnknownArgumentError": "errors",
    "pack": "packing",
    "verify_store": "store",
}

__all__ = [
    "CacheBudgetWarning",
    "Chunk",
    "ContextWindowError",
    "FlashMoE",
    "FlashMoEError",
    "GenerationParams",
    "GenerationResult",
    "InvalidRequestError",
    "PackOptions",
    "ParameterError",
    "PromptError",
    "ResponseFormatError",
    "Stats",
    "StoreError",
    "StoreNotFoundError",
    "ToolError",
    "UnknownArgumentError",
    "pack",
    "verify_store",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name in the package."""
    module = _dynamic_imports.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
