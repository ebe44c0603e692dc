"""``FlashMoE`` as a LlamaIndex LLM: class, metadata, chat/complete (sync, async, streaming),
shared engines and concurrency, usage and instrumentation, message conversion, errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.llms import LLM
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.llms.flashmoe import FlashMoE
from llama_index.llms.flashmoe.base import load_engine, release_engines, to_engine_messages

from flashmoe_backend import StoreError
from tests.fixtures.front_ends import ticks_while

USER = [ChatMessage(role=MessageRole.USER, content="Tell me about experts.")]


# -- class and metadata ---------------------------------------------------------------------


def test_class_hierarchy():
    names = [c.__name__ for c in FlashMoE.__mro__]
    assert FunctionCallingLLM in FlashMoE.__mro__
    assert LLM in FlashMoE.__mro__ and BaseLLM in FlashMoE.__mro__
    assert names.index("FunctionCallingLLM") < names.index("LLM")
    assert FlashMoE.class_name() == "FlashMoE_llm"


def test_metadata(llm, store):
    meta = llm.metadata
    assert isinstance(meta, LLMMetadata)
    assert meta.context_window == llm.engine.config["text_config"]["max_position_embeddings"]
    assert meta.num_output == llm.max_tokens == 16
    assert meta.is_chat_model is True
    assert meta.is_function_calling_model is True
    assert meta.model_name == str(store)
    assert meta.system_role == MessageRole.SYSTEM


def test_metadata_satisfies_llama_index(llm, make_llm):
    from llama_index.core import PromptHelper, Settings
    from llama_index.core.llms.utils import resolve_llm

    assert resolve_llm(llm) is llm
    helper = PromptHelper.from_llm_metadata(llm.metadata)
    assert helper.context_window == llm.metadata.context_window
    assert helper.num_output == llm.metadata.num_output
    assert make_llm(context_window=2048).metadata.context_window == 2048
    previous = Settings._llm
    try:
        Settings.llm = llm
        assert Settings.llm is llm
    finally:
        Settings._llm = previous
    # Serialisable like every LlamaIndex component (the engine is not part of it).
    data = llm.to_dict()
    assert data["class_name"] == "FlashMoE_llm" and data["model"] == llm.model


def test_engines_are_shared_per_store_and_options(make_llm, store, cache_gb, monkeypatch):
    a, b = make_llm(), make_llm(temperature=0.7, max_tokens=3)
    assert a.engine is b.engine  # sampling options do not change the engine
    monkeypatch.chdir(store.parent)
    assert make_llm(model="store").engine is a.engine  # same store through a relative path
    assert load_engine(store, cache_gb) is a.engine
    assert make_llm(cache_gb=cache_gb / 2).engine is not a.engine
    assert make_llm(experts_per_token=2).engine is not a.engine
    assert FlashMoE(engine=a.engine).engine is a.engine


def test_release_engines(make_llm):
    old = make_llm()
    release_engines()
    new = make_llm()
    assert new.engine is not old.engine
    assert new.chat(USER, max_tokens=2).raw["usage"]["completion_tokens"] <= 2


def test_copies_and_pickles_share_the_engine(llm):
    import copy
    import pickle

    assert copy.deepcopy(llm).engine is llm.engine
    assert llm.model_copy(deep=True, update={"max_tokens": 3}).engine is llm.engine
    restored = pickle.loads(pickle.dumps(llm))
    assert restored.engine is llm.engine and restored.max_tokens == llm.max_tokens


# -- chat and completion --------------------------------------------------------------------


def test_chat(llm):
    response = llm.chat(USER)
    assert isinstance(response, ChatResponse)
    assert response.message.role == MessageRole.ASSISTANT
    assert isinstance(response.message.content, str)
    raw = response.raw
    usage = raw["usage"]
    assert usage["completion_tokens"] == raw["stats"]["generated_tokens"] > 0
    assert usage["prompt_tokens"] == raw["stats"]["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert raw["finish_reason"] in ("stop", "length")
    for key in ("hits", "misses", "bytes_read", "io_seconds", "generation_tps", "hit_rate"):
        assert key in raw["stats"]
    # Per-call options override the LLM's.
    short = llm.chat(USER, max_tokens=2)
    assert short.raw["usage"]["completion_tokens"] <= 2


def test_stream_chat_matches_chat(llm):
    full = llm.chat(USER)
    chunks = list(llm.stream_chat(USER))
    assert chunks, "no chunks"
    final = chunks[-1]
    assert final.delta == "" and final.raw["usage"] == full.raw["usage"]
    assert "".join(c.delta for c in chunks) == full.message.content == final.message.content
    for chunk in chunks[:-1]:
        assert "usage" not in chunk.raw
        assert chunk.message.content.endswith(chunk.delta)


def test_complete_and_stream_complete(llm):
    response = llm.complete("The cache")
    assert isinstance(response, CompletionResponse)
    assert response.text == llm.chat([ChatMessage(role="user", content="The cache")]).message.content
    raw = llm.complete("The cache", formatted=True)  # raw text, no chat template
    assert raw.raw["usage"]["prompt_tokens"] < response.raw["usage"]["prompt_tokens"]
    chunks = list(llm.stream_complete("The cache"))
    assert "".join(c.delta for c in chunks) == response.text == chunks[-1].text
    assert chunks[-1].raw["usage"] == response.raw["usage"]


def test_completion_to_prompt_sends_raw_text(make_llm):
    seen = []

    def to_prompt(text: str) -> str:
        seen.append(text)
        return f"Q: {text}\nA:"

    llm = make_llm(completion_to_prompt=to_prompt)
    response = llm.complete("why?")
    assert seen == ["why?"]
    assert response.raw["usage"]["prompt_tokens"] == len(llm.engine.encode("Q: why?\nA:"))


@pytest.mark.asyncio
async def test_async_chat_and_complete(llm):
    full = llm.chat(USER)
    assert (await llm.achat(USER)).message.content == full.message.content
    chunks = [c async for c in await llm.astream_chat(USER)]
    assert "".join(c.delta for c in chunks) == full.message.content
    assert chunks[-1].raw["usage"] == full.raw["usage"]
    completion = llm.complete("The cache")
    assert (await llm.acomplete("The cache")).text == completion.text
    chunks = [c async for c in await llm.astream_complete("The cache")]
    assert "".join(c.delta for c in chunks) == completion.text


@pytest.mark.asyncio
async def test_async_streaming_never_blocks_the_loop(make_llm):
    llm = make_llm(max_tokens=48)
    async def collect():
        return [c.delta async for c in await llm.astream_chat(USER)]

    pieces, ticks, elapsed = await ticks_while(collect(), 0.002)
    assert len(pieces) > 1
    # The loop kept running during generation: the ticker ran throughout.
    assert ticks >= max(3, int(elapsed / 0.002 / 10))


@pytest.mark.asyncio
async def test_concurrent_calls_are_serialised_safely(make_llm):
    llm = make_llm(max_tokens=8)
    prompts = [[ChatMessage(role="user", content=f"Question {i}")] for i in range(3)]
    expected = [llm.chat(p).message.content for p in prompts]
    # Several tasks, and threads on top, all sharing one engine.
    results: dict[int, str] = {}

    def in_thread(i: int) -> None:
        results[i] = make_llm(max_tokens=8).chat(prompts[i]).message.content

    threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    got = await asyncio.gather(*(llm.achat(p) for p in prompts))
    for t in threads:
        t.join(timeout=60)
    assert [r.message.content for r in got] == expected
    assert [results[i] for i in range(3)] == expected


@pytest.mark.asyncio
async def test_abandoned_async_stream_frees_the_engine(make_llm):
    llm = make_llm(max_tokens=4000)  # minutes of generation if nothing stopped it
    stream = await llm.astream_chat(USER)
    async for _ in stream:
        break
    await stream.aclose()
    start = time.perf_counter()
    while llm.engine.lock.locked():  # the worker stops at the next token and frees the engine
        assert time.perf_counter() - start < 1.5, "the abandoned generation kept running"
        await asyncio.sleep(0.01)
    response = await asyncio.wait_for(llm.achat(USER, max_tokens=2), timeout=30)
    assert response.raw["usage"]["completion_tokens"] <= 2


def test_sync_stream_closed_early_frees_the_engine(make_llm):
    llm = make_llm(max_tokens=4000)
    stream = llm.stream_chat(USER)
    next(stream)
    assert llm.engine.lock.locked()
    stream.close()
    assert not llm.engine.lock.locked()


def test_reasoning_comes_back_as_thinking_blocks(make_llm):
    llm = make_llm(enable_thinking=None, max_tokens=12)  # the template opens <think>
    response = llm.chat(USER)
    thinking = [b for b in response.message.blocks if isinstance(b, ThinkingBlock)]
    assert len(thinking) == 1 and thinking[0].content
    assert "<think>" not in (response.message.content or "")
    chunks = list(llm.stream_chat(USER))
    streamed = "".join(c.additional_kwargs.get("thinking_delta") or "" for c in chunks[:-1])
    assert streamed.strip() == thinking[0].content
    assert all(c.delta == "" for c in chunks if c.additional_kwargs.get("thinking_delta"))
    assert "thinking_delta" not in chunks[-1].additional_kwargs  # already streamed
    completion = llm.complete("The cache")
    assert completion.additional_kwargs["thinking"]
    # Reasoning in the history goes back to the template as reasoning_content.
    again = llm.chat([*USER, response.message, ChatMessage(role="user", content="More.")])
    assert isinstance(again, ChatResponse)


# -- usage and instrumentation --------------------------------------------------------------


def test_token_counting_handler_reads_usage(make_llm):
    counter = TokenCountingHandler()
    llm = make_llm(callback_manager=CallbackManager([counter]))
    response = llm.chat(USER)
    usage = response.raw["usage"]
    assert counter.prompt_llm_token_count == usage["prompt_tokens"]
    assert counter.completion_llm_token_count == usage["completion_tokens"]
    counter.reset_counts()
    chunks = list(llm.stream_complete("The cache"))
    assert counter.completion_llm_token_count == chunks[-1].raw["usage"]["completion_tokens"]
    assert counter.prompt_llm_token_count == chunks[-1].raw["usage"]["prompt_tokens"]


class _Recorder(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event, **kwargs) -> None:
        self.events.append(event)


@pytest.mark.asyncio
async def test_instrumentation_sees_every_call(make_llm):
    llm = make_llm(max_tokens=4)
    recorder = _Recorder(events=[])
    root = get_dispatcher()
    root.add_event_handler(recorder)
    try:
        llm.chat(USER)
        list(llm.stream_chat(USER))
        await llm.achat(USER)
        [c async for c in await llm.astream_chat(USER)]
        llm.complete("x")
        list(llm.stream_complete("x"))
        await llm.acomplete("x")
        [c async for c in await llm.astream_complete("x")]
    finally:
        root.event_handlers.remove(recorder)
    kinds = [type(e) for e in recorder.events]
    # complete() also reports as a completion; chat events: 4 calls.
    assert kinds.count(LLMChatStartEvent) == 4 and kinds.count(LLMChatEndEvent) == 4
    assert kinds.count(LLMCompletionStartEvent) == 4 and kinds.count(LLMCompletionEndEvent) == 4
    ends = [e for e in recorder.events if isinstance(e, LLMChatEndEvent)]
    assert all(e.response is not None and e.response.raw["usage"]["total_tokens"] > 0 for e in ends)


# -- message conversion ---------------------------------------------------------------------


def test_messages_to_engine_format():
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
        ChatMessage(role=MessageRole.USER, content="Add 2 and 3."),
        ChatMessage(role=MessageRole.ASSISTANT, blocks=[
            ThinkingBlock(content="I should add."),
            TextBlock(text="Let me add."),
            ToolCallBlock(tool_call_id="call_1", tool_name="add", tool_kwargs={"a": 2, "b": 3}),
            ToolCallBlock(tool_call_id="call_2", tool_name="mul", tool_kwargs='{"a": 2, "b": 3}'),
        ]),
        ChatMessage(role=MessageRole.TOOL, content="5", additional_kwargs={"tool_call_id": "call_1"}),
        ChatMessage(role=MessageRole.TOOL, content="6",
                    additional_kwargs={"tool_call_id": "call_2", "name": "mul"}),
        ChatMessage(role=MessageRole.DEVELOPER, content="Answer now."),
    ]
    out = to_engine_messages(messages)
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[1] == {"role": "user", "content": "Add 2 and 3."}
    assert out[2]["content"] == "Let me add." and out[2]["reasoning_content"] == "I should add."
    assert out[2]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
        {"id": "call_2", "type": "function", "function": {"name": "mul", "arguments": {"a": 2, "b": 3}}},
    ]
    assert out[3] == {"role": "tool", "content": "5", "tool_call_id": "call_1", "name": "add"}
    assert out[4] == {"role": "tool", "content": "6", "tool_call_id": "call_2", "name": "mul"}
    assert out[5] == {"role": "system", "content": "Answer now."}
    # Legacy OpenAI-style tool calls in additional_kwargs are read too.
    legacy = ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]})
    assert to_engine_messages([legacy])[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}


def test_conversation_with_tool_results_renders(llm):
    messages = [
        ChatMessage(role="user", content="Add 2 and 3."),
        ChatMessage(role="assistant", blocks=[
            ToolCallBlock(tool_call_id="call_1", tool_name="add", tool_kwargs={"a": 2, "b": 3})]),
        ChatMessage(role="tool", content="5", additional_kwargs={"tool_call_id": "call_1"}),
    ]
    ids = llm.engine.encode(to_engine_messages(messages))
    text = llm.engine.tokenizer.decode(ids)
    assert "<function=add>" in text and "<tool_response>\n5\n</tool_response>" in text
    assert isinstance(llm.chat(messages).message.content, str)


# -- errors ---------------------------------------------------------------------------------


def test_unknown_store_path_is_a_clear_error(tmp_path, cache_gb):
    missing = tmp_path / "no-such-store"
    with pytest.raises(StoreError, match="no such store directory"):
        FlashMoE(model=str(missing), cache_gb=cache_gb)
    (tmp_path / "not-a-store").mkdir()
    with pytest.raises(StoreError, match="not a flashmoe store"):
        FlashMoE(model=str(tmp_path / "not-a-store"), cache_gb=cache_gb)
    with pytest.raises(ValueError, match="needs `model`"):
        FlashMoE()


def test_bad_arguments_are_clear_errors(llm):
    with pytest.raises(TypeError, match="unknown generation argument"):
        llm.chat(USER, no_such_option=1)
    with pytest.raises(ValueError, match="text only"):
        llm.chat([ChatMessage(role="user", blocks=[ImageBlock(image=b"\x89PNG")])])
    with pytest.raises(ValueError):
        FlashMoE(engine=llm.engine, temperature=-1.0)
