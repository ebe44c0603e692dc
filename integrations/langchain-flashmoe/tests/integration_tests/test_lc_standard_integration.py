"""langchain-tests' standard integration tests of ChatFlashMoE, run against the embedded demo model.

The demo model is small and trained on synthetic QA, tool calls and JSON extraction; experts stream
through a cache of a quarter of their bytes. ``EXPECTED_FAILURES`` (applied by conftest.py, so no
standard test is overridden) lists what it does not manage: the call's shape is right (constrained
decoding), but the content needs a model that understood the prompt.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_flashmoe import ChatFlashMoE

# Not run (run=False): each costs a full generation and fails the same way every time (greedy).
COPIES_ARGUMENT = pytest.mark.xfail(
    run=False,
    reason="asserts args == {'input': 3}: the demo model calls magic_function but writes 20, not 3 "
    "(its training requests never write an argument as a call, 'magic_function(3)')",
)

EXPECTED_FAILURES = {
    "test_tool_calling": COPIES_ARGUMENT,
    "test_tool_calling_async": COPIES_ARGUMENT,
    "test_unicode_tool_call_integration": pytest.mark.xfail(
        run=False,
        reason="asserts '你好' / 'こんにちは' copied into the arguments; the demo model's "
        "training data is ASCII",
    ),
    "test_json_mode": pytest.mark.xfail(
        run=False,
        reason="json_mode allows any JSON object; the demo model writes valid JSON with keys of its "
        "own, not the 'setup' / 'punchline' the prompt asks for",
    ),
}


@pytest.mark.usefixtures("demo_store_paths")
class TestChatFlashMoEIntegration(ChatModelIntegrationTests):
    store: str
    store_copy: str
    cache_gb: float

    @property
    def chat_model_class(self) -> type[ChatFlashMoE]:
        return ChatFlashMoE

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # 64 tokens: enough for one forced call of the suite's integer-argument tools.
        return {"model": self.store, "cache_gb": self.cache_gb, "max_tokens": 64, "enable_thinking": False}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return self.store_copy
