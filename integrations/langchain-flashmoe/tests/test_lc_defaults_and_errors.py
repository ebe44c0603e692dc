"""ChatFlashMoE with default settings answers (on the embedded demo model), and every bad input raises
the engine's own exception type: the same types as the LlamaIndex integration, for the same cases
(see ``test_llama_index_flashmoe_defaults_and_errors.py``, whose case ids match these)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flashmoe_backend.cli.demo import DOCUMENT, QUESTION, REQUEST, WEATHER_TOOL
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
from langchain_core.messages import ChatMessage, HumanMessage, SystemMessage

from langchain_flashmoe import ChatFlashMoE

GROUNDED = [SystemMessage("Use the following facts to answer.\n" + DOCUMENT), HumanMessage(QUESTION)]
NO_SCHEMA = {"type": "function", "function": {"name": "lookup", "description": "Look up."}}


@pytest.fixture(scope="module")
def demo_cache_gb() -> float:
    return read_manifest(default_store()).expert_bytes / 4 / 1024**3


@pytest.fixture(scope="module")
def demo(demo_cache_gb: float) -> ChatFlashMoE:
    """The demo model with nothing but its store and cache budget set."""
    return ChatFlashMoE(model=str(default_store()), cache_gb=demo_cache_gb)


# -- defaults that answer -----------------------------------------------------------------------


def test_invoke_answers_with_default_settings(demo: ChatFlashMoE) -> None:
    answer = demo.invoke(GROUNDED)
    assert "pharmacist" in answer.content
    assert "reasoning_content" not in answer.additional_kwargs


def test_invoke_hello_answers_with_default_settings(demo: ChatFlashMoE) -> None:
    assert demo.invoke("Hello").content.strip()


def test_stream_answers_with_default_settings(demo: ChatFlashMoE) -> None:
    assert "pharmacist" in "".join(chunk.content for chunk in demo.stream(GROUNDED))


def test_bind_tools_invoke_calls_the_tool_with_default_settings(demo: ChatFlashMoE) -> None:
    message = demo.bind_tools([WEATHER_TOOL]).invoke(REQUEST)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Lisbon"})]


# -- bad input: the engine's errors ------------------------------------------------------------

# (id, ChatFlashMoE fields beyond model and cache_gb, error type, message fragment)
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
        {"load_options": {"policy": "fifo"}},
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
        ChatFlashMoE(**{"model": str(default_store()), "cache_gb": demo_cache_gb, **fields})
    assert fragment in str(caught.value)


def test_missing_store_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no such store directory") as caught:
        ChatFlashMoE(model=str(tmp_path / "missing"))
    assert isinstance(caught.value, FileNotFoundError)
    with pytest.raises(StoreNotFoundError, match="not a flashmoe store"):
        ChatFlashMoE(model=str(tmp_path))


def _image() -> list:
    return [
        HumanMessage(
            [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "url": "https://example.com/cat.png"},
            ]
        )
    ]


# (id, call on the demo model, error type, message fragment)
BAD_CALLS: list[tuple[str, Any, type, str]] = [
    (
        "image-part",
        lambda m: m.invoke(_image()),
        PromptError,
        "message #0 content part #1: unsupported type 'image'; flashmoe models take text only",
    ),
    (
        "unknown-role",
        lambda m: m.invoke([ChatMessage(role="robot", content="beep")]),
        PromptError,
        "message #0: unknown role 'robot'",
    ),
    (
        "max-tokens-zero",
        lambda m: m.invoke("x", max_tokens=0),
        ParameterError,
        "max_tokens must be a positive integer",
    ),
    (
        "temperature-negative",
        lambda m: m.invoke("x", temperature=-1),
        ParameterError,
        "temperature must be a number >= 0",
    ),
    (
        "stream-max-tokens-zero",
        lambda m: list(m.stream("x", max_tokens=0)),
        ParameterError,
        "max_tokens must be a positive integer",
    ),
    (
        "unknown-argument",
        lambda m: m.invoke("x", no_such_option=1),
        UnknownArgumentError,
        "unknown generation argument(s): no_such_option",
    ),
    (
        "format-int",
        lambda m: m.invoke("x", response_format=42),
        ResponseFormatError,
        "unsupported response format 42",
    ),
    (
        "format-bad-schema",
        lambda m: m.with_structured_output({"type": "object", "properties": {"a": {"type": "strin"}}}),
        ResponseFormatError,
        "strin",
    ),
    (
        "tool-choice-unknown",
        lambda m: m.bind_tools([WEATHER_TOOL], tool_choice="nope"),
        ToolError,
        "tool_choice names unknown tool 'nope'",
    ),
    (
        "tool-no-parameters",
        lambda m: m.bind_tools([NO_SCHEMA]),
        ToolError,
        "tool 'lookup' has no 'parameters'",
    ),
    (
        "tool-choice-required-no-tools",
        lambda m: m.invoke("x", tool_choice="required"),
        ToolError,
        "tool_choice 'required' needs at least one tool",
    ),
    (
        "context-overflow",
        lambda m: m.invoke("x", max_tokens=40000),
        ContextWindowError,
        "beyond the model's context window of 32768",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "fragment"), [pytest.param(*case[1:], id=case[0]) for case in BAD_CALLS]
)
def test_bad_call_is_the_engines_error(demo: ChatFlashMoE, call, error: type, fragment: str) -> None:
    with pytest.raises(error) as caught:
        call(demo)
    assert fragment in str(caught.value)
