"""flashmoe: run Mixture-of-Experts LLMs larger than memory by streaming experts from SSD.

The pipeline, one module each: ``store`` (format) -> ``pack`` -> ``reader`` -> ``cache`` ->
``streaming`` (the MoE layer) -> ``generate`` / ``prompt_cache`` -> ``engine`` (``FlashMoE``).
"""

from .engine import FlashMoE
from .generate import Chunk, GenerationParams, GenerationResult
from .packing import PackOptions, pack
from .stats import Stats
from .store import StoreError, verify_store

__all__ = [
    "Chunk",
    "FlashMoE",
    "GenerationParams",
    "GenerationResult",
    "PackOptions",
    "Stats",
    "StoreError",
    "pack",
    "verify_store",
]
