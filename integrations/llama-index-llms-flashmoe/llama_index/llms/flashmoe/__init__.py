"""LlamaIndex LLM integration of flashmoe (Mixture-of-Experts models streamed from SSD)."""

from llama_index.llms.flashmoe.base import FlashMoE, load_engine, release_engines

__all__ = ["FlashMoE", "load_engine", "release_engines"]
