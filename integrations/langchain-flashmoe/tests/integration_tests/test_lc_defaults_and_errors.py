"""ChatFlashMoE on the embedded demo model: default settings answer, and every bad input raises the
engine's own exception. The cases, their errors and messages are ``tests.fixtures.front_ends``'s,
shared with the LlamaIndex integration; this module says how LangChain makes each mistake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flashmoe_backend.cli.demo import DOCUMENT, QUESTION, REQUEST, WEATHER_TOOL
from flashmoe_backend.store.source import default_store
from langchain_core.messages import ChatMessage, HumanMessage, SystemMessage
from tests.fixtures import front_ends as cases

from langchain_flashmoe import ChatFlashMoE

GROUNDED = [SystemMessage("Use the following facts to answer.\n" + DOCUMENT), HumanMessage(QUESTION)]


@pytest.fixture(scope="module")
def demo() -> ChatFlashMoE:
    """The demo model with nothing but its store and cache budget set."""
    return ChatFlashMoE(model=str(default_store()), cache_gb=cases.demo_cache_gb())


# -- defaults that answer -----------------------------------------------------------------------


def test_invoke_answers_with_default_settings(demo: ChatFlashMoE) -> None:
    answer = demo.invoke(GROUNDED)
    assert "pharmacist" in answer.content
    assert "reasoning_content" not in answer.additional_kwargs


def test_invoke_answers_with_nothing_but_the_store() -> None:
    # Not even the cache budget: ChatFlashMoE(model="demo") as a newcomer writes it.
    answer = ChatFlashMoE(model="demo").invoke(GROUNDED)
    assert "pharmacist" in answer.content, answer


def test_invoke_hello_answers_with_default_settings(demo: ChatFlashMoE) -> None:
    assert demo.invoke("Hello").content.strip()


def test_stream_answers_with_default_settings(demo: ChatFlashMoE) -> None:
    assert "pharmacist" in "".join(chunk.content for chunk in demo.stream(GROUNDED))


def test_bind_tools_invoke_calls_the_tool_with_default_settings(demo: ChatFlashMoE) -> None:
    message = demo.bind_tools([WEATHER_TOOL]).invoke(REQUEST)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Lisbon"})]


# -- bad input: the engine's errors ------------------------------------------------------------


@pytest.mark.parametrize(("fields", "error", "fragment"), cases.bad_settings("load_options"))
def test_bad_setting_is_the_engines_error(fields: dict, error: type, fragment: str) -> None:
    cases.assert_bad_setting_refused(ChatFlashMoE, fields, error, fragment)


def test_missing_store_is_a_file_not_found_error(tmp_path: Path) -> None:
    cases.assert_missing_store_refused(ChatFlashMoE, tmp_path)


def _image() -> list:
    return [
        HumanMessage(
            [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "url": "https://example.com/cat.png"},
            ]
        )
    ]


# case id -> the call on the demo model (the error and message: tests.fixtures.front_ends)
BAD_CALLS: dict[str, Any] = {
    "image-part": lambda m: m.invoke(_image()),
    "unknown-role": lambda m: m.invoke([ChatMessage(role="robot", content="beep")]),
    "empty-prompt": lambda m: m.invoke(""),
    "max-tokens-zero": lambda m: m.invoke("x", max_tokens=0),
    "temperature-negative": lambda m: m.invoke("x", temperature=-1),
    "stream-max-tokens-zero": lambda m: list(m.stream("x", max_tokens=0)),
    "unknown-argument": lambda m: m.invoke("x", no_such_option=1),
    "format-int": lambda m: m.invoke("x", response_format=42),
    "format-bad-schema": lambda m: m.with_structured_output(
        {"type": "object", "properties": {"a": {"type": "strin"}}}
    ),
    "tool-choice-unknown": lambda m: m.bind_tools([WEATHER_TOOL], tool_choice="nope"),
    "tool-no-parameters": lambda m: m.bind_tools([cases.NO_SCHEMA]),
    "tool-choice-required-no-tools": lambda m: m.invoke("x", tool_choice="required"),
    "context-overflow": lambda m: m.invoke("x", max_tokens=40000),
}


@pytest.mark.parametrize(("call", "error", "fragment"), cases.bad_calls(BAD_CALLS))
def test_bad_call_is_the_engines_error(demo: ChatFlashMoE, call, error: type, fragment: str) -> None:
    cases.assert_bad_call_refused(call, demo, error, fragment)


def test_structured_output_with_an_unknown_method_is_refused(demo: ChatFlashMoE) -> None:
    with pytest.raises(ValueError, match="unknown method 'xml'; expected 'json_schema', 'function_calling'"):
        demo.with_structured_output({"type": "object"}, method="xml")  # type: ignore[arg-type]
