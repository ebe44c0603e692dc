"""Structured output and tool calls through the streaming engine (random weights: any valid
structure comes from the constraint, never from the model)."""

from __future__ import annotations

from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from flashmoe_backend import FlashMoE, PackOptions, pack
from flashmoe_backend.constrained.outlines_model import from_mlxlm
from flashmoe_backend.store.format import read_manifest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo for three days?"}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    city: Literal["Oslo", "Rome", "Lima"]
    nickname: str | None = Field(default=None, max_length=8)
    scores: list[int] = Field(max_length=3)


@pytest.fixture(scope="module")
def stores(tiny_hf_dir, tmp_path_factory):
    """(arch, bits) -> engine on a store packed at that width, budget below the expert bytes."""
    engines = {}

    def get(arch: str, bits: int = 4) -> FlashMoE:
        if (arch, bits) not in engines:
            out = tmp_path_factory.mktemp(f"{arch}-{bits}") / "store"
            pack(tiny_hf_dir(arch), out, PackOptions(bits=bits, group_size=32, progress=False))
            budget = read_manifest(out).expert_bytes / 3 / 1024**3
            engines[arch, bits] = FlashMoE.load(out, cache_gb=budget)
        return engines[arch, bits]

    return get


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_response_format_always_valid(stores, bits):
    engine = stores("qwen3_5_moe", bits)
    complete = 0
    for seed in range(6):
        result = engine.generate(ASK, response_format=Person, max_tokens=160, temperature=1.0,
                                 seed=seed)
        if result.finish_reason == "incomplete":
            assert result.parsed is None  # never a truncated object presented as valid
            continue
        complete += 1
        assert isinstance(result.parsed, Person)
        assert Person.model_validate_json(result.text) == result.parsed
    assert complete >= 4
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": -5, "maximum": 5}},
              "required": ["ok", "n"]}
    result = engine.generate(ASK, response_format=schema, max_tokens=40, temperature=1.0, seed=1)
    jsonschema.validate(result.parsed, schema)
    choice = engine.generate(ASK, response_format=["yes", "no", "maybe"], max_tokens=8)
    assert choice.parsed in ("yes", "no", "maybe") and choice.text == choice.parsed


def test_markup_like_text_inside_json_is_content(stores):
    """JSON strings may spell '</think>' or '<tool_call>': they stay in the content."""
    engine = stores("qwen3_5_moe")
    schema = {"type": "object", "properties": {"tag": {"type": "string",
                                                       "enum": ["</think>x", "<tool_call>y"]}},
              "required": ["tag"]}
    for seed in range(3):
        result = engine.generate(ASK, response_format=schema, max_tokens=30, temperature=1.0,
                                 seed=seed)
        assert result.parsed["tag"] in ("</think>x", "<tool_call>y")
        streamed = list(engine.stream(ASK, response_format=schema, max_tokens=30, temperature=1.0,
                                      seed=seed))
        assert "".join(c.text for c in streamed[:-1]) == streamed[-1].text == result.text


def test_structures_close_within_max_tokens(stores):
    """Free strings (no maxLength) never end on their own under random weights: the constraint
    closes them when the token budget runs short, so the object is complete and valid."""
    engine = stores("qwen3_5_moe")
    schema = {"type": "object", "properties": {"setup": {"type": "string"},
                                               "punchline": {"type": "string"}},
              "required": ["setup", "punchline"]}
    for seed in range(3):
        result = engine.generate(ASK, response_format=schema, max_tokens=30, temperature=1.0,
                                 seed=seed)
        assert len(result.token_ids) <= 30
        jsonschema.validate(result.parsed, schema)


def test_incomplete_structure_is_reported(stores):
    engine = stores("qwen3_5_moe")
    result = engine.generate(ASK, response_format=Person, max_tokens=5)
    assert result.finish_reason == "incomplete" and result.parsed is None
    result = engine.generate(ASK, tools=[WEATHER], tool_choice="required", max_tokens=5)
    assert result.finish_reason == "incomplete" and result.tool_calls == []
    assert result.invalid_tool_calls and "incomplete" in result.invalid_tool_calls[0].error


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])  # XML and Hermes formats
def test_forced_tool_calls_validate(stores, arch):
    engine = stores(arch)
    fmt_marker = "<function=" if arch == "qwen3_5_moe" else '"arguments"'
    for seed, choice in enumerate(["required", "get_weather", {"type": "function",
                                                                "function": {"name": "add"}}]):
        # One call each: with random weights, parallel calls would go on until max_tokens.
        result = engine.generate(ASK, tools=[WEATHER, ADD], tool_choice=choice, max_tokens=120,
                                 temperature=1.0, seed=seed, parallel_tool_calls=False)
        assert result.finish_reason == "tool_calls", result.raw_text
        assert fmt_marker in result.raw_text
        assert result.tool_calls and result.text == ""
        for call in result.tool_calls:
            spec = {"get_weather": WEATHER, "add": ADD}[call.name]
            jsonschema.validate(call.arguments, spec["function"]["parameters"])
            assert call.id.startswith("call_")
        assert len(result.tool_calls) == 1
        if choice != "required":
            expected = choice if isinstance(choice, str) else "add"
            assert result.tool_calls[0].name == expected


def test_auto_tools_never_leak_markup(stores):
    engine = stores("qwen3_5_moe")
    for seed in range(4):
        pieces = list(engine.stream(ASK, tools=[WEATHER], max_tokens=40, temperature=1.0,
                                    seed=seed, enable_thinking=True))
        result = pieces[-1]
        content = "".join(p.text for p in pieces[:-1] if p.kind == "content")
        for text in (content, result.text):
            assert "<tool_call>" not in text and "<think>" not in text
        assert result.finish_reason in ("stop", "length", "tool_calls", "incomplete")


def test_bad_requests_fail_before_generation(stores):
    engine = stores("qwen3_5_moe")
    before = engine.stats.generated_tokens
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        engine.stream(ASK, tools=[WEATHER], tool_choice="nope")
    with pytest.raises(ValueError, match="parameters"):
        engine.stream(ASK, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(ValueError, match="schema"):
        engine.generate(ASK, response_format={"type": "object",
                                              "properties": {"a": {"type": "strin"}}})
    assert engine.stats.generated_tokens == before


def test_outlines_drives_the_streaming_engine(stores):
    engine = stores("qwen3_5_moe")
    misses = engine.streamer.cache.counters.misses
    model = from_mlxlm(engine.model, engine.tokenizer)
    text = model("Describe a person:", Person, max_tokens=160)
    person = Person.model_validate_json(text)
    assert isinstance(person, Person)
    assert engine.streamer.cache.counters.misses > misses  # the experts were streamed
