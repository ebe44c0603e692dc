"""ChatFlashMoE without generating: message and request translation, result translation, the model
profile and LangSmith parameters, the engine registry, and clear errors for a bad store path."""

from __future__ import annotations

from pathlib import Path

import pytest
from flashmoe_backend.errors import StoreNotFoundError
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_flashmoe import ChatFlashMoE, convert_messages, get_engine
from langchain_flashmoe._utils import ai_message, last_chunk

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def llm(tiny_store: Path, cache_gb: float) -> ChatFlashMoE:
    return ChatFlashMoE(
        model=str(tiny_store), cache_gb=cache_gb, max_tokens=MAX_TOKENS, enable_thinking=False
    )


HISTORY = [
    SystemMessage("You are terse."),
    HumanMessage("Weather in Paris?"),
    AIMessage(
        "Checking.",
        tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}],
        additional_kwargs={"reasoning_content": "I need the tool."},
    ),
    ToolMessage('{"temp": 21}', tool_call_id="call_1", name="get_weather"),
    AIMessage("Paris: 21 C."),
    HumanMessage([{"type": "text", "text": "Thanks! "}, {"type": "text", "text": "And Lyon?"}]),
]


def _render(llm: ChatFlashMoE, messages, **kw) -> str:
    """The prompt text the engine builds for these LangChain messages."""
    engine = llm.engine
    return engine.tokenizer.decode(engine.encode(convert_messages(messages), **kw))




def test_convert_messages_shapes() -> None:
    out = convert_messages(HISTORY)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert out[2]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ]
    assert out[2]["reasoning_content"] == "I need the tool."
    assert out[3] == {
        "role": "tool",
        "content": '{"temp": 21}',
        "tool_call_id": "call_1",
        "name": "get_weather",
    }
    # Text blocks travel as content parts; the engine joins them (see the rendering test below).
    assert out[5]["content"] == [{"type": "text", "text": "Thanks! "}, {"type": "text", "text": "And Lyon?"}]


def test_history_renders_through_the_template(llm: ChatFlashMoE) -> None:
    text = _render(llm, HISTORY)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>" in text
    assert "<think>\nI need the tool.\n</think>" in text
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text
    assert "<|im_start|>assistant\nParis: 21 C.<|im_end|>" in text
    assert text.endswith("<|im_start|>user\nThanks! And Lyon?<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_anthropic_style_assistant_content_keeps_text_only() -> None:
    msg = AIMessage(
        [
            {"type": "text", "text": "some text"},
            {"type": "tool_use", "id": "abc", "name": "add", "input": {"a": 1}},
        ],
        tool_calls=[{"name": "add", "args": {"a": 1}, "id": "abc", "type": "tool_call"}],
    )
    (out,) = convert_messages([msg])
    assert out["content"] == [{"type": "text", "text": "some text"}]
    assert out["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1}}


def test_ls_params_and_model_override(llm: ChatFlashMoE, tiny_store: Path) -> None:
    params = llm._get_ls_params(stop=["x"])
    assert params["ls_provider"] == "flashmoe"
    assert params["ls_model_name"] == str(tiny_store)
    assert params["ls_max_tokens"] == MAX_TOKENS and params["ls_stop"] == ["x"]
    assert llm._get_ls_params(model="other")["ls_model_name"] == "other"


def test_profile(llm: ChatFlashMoE) -> None:
    profile = llm.profile
    assert profile["tool_calling"] and profile["tool_choice"] and profile["structured_output"]
    assert profile["max_input_tokens"] == 32768
    assert profile["reasoning_output"] is True
    assert profile["image_inputs"] is False


def test_engines_are_shared(llm: ChatFlashMoE, tiny_store: Path, cache_gb: float) -> None:
    same = ChatFlashMoE(model=str(tiny_store), cache_gb=cache_gb, temperature=0.5)
    assert same.engine is llm.engine
    assert get_engine(tiny_store, cache_gb) is llm.engine
    other = ChatFlashMoE(model=str(tiny_store), cache_gb=cache_gb * 1.5)
    assert other.engine is not llm.engine


def test_unknown_store_path(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no such store directory"):
        ChatFlashMoE(model=str(tmp_path / "missing"))


def test_directory_that_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=str(tmp_path)):
        ChatFlashMoE(model=str(tmp_path))


def test_request_translation(llm: ChatFlashMoE, tiny_store_copy: Path) -> None:
    openai_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    engine, model, params = llm._request(
        None,
        {
            "tools": [],
            "tool_choice": True,
            "strict": True,
            "stream": True,
            "temperature": None,
            "response_format": openai_format,
        },
    )
    assert engine is llm.engine and model == llm.model
    # OpenAI's json_schema wrapper is the engine's to read (and refuse), like every other format.
    assert params == {
        "max_tokens": MAX_TOKENS,
        "enable_thinking": False,
        "tool_choice": "required",
        "response_format": openai_format,
    }
    _, _, params = llm._request(["a"], {"tool_choice": False, "response_format": {"type": "text"}})
    assert params["stop"] == ["a"] and params["tool_choice"] == "auto"
    assert "response_format" not in params
    engine, model, _ = llm._request(None, {"model": str(tiny_store_copy)})
    assert model == str(tiny_store_copy) and engine is not llm.engine


def _result(**kw):
    from flashmoe_backend import GenerationResult, Stats
    from flashmoe_backend.tools.calls import InvalidToolCall, ToolCall

    base = dict(
        text="",
        token_ids=[1, 2],
        finish_reason="tool_calls",
        stats=Stats(prompt_tokens=3, generated_tokens=2),
        prompt_token_ids=[5, 6, 7],
        tool_calls=[ToolCall("add", {"a": 1}, id="call_a")],
        invalid_tool_calls=[InvalidToolCall("add", "<parameter=a>\nx", "a: not an integer", id="call_b")],
    )
    return GenerationResult(**{**base, **kw})


def test_result_translation_tool_calls() -> None:
    message = ai_message("m", _result())
    assert message.tool_calls == [{"name": "add", "args": {"a": 1}, "id": "call_a", "type": "tool_call"}]
    assert message.invalid_tool_calls == [
        {
            "name": "add",
            "args": "<parameter=a>\nx",
            "id": "call_b",
            "error": "a: not an integer",
            "type": "invalid_tool_call",
        }
    ]
    assert message.usage_metadata == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
    chunk = AIMessageChunk(content="") + last_chunk("m", _result(), streamed_reasoning=False)
    assert chunk.tool_calls == message.tool_calls
    assert [(c["name"], c["args"], c["id"]) for c in chunk.invalid_tool_calls] == [
        ("add", "<parameter=a>\nx", "call_b")
    ]
    assert chunk.chunk_position == "last" and chunk.response_metadata["finish_reason"] == "tool_calls"
