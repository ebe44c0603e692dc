"""langchain-tests' standard integration tests of ChatFlashMoE, run against the tiny random model.

The model has random weights: its free text is gibberish, but everything structural (streaming,
async, usage, stop strings, tool-call and structured-output shape) comes from the engine and
constrained decoding, and must hold. ``EXPECTED_FAILURES`` (applied by conftest.py, so no standard
test is overridden) lists the tests that cannot pass: those that check what the model understood
of the prompt (that it copied the 3 of "magic_function(3)", chose to call a tool unprompted, used
the JSON keys the prompt asked for).
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_flashmoe import ChatFlashMoE

# Not run (run=False): a random-weight model cannot pass them, and each costs a full generation.
COPIES_ARGUMENT = pytest.mark.xfail(
    run=False,
    reason="asserts args == {'input': 3}: the call's shape is forced, copying the 3 from the prompt "
    "needs a trained model",
)

EXPECTED_FAILURES = {
    "test_tool_calling": COPIES_ARGUMENT,
    "test_tool_calling_async": COPIES_ARGUMENT,
    "test_agent_loop": pytest.mark.xfail(
        run=False,
        reason="tool_choice='auto': whether to call the tool is the model's decision, and a "
        "random-weight model does not decide to"
    ),
    "test_unicode_tool_call_integration": pytest.mark.xfail(
        run=False,
        reason="asserts the model copied '你好' / 'こんにちは' from the prompt into the arguments"
    ),
    "test_json_mode": pytest.mark.xfail(
        run=False,
        reason="json_mode allows any JSON object; using the keys the prompt asks for ('setup', "
        "'punchline') needs a trained model"
    ),
    # Joke(setup: str, punchline: str), in every schema flavour.
}


@pytest.mark.usefixtures("store_paths")
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
