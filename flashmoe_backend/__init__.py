"""flashmoe: run Mixture-of-Experts LLMs larger than memory by streaming experts from SSD.

The pipeline, one package a stage: ``store`` (format, pack, source) -> ``experts`` (reader, cache,
switch: the MoE layer) -> ``generation`` (params, loop, prompt cache, stats) -> ``constrained`` and
``tools`` (grammars, tool-call formats) -> ``engine`` (``FlashMoE``) -> ``chat`` (what the front
ends share) -> ``cli`` and the integrations.

The public names below are imported on first use (PEP 562): the engine pulls in mlx-lm and,
through it, transformers (seconds), which ``flashmoe --help`` or ``import flashmoe_backend.store``
should not pay for.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from flashmoe_backend.engine import FlashMoE
    from flashmoe_backend.errors import (
        CacheBudgetWarning,
        ContextWindowError,
        DistributedError,
        FlashMoEError,
        InvalidRequestError,
        ParameterError,
        PromptCacheWarning,
        PromptError,
        ResponseFormatError,
        StoreNotFoundError,
        ToolError,
        UnknownArgumentError,
    )
    from flashmoe_backend.generation.params import Chunk, GenerationParams, GenerationResult
    from flashmoe_backend.generation.stats import Stats
    from flashmoe_backend.store.format import StoreError, verify_store
    from flashmoe_backend.store.pack import PackOptions, pack

# public name -> the submodule that defines it
_dynamic_imports: dict[str, str] = {
    "CacheBudgetWarning": "errors",
    "Chunk": "generation.params",
    "ContextWindowError": "errors",
    "DistributedError": "errors",
    "FlashMoE": "engine",
    "FlashMoEError": "errors",
    "GenerationParams": "generation.params",
    "GenerationResult": "generation.params",
    "InvalidRequestError": "errors",
    "PackOptions": "store.pack",
    "ParameterError": "errors",
    "PromptCacheWarning": "errors",
    "PromptError": "errors",
    "ResponseFormatError": "errors",
    "Stats": "generation.stats",
    "StoreError": "store.format",
    "StoreNotFoundError": "errors",
    "ToolError": "errors",
    "UnknownArgumentError": "errors",
    "pack": "store.pack",
    "verify_store": "store.format",
}

__all__ = [
    "CacheBudgetWarning",
    "Chunk",
    "ContextWindowError",
    "DistributedError",
    "FlashMoE",
    "FlashMoEError",
    "GenerationParams",
    "GenerationResult",
    "InvalidRequestError",
    "PackOptions",
    "ParameterError",
    "PromptCacheWarning",
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
