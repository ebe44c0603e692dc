"""``FlashMoE`` with default settings answers (on the embedded demo model), and every bad input raises
the engine's own exception type: the same types as the LangChain integration, for the same cases
(see ``test_lc_defaults_and_errors.py``, whose case ids match these)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.tools import FunctionTool
from llama_index.llms.flashmoe import FlashMoE

from flashmoe_backend.cli.demo import DOCUMENT, QUESTION, REQUEST, WEATHER_TOOL, fake_weather
from flashmoe_backend.errors import (
    ContextWindowError,
    ParameterError,
    PromptError,
    ResponseFormatError,
    StoreNotFoundError,
    ToolError,
    UnknownArgumentError,
)
from flashmoe_backend.store.format import read_manifest
from flashmoe_backend.store.source import default_store

GROUNDED = [
    ChatMessage(role=MessageRole.SYSTEM, content="Use the following facts to answer.\n" + DOCUMENT),
    ChatMessage(role=MessageRole.USER, content=QUESTION),
]
NO_SCHEMA = {"type": "function", "function": {"name": "lookup", "description": "Look up."}}
X = [ChatMessage(role=MessageRole.USER, content="x")]


@pytest.fixture(scope="module")
def demo_cache_gb() -> float:
    return read_manifest(default_store()).expert_bytes / 4 / 1024**3


@pytest.fixture(scope="module")
def demo(demo_cache_gb: float) -> FlashMoE:
    """The demo model with nothing but its store and cache budget set."""
    return FlashMoE(model=str(default_store()), cache_gb=demo_cache_gb)


# -- defaults that answer -----------------------------------------------------------------------


def test_complete_answers_with_default_settings(demo: FlashMoE) -> None:
    response = demo.complete(f"Context:\n{DOCUMENT}\n\nQuestion: {QUESTION}")
    assert "pharmacist" in response.text
    assert "thinking" not in response.additional_kwargs


def test_complete_hello_answers_with_default_settings(demo: FlashMoE) -> None:
    assert demo.complete("Hello").text.strip()


def test_chat_answers_with_default_settings(demo: FlashMoE) -> None:
    assert "pharmacist" in demo.chat(GROUNDED).message.content


def test_stream_chat_answers_with_default_settings(demo: FlashMoE) -> None:
    responses = list(demo.stream_chat(GROUNDED))
    assert "pharmacist" in "".join(r.delta or "" for r in responses)
    assert "pharmacist" in responses[-1].message.content


def test_chat_with_tools_calls_the_tool_with_default_settings(demo: FlashMoE) -> None:
    weather = FunctionTool.from_defaults(
        fn=fake_weather, name="get_weather", description=WEATHER_TOOL["function"]["description"]
    )
    response = demo.chat_with_tools([weather], user_msg=REQUEST)
    (call,) = demo.get_tool_calls_from_response(response)
    assert (call.tool_name, call.tool_kwargs) == ("get_weather", {"city": "Lisbon"})


def test_metadata_uses_the_store_defaults(demo: FlashMoE) -> None:
    assert demo.metadata.num_output == 256 and demo.metadata.context_window == 32768


# -- bad input: the engine's errors ------------------------------------------------------------

# (id, FlashMoE fields beyond model and cache_gb, error type, message fragment)
BAD_SETTINGS = [
    ("temperature-negative", {"temperature": -1.0}, ParameterError, "temperature must be a number >= 0"),
    ("max-tokens-zero", {"max_tokens": 0}, ParameterError, "max_tokens must be a positive integer"),
    ("top-p-above-one", {"top_p": 2.0}, ParameterError, "top_p must be a number in (0, 1]"),
    ("top-k-negative", {"top_k": -1}, ParameterError, "top_k must be an integer >= 0"),
    ("stop-empty", {"stop": [""]}, ParameterError, "stop strings must be non-empty"),
    ("cache-gb-zero", {"cache_gb": 0.0}, ParameterError, "cache_gb must be a number > 0"),
    (
        "experts-per-token-zero",
        {"experts_per_token": 0},
        ParameterError,
        "experts_per_token must be a positive integer",
    ),
    (
        "load-option-unknown-policy",
        {"load_kwargs": {"policy": "fifo"}},
        ParameterError,
        "policy must be one of 'lru', 'lfu'",
    ),
]


@pytest.mark.parametrize(
    ("fields", "error", "fragment"), [pytest.param(*case[1:], id=case[0]) for case in BAD_SETTINGS]
)
def test_bad_setting_is_the_engines_error(
    demo_cache_gb: float, fields: dict, error: type, fragment: str
) -> None:
    with pytest.raises(error) as caught:
        FlashMoE(**{"model": str(default_store()), "cache_gb": demo_cache_gb, **fields})
    assert fragment in str(caught.value)


def test_missing_store_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no such store directory") as caught:
        FlashMoE(model=str(tmp_path / "missing"))
    assert isinstance(caught.value, FileNotFoundError)
    with pytest.raises(StoreNotFoundError, match="not a flashmoe store"):
        FlashMoE(model=str(tmp_path))


def _image() -> list[ChatMessage]:
    return [
        ChatMessage(
            role=MessageRole.USER, blocks=[TextBlock(text="What is this?"), ImageBlock(image=b"\x89PNG")]
        )
    ]


def _robot(m: FlashMoE) -> Any:
    # LlamaIndex's roles are an enum, all of which the integration maps; an unknown role can only
    # come from a message dict, which the engine refuses the same way.
    return m.engine.generate([{"role": "robot", "content": "beep"}])


# (id, call on the demo model, error type, message fragment)
BAD_CALLS: list[tuple[str, Any, type, str]] = [
    (
        "image-part",
        lambda m: m.chat(_image()),
        PromptError,
        "message #0 content part #1: unsupported type 'image'; flashmoe models take text only",
    ),
    ("unknown-role", _robot, PromptError, "message #0: unknown role 'robot'"),
    (
        "max-tokens-zero",
        lambda m: m.complete("x", max_tokens=0),
        ParameterError,
        "max_tokens must be a positive integer",
    ),
    (
        "temperature-negative",
        lambda m: m.chat(X, temperature=-1),
        ParameterError,
        "temperature must be a number >= 0",
    ),
    (
        "stream-max-tokens-zero",
        lambda m: list(m.stream_chat(X, max_tokens=0)),
        ParameterError,
        "max_tokens must be a positive integer",
    ),
    (
        "unknown-argument",
        lambda m: m.chat(X, no_such_option=1),
        UnknownArgumentError,
        "unknown generation argument(s): no_such_option",
    ),
    (
        "format-int",
        lambda m: m.chat(X, response_format=42),
        ResponseFormatError,
        "unsupported response format 42",
    ),
    (
        "format-bad-schema",
        lambda m: m.chat(X, response_format={"type": "object", "properties": {"a": {"type": "strin"}}}),
        ResponseFormatError,
        "strin",
    ),
    (
        "tool-choice-unknown",
        lambda m: m.chat(X, tools=[WEATHER_TOOL], tool_choice="nope"),
        ToolError,
        "tool_choice names unknown tool 'nope'",
    ),
    (
        "tool-no-parameters",
        lambda m: m.chat(X, tools=[NO_SCHEMA]),
        ToolError,
        "tool 'lookup' has no 'parameters'",
    ),
    (
        "tool-choice-required-no-tools",
        lambda m: m.chat_with_tools([], user_msg="x", tool_required=True),
        ToolError,
        "tool_choice 'required' needs at least one tool",
    ),
    (
        "context-overflow",
        lambda m: m.complete("x", max_tokens=40000),
        ContextWindowError,
        "beyond the model's context window of 32768",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "fragment"), [pytest.param(*case[1:], id=case[0]) for case in BAD_CALLS]
)
def test_bad_call_is_the_engines_error(demo: FlashMoE, call, error: type, fragment: str) -> None:
    with pytest.raises(error) as caught:
        call(demo)
    assert fragment in str(caught.value)
