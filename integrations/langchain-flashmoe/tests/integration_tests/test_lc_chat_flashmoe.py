"""ChatFlashMoE beyond the standard suites, generating on the tiny store: continued assistant turns,
metadata and usage, stop strings, concurrency, async streaming, reasoning. What needs no generation
is in ../unit_tests/test_lc_chat_models_unit.py."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from tests.fixtures.front_ends import ticks_while

from langchain_flashmoe import ChatFlashMoE, convert_messages

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def llm(tiny_store: Path, cache_gb: float) -> ChatFlashMoE:
    return ChatFlashMoE(
        model=str(tiny_store), cache_gb=cache_gb, max_tokens=MAX_TOKENS, enable_thinking=False
    )


# ------------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------------


def test_assistant_last_message_is_continued(llm: ChatFlashMoE) -> None:
    messages = [HumanMessage("Say hello."), AIMessage("Hello, my friend")]
    engine = llm.engine
    text = engine.tokenizer.decode(engine.encode(convert_messages(messages)))
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
# Concurrency, async
# ------------------------------------------------------------------------------------------------


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
    async def collect() -> list:
        return [c async for c in llm.astream("Hello", max_tokens=24)]

    chunks, ticks, elapsed = await ticks_while(collect(), 0.001)
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
