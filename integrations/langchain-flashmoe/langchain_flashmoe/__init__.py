"""LangChain integration of FlashMoE: ``from langchain_flashmoe import ChatFlashMoE``."""

from langchain_flashmoe.chat_models import ChatFlashMoE, convert_messages, get_engine, release_engines

__all__ = ["ChatFlashMoE", "convert_messages", "get_engine", "release_engines"]
