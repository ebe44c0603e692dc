"""The LlamaIndex ``FlashMoE`` answers with its default settings (on the embedded demo model); a
bad input raises the engine's exception, for each case of ``tests.fixtures.front_ends`` (the
LangChain integration's tests run the same cases), made the LlamaIndex way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.tools import FunctionTool
from llama_index.llms.flashmoe import FlashMoE

from flashmoe_backend.cli.demo import DOCUMENT, QUESTION, REQUEST, WEATHER_TOOL, fake_weather
from flashmoe_backend.store.source import default_store
from tests.fixtures import front_ends as cases

GROUNDED = [
    ChatMessage(role=MessageRole.SYSTEM, content="Use the following facts to answer.\n" + DOCUMENT),
    ChatMessage(role=MessageRole.USER, content=QUESTION),
]
X = [ChatMessage(role=MessageRole.USER, content="x")]


@pytest.fixture(scope="module")
def demo() -> FlashMoE:
    """The demo model with nothing but its store and cache budget set."""
    return FlashMoE(model=str(default_store()), cache_gb=cases.demo_cache_gb())


# -- defaults that answer -----------------------------------------------------------------------


def test_complete_answers_with_default_settings(demo: FlashMoE) -> None:
    response = demo.complete(f"Context:\n{DOCUMENT}\n\nQuestion: {QUESTION}")
    assert "pharmacist" in response.text
    assert "thinking" not in response.additional_kwargs


def test_complete_answers_with_nothing_but_the_store() -> None:
    # Not even the cache budget: FlashMoE(model="demo") as a newcomer writes it.
    response = FlashMoE(model="demo").complete(f"Context:\n{DOCUMENT}\n\nQuestion: {QUESTION}")
    assert "pharmacist" in response.text, response


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


@pytest.mark.parametrize(("fields", "error", "fragment"), cases.bad_settings("load_kwargs"))
def test_bad_setting_is_the_engines_error(fields: dict, error: type, fragment: str) -> None:
    cases.assert_bad_setting_refused(FlashMoE, fields, error, fragment)


def test_missing_store_is_a_file_not_found_error(tmp_path: Path) -> None:
    cases.assert_missing_store_refused(FlashMoE, tmp_path)


def test_no_model_and_no_engine_is_refused() -> None:
    message = r"FlashMoE needs `model` \(a flashmoe store directory\) or `engine`"
    with pytest.raises(ValueError, match=message):
        FlashMoE()


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


# case id -> the call on the demo model (the error and message: tests.fixtures.front_ends)
BAD_CALLS: dict[str, Any] = {
    "image-part": lambda m: m.chat(_image()),
    "unknown-role": _robot,
    "empty-prompt": lambda m: m.complete(""),
    "max-tokens-zero": lambda m: m.complete("x", max_tokens=0),
    "temperature-negative": lambda m: m.chat(X, temperature=-1),
    "stream-max-tokens-zero": lambda m: list(m.stream_chat(X, max_tokens=0)),
    "unknown-argument": lambda m: m.chat(X, no_such_option=1),
    "format-int": lambda m: m.chat(X, response_format=42),
    "format-bad-schema": lambda m: m.chat(
        X, response_format={"type": "object", "properties": {"a": {"type": "strin"}}}
    ),
    "tool-choice-unknown": lambda m: m.chat(X, tools=[WEATHER_TOOL], tool_choice="nope"),
    "tool-no-parameters": lambda m: m.chat(X, tools=[cases.NO_SCHEMA]),
    "tool-choice-required-no-tools": lambda m: m.chat_with_tools([], user_msg="x", tool_required=True),
    "context-overflow": lambda m: m.complete("x", max_tokens=40000),
}


@pytest.mark.parametrize(("call", "error", "fragment"), cases.bad_calls(BAD_CALLS))
def test_bad_call_is_the_engines_error(demo: FlashMoE, call, error: type, fragment: str) -> None:
    cases.assert_bad_call_refused(call, demo, error, fragment)
