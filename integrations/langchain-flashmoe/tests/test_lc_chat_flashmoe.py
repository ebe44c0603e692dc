"""ChatFlashMoE beyond the standard suites: message rendering, metadata, stop strings, concurrency,
async streaming, the engine registry, and clear errors for bad input."""

from __future__ import annotations

import asyncio
import threading
import time
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

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def llm(tiny_store: Path, cache_gb: float) -> ChatFlashMoE:
    return ChatFlashMoE(
        model=str(tiny_store), cache_gb=cache_gb, max_tokens=MAX_TOKENS, enable_thinking=False
    )


def _render(llm: ChatFlashMoE, messages, **kw) -> str:
    """The prompt text the engine builds for these LangChain messages."""
    engine = llm.engine
    return engine.tokenizer.decode(engine.encode(convert_messages(messages), **kw))


# ------------------------------------------------------------------------------------------------
# Messages through the chat template
# ------------------------------------------------------------------------------------------------

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


def test_assistant_last_message_is_continued(llm: ChatFlashMoE) -> None:
    messages = [HumanMessage("Say hello."), AIMessage("Hello, my friend")]
    text = _render(llm, messages)
    assert text.endswith("<|im_start|>assistant\nHello, my friend")
    result = llm.invoke(messages)
    assert isinstance(result, AIMessage) and result.content


def test_non_text_content_is_refused(llm: ChatFlashMoE) -> None:
    image = HumanMessage([{"type": "image", "url": "https://example.com/cat.png"}])
    with pytest.raises(ValueError, match="text only"):
        llm.invoke([image])


# ------------------------------------------------------------------------------------------------
# Results, metadata, usage
# ------------------------------------------------------------------------------------------------


def test_invoke_metadata_and_usage(llm: ChatFlashMoE, tiny_store: Path, cache_gb: float) -> None:
    result = llm.invoke("Hello")
    meta = result.response_metadata
    assert meta["model_name"] == str(tiny_store)
    assert meta["model_provider"] == "flashmoe"
    assert meta["finish_reason"] in ("stop", "length")
    stats = meta["stats"]
    assert stats["generated_tokens"] == result.usage_metadata["output_tokens"] <= MAX_TOKENS
    assert stats["misses"] > 0 and stats["cache_bytes_peak"] <= cache_gb * 1024**3
    usage = result.usage_metadata
    assert usage["input_tokens"] == stats["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_stream_usage_once_on_the_last_chunk(llm: ChatFlashMoE) -> None:
    chunks = list(llm.stream("Hello"))
    assert len(chunks) > 2
    assert [c.chunk_position for c in chunks] == [None] * (len(chunks) - 1) + ["last"]
    assert [c.usage_metadata is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert isinstance(full, AIMessageChunk)
    assert full.usage_metadata["output_tokens"] == full.response_metadata["stats"]["generated_tokens"]
    assert full.content == llm.invoke("Hello").content  # greedy: streaming and invoke agree


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


# ------------------------------------------------------------------------------------------------
# Stop strings
# ------------------------------------------------------------------------------------------------


def test_stop_sequences(llm: ChatFlashMoE) -> None:
    free = llm.invoke("Hello").content
    assert len(free) > 4
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    expected = free[: free.index(stop)]
    for model in (llm, llm.model_copy(update={"stop": [stop]})):
        kwargs = {"stop": [stop]} if model is llm else {}
        result = model.invoke("Hello", **kwargs)
        assert result.content == expected and stop not in result.content
        assert result.response_metadata["finish_reason"] == "stop"
        streamed = "".join(c.content for c in model.stream("Hello", **kwargs))
        assert streamed == expected


# ------------------------------------------------------------------------------------------------
# Engine registry, concurrency, async
# ------------------------------------------------------------------------------------------------


def test_engines_are_shared(llm: ChatFlashMoE, tiny_store: Path, cache_gb: float) -> None:
    same = ChatFlashMoE(model=str(tiny_store), cache_gb=cache_gb, temperature=0.5)
    assert same.engine is llm.engine
    assert get_engine(tiny_store, cache_gb) is llm.engine
    other = ChatFlashMoE(model=str(tiny_store), cache_gb=cache_gb * 1.5)
    assert other.engine is not llm.engine


def test_concurrent_threads_and_batch(llm: ChatFlashMoE) -> None:
    prompts = ["Hello", "Hey", "Tell me about Paris"]
    expected = [llm.invoke(p).content for p in prompts]
    assert [m.content for m in llm.batch(prompts, config={"max_concurrency": 3})] == expected
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = "".join(c.content for c in llm.stream(prompts[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == expected


async def test_async_stream_does_not_block_the_loop(llm: ChatFlashMoE) -> None:
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    start = time.perf_counter()
    chunks = [c async for c in llm.astream("Hello", max_tokens=24)]
    elapsed = time.perf_counter() - start
    done.set()
    await task
    assert chunks[-1].chunk_position == "last"
    # The loop kept running while the model generated (a blocked loop would tick ~once).
    assert ticks >= max(3, int(elapsed / 0.001 * 0.1))


async def test_async_results_match_sync(llm: ChatFlashMoE) -> None:
    expected = llm.invoke("Hello").content
    results = await asyncio.gather(llm.ainvoke("Hello"), llm.ainvoke("Hello"))
    assert [r.content for r in results] == [expected, expected]
    assert [r.content for r in await llm.abatch(["Hello", "Hello"])] == [expected, expected]


async def test_abandoned_async_stream_frees_the_engine(llm: ChatFlashMoE) -> None:
    async for _ in llm.astream("Hello", max_tokens=200):
        break  # stop after the first chunk
    for _ in range(200):  # the worker closes the generation at its next token
        if not llm.engine.lock.locked():
            break
        await asyncio.sleep(0.01)
    assert not llm.engine.lock.locked()
    assert (await llm.ainvoke("Hello")).content


async def test_astream_events(llm: ChatFlashMoE) -> None:
    events = [e async for e in llm.astream_events("Hello", version="v2")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "on_chat_model_start" and kinds[-1] == "on_chat_model_end"
    assert "on_chat_model_stream" in kinds
    assert events[-1]["data"]["output"].usage_metadata["output_tokens"] > 0


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_unknown_store_path(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no such store directory"):
        ChatFlashMoE(model=str(tmp_path / "missing"))


def test_directory_that_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=str(tmp_path)):
        ChatFlashMoE(model=str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Reasoning
# ------------------------------------------------------------------------------------------------


def test_reasoning_goes_to_additional_kwargs(llm: ChatFlashMoE) -> None:
    thinking = llm.model_copy(update={"enable_thinking": None})  # the template opens <think>
    result = thinking.invoke("Hello")
    reasoning = result.additional_kwargs["reasoning_content"]
    assert reasoning and "<think>" not in result.content and "</think>" not in result.content
    assert reasoning not in result.content
    chunks = list(thinking.stream("Hello"))
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    # The engine strips the final result's reasoning, not the streamed pieces.
    streamed = full.additional_kwargs["reasoning_content"]
    assert streamed.strip() == reasoning.strip()
    assert full.content == result.content
    assert full.content_blocks[0] == {"type": "reasoning", "reasoning": streamed}


# ------------------------------------------------------------------------------------------------
# Translation of requests and results (no generation)
# ------------------------------------------------------------------------------------------------


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
    from langchain_flashmoe.chat_models import _last_chunk, _message

    message = _message("m", _result())
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
    chunk = AIMessageChunk(content="") + _last_chunk("m", _result(), streamed_reasoning=False)
    assert chunk.tool_calls == message.tool_calls
    assert [(c["name"], c["args"], c["id"]) for c in chunk.invalid_tool_calls] == [
        ("add", "<parameter=a>\nx", "call_b")
    ]
    assert chunk.chunk_position == "last" and chunk.response_metadata["finish_reason"] == "tool_calls"
