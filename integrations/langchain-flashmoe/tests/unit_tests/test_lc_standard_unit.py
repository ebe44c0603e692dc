"""langchain-tests' standard unit tests of ChatFlashMoE."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_flashmoe import ChatFlashMoE


@pytest.mark.usefixtures("store_paths")
class TestChatFlashMoEUnit(ChatModelUnitTests):
    store: str
    cache_gb: float

    @property
    def chat_model_class(self) -> type[ChatFlashMoE]:
        return ChatFlashMoE

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": self.store, "cache_gb": self.cache_gb, "enable_thinking": False}

    @property
    def supports_json_mode(self) -> bool:
        return True
