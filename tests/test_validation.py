"""The engine's defaults and its one validation layer, on the embedded demo store (CPU, seconds).

* Defaults that answer: the store's generation_config.json says the demo model does not think, so
  ``generate`` answers with no arguments at all; a caller's own values still win.
* Every bad argument of ``FlashMoE.load`` and ``FlashMoE.stream`` raises its ``errors`` type with
  a message naming the problem, before anything is prefilled or read from the store.
* A cache too small for one token's experts warns at load.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest

from flashmoe_backend import FlashMoE, PackOptions, pack
from flashmoe_backend.cli.demo import DOCUMENT, QUESTION, REQUEST, WEATHER_TOOL
from flashmoe_backend.errors import (
    USER_ERRORS,
    CacheBudgetWarning,
    ContextWindowError,
    FlashMoEError,
    InvalidRequestError,
    ParameterError,
    PromptError,
    ResponseFormatError,
    StoreError,
    StoreNotFoundError,
    ToolError,
    UnknownArgumentError,
)
from flashmoe_backend.generation.params import GenerationDefaults, read_generation_defaults
from flashmoe_backend.store.format import read_manifest
from flashmoe_backend.store.source import default_store
from flashmoe_backend.validation import reply_budget

GB = 1024**3
GROUNDED = [
    {"role": "system", "content": "Use the following facts to answer.\n" + DOCUMENT},
    {"role": "user", "content": QUESTION},
]


@pytest.fixture(scope="module")
def budget() -> float:
    """A quarter of the demo's expert bytes, in GiB: experts really stream."""
    return read_manifest(default_store()).expert_bytes / 4 / GB


@pytest.fixture(scope="module")
def engine(budget: float) -> FlashMoE:
    return FlashMoE.load(default_store(), cache_gb=budget)


@pytest.fixture(scope="module")
def small_context(tmp_path_factory: pytest.TempPathFactory, budget: float) -> FlashMoE:
    """The demo store with a context window of 64 positions, so that prompts can overflow it."""
    store = tmp_path_factory.mktemp("small-context") / "store"
    shutil.copytree(default_store(), store)
    config = json.loads((store / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 64
    (store / "config.json").write_text(json.dumps(config))
    return FlashMoE.load(store, cache_gb=budget)


# -- defaults that answer ---------------------------------------------------------------------


def test_demo_store_says_it_does_not_think(engine: FlashMoE) -> None:
    assert engine.defaults.chat_template_kwargs == {"enable_thinking": False}
    prompt = engine.tokenizer.decode(engine.encode([{"role": "user", "content": "Hello"}]))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the empty block


def test_hello_answers_with_default_settings(engine: FlashMoE) -> None:
    result = engine.generate([{"role": "user", "content": "Hello"}])
    assert result.text.strip() and result.reasoning is None, result.raw_text
    assert "<" not in result.text  # no stray tool-call or think markup


def test_grounded_question_answers_with_default_settings(engine: FlashMoE) -> None:
    result = engine.generate(GROUNDED)
    assert "pharmacist" in result.text, result.raw_text
    assert result.finish_reason == "stop"


def test_tool_call_with_default_settings(engine: FlashMoE) -> None:
    result = engine.generate([{"role": "user", "content": REQUEST}], tools=[WEATHER_TOOL])
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", {"city": "Lisbon"})]
    assert result.finish_reason == "tool_calls"


def test_callers_values_win_over_the_store_defaults(engine: FlashMoE) -> None:
    thinking = engine.tokenizer.decode(
        engine.encode([{"role": "user", "content": "Hi"}], enable_thinking=True)
    )
    assert thinking.endswith("<|im_start|>assistant\n<think>\n")
    assert engine.generation_params().temperature == 0.0  # do_sample: false
    assert engine.generation_params(temperature=0.7, max_tokens=9).temperature == 0.7
    assert engine.generation_params(max_tokens=9).max_tokens == 9


def test_hugging_face_sampling_defaults() -> None:
    greedy = GenerationDefaults.from_generation_config({"temperature": 0.6})  # no do_sample: greedy
    assert greedy.params == {"temperature": 0.0}
    qwen = GenerationDefaults.from_generation_config(
        {
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.95,
            "top_k": 20,
            "max_new_tokens": 512,
            "repetition_penalty": 1.05,
            "chat_template_kwargs": {"enable_thinking": True},
        }
    )
    assert qwen.params == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "max_tokens": 512,
        "repetition_penalty": 1.05,
    }
    assert qwen.chat_template_kwargs == {"enable_thinking": True}
    hf = GenerationDefaults.from_generation_config({"do_sample": True})  # transformers' own defaults
    assert hf.params == {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


def test_bad_generation_config_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "top_p": 3}')
    with pytest.raises(StoreError, match=r"generation_config\.json: top_p must be a number in \(0, 1\]"):
        read_generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"chat_template_kwargs": {"enable_thinking": "no"}}')
    with pytest.raises(StoreError, match="chat_template_kwargs.enable_thinking must be True or False"):
        read_generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        read_generation_defaults(tmp_path)
    assert read_generation_defaults(tmp_path / "nowhere") == GenerationDefaults()


def test_pack_carries_the_generation_defaults(tmp_path: Path, tiny_hf_dir) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_hf_dir("qwen3_5_moe", seed=0), src)
    config = json.loads((src / "generation_config.json").read_text())
    config["chat_template_kwargs"] = {"enable_thinking": False}
    (src / "generation_config.json").write_text(json.dumps(config))
    pack(src, tmp_path / "store", PackOptions(bits=4, group_size=32, progress=False))
    assert read_generation_defaults(tmp_path / "store").chat_template_kwargs == {"enable_thinking": False}


# -- bad generation requests ------------------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]
NO_SCHEMA = {"type": "function", "function": {"name": "lookup"}}
BAD_SCHEMA_TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}},
}

# (id, prompt, keyword arguments, error type, message fragment); a table, one case a line or two
# fmt: off
BAD_REQUESTS = [
    # prompts and messages
    ("unknown-role", [{"role": "robot", "content": "x"}], {}, PromptError,
     "message #0: unknown role 'robot'; expected one of 'system', 'user', 'assistant', 'tool'"),
    ("unknown-role-later", [*HI, {"role": "developer", "content": "x"}], {}, PromptError,
     "message #1: unknown role 'developer'"),
    ("no-role", [{"content": "x"}], {}, PromptError, "message #0 has no 'role'"),
    ("message-not-a-dict", ["Hello"], {}, PromptError,
     "message #0 is a str, expected a dict with 'role' and 'content'"),
    ("content-int", [{"role": "user", "content": 5}], {}, PromptError,
     "message #0 (user): content must be a string or a list of content parts, got int"),
    ("content-none", [{"role": "user", "content": None}], {}, PromptError,
     "message #0 (user): content must be a string or a list of content parts, got NoneType"),
    ("content-dict", [{"role": "user", "content": {"text": "x"}}], {}, PromptError,
     "content must be a string or a list of content parts, got dict"),
    ("no-content", [{"role": "user"}], {}, PromptError, "message #0 (user) has no 'content'"),
    ("user-content-empty", [{"role": "user", "content": ""}], {}, PromptError,
     "message #0 (user): the content is empty; a user message needs text"),
    ("user-content-no-parts", [*HI, {"role": "assistant", "content": "x"}, {"role": "user", "content": []}],
     {}, PromptError, "message #2 (user): the content is empty"),
    ("image-part", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     {}, PromptError,
     "message #0 content part #0: unsupported type 'image_url'; flashmoe models take text only"),
    ("part-not-a-dict", [{"role": "user", "content": ["a", 7]}], {}, PromptError,
     "message #0 content part #1 is an int, expected {'type': 'text', 'text': ...}"),
    ("part-text-not-str", [{"role": "user", "content": [{"type": "text", "text": 3}]}], {}, PromptError,
     "message #0 content part #0: 'text' must be a string, got int"),
    ("tool-calls-on-user", [{"role": "user", "content": "x", "tool_calls": []}], {}, PromptError,
     "message #0 (user): only assistant messages carry tool_calls"),
    ("tool-calls-not-list", [*HI, {"role": "assistant", "content": "", "tool_calls": {"name": "f"}}],
     {}, PromptError,
     "message #1: tool_calls must be a list, got dict"),
    ("tool-call-no-name", [*HI, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}],
     {}, PromptError,
     "message #1 tool call #0 has no function name"),
    ("reasoning-not-str", [*HI, {"role": "assistant", "content": "", "reasoning_content": 1}],
     {}, PromptError,
     "message #1: reasoning_content must be a string, got int"),
    ("prompt-dict", {"role": "user", "content": "x"}, {}, PromptError,
     "the prompt is a dict: wrap one message in a list"),
    ("prompt-empty-list", [], {}, PromptError, "the prompt is an empty list"),
    ("prompt-empty-string", "", {}, PromptError, "the prompt is an empty string"),
    ("prompt-int", 42, {}, PromptError,
     "the prompt must be a string, a list of token ids, or a list of messages"),
    ("prompt-bytes", b"hi", {}, PromptError, "got bytes"),
    ("token-out-of-vocab", [1, 99999], {}, PromptError,
     "prompt token #1 is 99999, outside the vocabulary (0..2047)"),
    ("token-negative", [-1], {}, PromptError, "prompt token #0 is -1, outside the vocabulary"),
    ("tokens-and-text", [1, "two"], {}, PromptError,
     "prompt token #1 is 'two': a list prompt holds token ids (ints) only"),
    # tools
    ("tools-int", HI, {"tools": 42}, ToolError, "tools must be a list of tools, got int"),
    ("tools-dict", HI, {"tools": WEATHER_TOOL}, ToolError,
     "tools must be a list of tools, got a dict: wrap a single tool in a list"),
    ("tools-str", HI, {"tools": "get_weather"}, ToolError, "tools must be a list of tools, got str"),
    ("tool-not-dict", HI, {"tools": [42]}, ToolError, "tool #0: expected an OpenAI-style tool dict"),
    ("tool-no-parameters", HI, {"tools": [NO_SCHEMA]}, ToolError, "tool 'lookup' has no 'parameters'"),
    ("tool-duplicate", HI, {"tools": [WEATHER_TOOL, WEATHER_TOOL]}, ToolError,
     "duplicate tool name 'get_weather'"),
    ("tool-bad-schema", HI, {"tools": [BAD_SCHEMA_TOOL]}, ToolError, "tool 'f'"),
    ("tool-choice-unknown", HI, {"tools": [WEATHER_TOOL], "tool_choice": "nope"}, ToolError,
     "tool_choice names unknown tool 'nope'; available: ['get_weather']"),
    ("tool-choice-int", HI, {"tools": [WEATHER_TOOL], "tool_choice": 42}, ToolError,
     "unsupported tool_choice 42"),
    ("tool-choice-required-no-tools", HI, {"tool_choice": "required"}, ToolError,
     "tool_choice 'required' needs at least one tool"),
    ("parallel-not-bool", HI, {"tools": [WEATHER_TOOL], "parallel_tool_calls": "yes"}, ParameterError,
     "parallel_tool_calls must be True or False, got 'yes'"),
    # response formats
    ("format-int", HI, {"response_format": 42}, ResponseFormatError,
     "unsupported response format 42 (an int value)"),
    ("format-str", HI, {"response_format": "json"}, ResponseFormatError,
     "a plain string is ambiguous as a response format"),
    ("format-bool", HI, {"response_format": True}, ResponseFormatError,
     "a boolean JSON schema does not describe a structure"),
    ("format-bad-schema", HI,
     {"response_format": {"type": "object", "properties": {"a": {"type": "strin"}}}}, ResponseFormatError,
     "strin"),
    ("format-unsupported-keyword", HI,
     {"response_format": {"type": "object", "properties": {"a": {"not": {"type": "null"}}}}},
     ResponseFormatError, "unsupported JSON schema keyword 'not' at #/properties/a"),
    ("format-empty-choices", HI, {"response_format": []}, ResponseFormatError,
     "a choice needs at least one option"),
    ("format-json-schema-without-schema", HI,
     {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}, ResponseFormatError,
     "response_format json_schema has no 'schema'"),
    ("format-with-forced-call", HI,
     {"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     InvalidRequestError, "response_format cannot be combined with a forced tool_choice"),
    # generation parameters
    ("max-tokens-zero", HI, {"max_tokens": 0}, ParameterError,
     "max_tokens must be a positive integer (or None: up to the context window), got 0"),
    ("max-tokens-negative", HI, {"max_tokens": -5}, ParameterError, "max_tokens must be a positive integer"),
    ("max-tokens-float", HI, {"max_tokens": 1.5}, ParameterError, "max_tokens must be a positive integer"),
    ("max-tokens-str", HI, {"max_tokens": "10"}, ParameterError, "got '10'"),
    ("max-tokens-bool", HI, {"max_tokens": True}, ParameterError, "got True"),
    ("temperature-negative", HI, {"temperature": -1}, ParameterError,
     "temperature must be a number >= 0, got -1"),
    ("temperature-str", HI, {"temperature": "hot"}, ParameterError,
     "temperature must be a number >= 0, got 'hot'"),
    ("temperature-nan", HI, {"temperature": math.nan}, ParameterError,
     "temperature must be a number >= 0, got nan"),
    ("top-p-zero", HI, {"top_p": 0}, ParameterError, "top_p must be a number in (0, 1], got 0"),
    ("top-p-above-one", HI, {"top_p": 1.5}, ParameterError, "top_p must be a number in (0, 1], got 1.5"),
    ("top-k-negative", HI, {"top_k": -1}, ParameterError, "top_k must be an integer >= 0, got -1"),
    ("top-k-float", HI, {"top_k": 2.5}, ParameterError, "top_k must be an integer >= 0, got 2.5"),
    ("min-p-above-one", HI, {"min_p": 2}, ParameterError, "min_p must be a number in [0, 1], got 2"),
    ("repetition-penalty-zero", HI, {"repetition_penalty": 0}, ParameterError,
     "repetition_penalty must be a number > 0, got 0"),
    ("seed-negative", HI, {"seed": -1}, ParameterError,
     "seed must be an integer in [0, 2**64), or None, got -1"),
    ("seed-str", HI, {"seed": "x"}, ParameterError, "seed must be an integer"),
    ("stop-int", HI, {"stop": 5}, ParameterError, "stop must be a string or a list of strings, got int"),
    ("stop-item-int", HI, {"stop": ["a", 1]}, ParameterError, "stop #1 must be a string, got 1"),
    ("stop-empty", HI, {"stop": [""]}, ParameterError, "stop #0: stop strings must be non-empty"),
    ("processors-not-list", HI, {"logits_processors": "x"}, ParameterError,
     "logits_processors must be a list of callables (tokens, logits) -> logits, got str"),
    ("processor-not-callable", HI, {"logits_processors": [1]}, ParameterError,
     "logits_processors #0 is not callable: 1"),
    ("enable-thinking-str", HI, {"enable_thinking": "no"}, ParameterError,
     "enable_thinking must be True or False, or None, got 'no'"),
    ("unknown-argument", HI, {"temprature": 0.5}, UnknownArgumentError,
     "unknown generation argument(s): temprature; expected enable_thinking"),
    # context window (32,768 positions for the demo)
    ("context-overflow", HI, {"max_tokens": 40000}, ContextWindowError,
     "beyond the model's context window of 32768; lower max_tokens to at most"),
    ("prompt-fills-context", [5] * 32768, {}, ContextWindowError,
     "the prompt is 32768 tokens, the model's context window is 32768: no room for a reply"),
]
# fmt: on


@pytest.mark.parametrize(
    ("prompt", "kwargs", "error", "fragment"), [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS]
)
def test_bad_request_is_refused_before_generation(engine: FlashMoE, prompt, kwargs, error, fragment) -> None:
    before = engine.streamer.counters.bytes_read, engine.stats.generated_tokens, len(engine.prompt_cache)
    with pytest.raises(error) as caught:
        engine.generate(prompt, **kwargs)
    assert fragment in str(caught.value)
    assert isinstance(caught.value, USER_ERRORS)
    with pytest.raises(error):  # stream refuses at the call, not at the first item
        engine.stream(prompt, **kwargs)
    after = engine.streamer.counters.bytes_read, engine.stats.generated_tokens, len(engine.prompt_cache)
    assert after == before, "nothing may be prefilled or read for a refused request"


def test_openai_style_messages_are_accepted(engine: FlashMoE) -> None:
    # Content parts are joined; an assistant's content may be None beside its tool calls, whose
    # arguments may be JSON text (OpenAI's wire format).
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'},
    }
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, "Lisbon?"]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    text = engine.tokenizer.decode(engine.encode(messages, [WEATHER_TOOL]))
    assert "<|im_start|>user\nWeather in Lisbon?<|im_end|>" in text
    assert "<function=get_weather>\n<parameter=city>\nLisbon\n</parameter>" in text
    assert messages[0]["content"][1] == "Lisbon?"  # the caller's messages are not modified


def test_error_types_are_what_users_catch() -> None:
    assert issubclass(PromptError, ValueError) and issubclass(ContextWindowError, ValueError)
    assert issubclass(UnknownArgumentError, TypeError)
    assert issubclass(StoreNotFoundError, FileNotFoundError) and issubclass(StoreNotFoundError, StoreError)
    assert all(issubclass(t, FlashMoEError) for t in (ToolError, ResponseFormatError, ParameterError))


def test_async_stream_refuses_too(engine: FlashMoE) -> None:
    import asyncio

    async def consume():
        return [item async for item in engine.astream(HI, max_tokens=0)]

    with pytest.raises(ParameterError, match="max_tokens"):
        asyncio.run(consume())


# -- the context window -----------------------------------------------------------------------


def test_long_prompt_is_refused_without_a_tokenizer_warning(
    engine: FlashMoE, caplog: pytest.LogCaptureFixture
) -> None:
    # The engine's error is the one message: transformers' "Token indices sequence length is
    # longer than the specified maximum sequence length" warning (a log record) is not emitted.
    with caplog.at_level("WARNING"), pytest.raises(
        ContextWindowError,
        match="the prompt is 120000 tokens, the model's context window is 32768: no room for a reply",
    ):
        engine.generate("hello " * 40000)
    assert "sequence length is longer than" not in caplog.text


def test_context_overflow_is_refused_before_prefill(small_context: FlashMoE) -> None:
    before = small_context.streamer.counters.bytes_read
    with pytest.raises(
        ContextWindowError,
        match=r"the prompt \(60 tokens\) plus max_tokens \(8\) is 68 "
        r"tokens, beyond the model's context window of 64; lower max_tokens to at most 4",
    ):
        small_context.generate([5] * 60, max_tokens=8)
    assert small_context.streamer.counters.bytes_read == before


def test_max_tokens_none_generates_up_to_the_context(small_context: FlashMoE) -> None:
    result = small_context.generate([5] * 60, max_tokens=None)
    assert 1 <= len(result.token_ids) <= 4
    assert len(result.prompt_token_ids) + len(result.token_ids) <= 64


def test_reply_budget() -> None:
    assert reply_budget(10, 5, 64) == 5
    assert reply_budget(10, None, 64) == 54
    assert reply_budget(10, 54, 64) == 54
    assert reply_budget(10, 500, None) == 500  # a config without max_position_embeddings
    with pytest.raises(ContextWindowError, match="plus max_tokens"):
        reply_budget(10, 55, 64)
    with pytest.raises(ContextWindowError, match="no room for a reply"):
        reply_budget(64, None, 64)
    with pytest.raises(
        ParameterError, match="max_tokens=None .* needs the model config's max_position_embeddings"
    ):
        reply_budget(10, None, None)


# -- loading ----------------------------------------------------------------------------------

# (id, load keyword arguments beyond the budget, error type, message fragment)
# fmt: off
BAD_LOADS = [
    ("cache-gb-zero", {"cache_gb": 0}, ParameterError, "cache_gb must be a number > 0, got 0"),
    ("cache-gb-negative", {"cache_gb": -1}, ParameterError, "cache_gb must be a number > 0, got -1"),
    ("cache-gb-str", {"cache_gb": "4"}, ParameterError, "cache_gb must be a number > 0, got '4'"),
    ("cache-below-one-record", {"cache_gb": 1e-09}, ParameterError,
     "cache budget of 1 bytes cannot hold one expert record (16384 bytes); raise cache_gb"),
    ("experts-per-token-zero", {"experts_per_token": 0}, ParameterError,
     "experts_per_token must be a positive integer (or None: the model's own routing), got 0"),
    ("experts-per-token-too-many", {"experts_per_token": 64}, ParameterError,
     "experts_per_token is 64 but the model has 32 experts per layer"),
    ("io-threads-zero", {"io_threads": 0}, ParameterError, "io_threads must be a positive integer, got 0"),
    ("page-cache-unknown", {"page_cache": "nope"}, ParameterError,
     "page_cache must be one of 'bypass', 'keep', got 'nope'"),
    ("verify-unknown", {"verify": "sometimes"}, ParameterError,
     "verify must be one of 'first', 'always', 'never', got 'sometimes'"),
    ("policy-unknown", {"policy": "fifo"}, ParameterError, "policy must be one of 'lru', 'lfu', got 'fifo'"),
    ("prefill-step-zero", {"prefill_step_size": 0}, ParameterError,
     "prefill_step_size must be a positive integer, got 0"),
    ("prompt-cache-negative", {"prompt_cache_entries": -1}, ParameterError,
     "prompt_cache_entries must be an integer >= 0, got -1"),
    ("unknown-option", {"bogus": 1}, UnknownArgumentError,
     "unknown load argument(s): bogus; expected cache_gb, experts_per_token, io_threads, page_cache"),
]
# fmt: on


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"), [pytest.param(*case[1:], id=case[0]) for case in BAD_LOADS]
)
def test_bad_load_option_is_refused(budget: float, kwargs, error, fragment) -> None:
    with pytest.raises(error) as caught:
        FlashMoE.load(default_store(), **{"cache_gb": budget, **kwargs})
    assert fragment in str(caught.value)


def test_shared_refuses_an_unknown_load_argument(budget: float) -> None:
    # Refused before the engine is looked up or loaded, as load refuses it (a TypeError too).
    message = r"unknown load argument\(s\): bogus, cache_size; expected cache_gb"
    with pytest.raises(UnknownArgumentError, match=message):
        FlashMoE.shared(default_store(), cache_gb=budget, bogus=1, cache_size=2)
    assert issubclass(UnknownArgumentError, TypeError)


def test_missing_store_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(
        StoreNotFoundError, match="no-such-store: no such store directory; make a store with `flashmoe pack`"
    ):
        FlashMoE.load(tmp_path / "no-such-store")
    with pytest.raises(FileNotFoundError, match=r"not a flashmoe store \(no manifest\.json\)"):
        FlashMoE.load(tmp_path)
    with pytest.raises(ParameterError, match="store must be a path to a store directory, got int"):
        FlashMoE.load(42)  # type: ignore[arg-type]


def test_cache_too_small_for_one_tokens_experts_warns() -> None:
    record = max(layer.record_bytes for layer in read_manifest(default_store()).layers)
    with pytest.warns(
        CacheBudgetWarning,
        match=r"expert cache budget of 0\.03 MiB cannot hold one token's "
        r"experts of a layer \(4 experts x 0\.02 MiB = 0\.06 MiB\)",
    ):
        FlashMoE.load(default_store(), cache_gb=2 * record / GB).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheBudgetWarning)
        FlashMoE.load(default_store(), cache_gb=4 * record / GB).close()  # exactly one token's experts
