"""Tool calling and structured output of ChatFlashMoE against the tiny random model.

The model has random weights, so these tests check shape, never content: forced calls name the right
tool and carry arguments valid under its schema, structured answers validate, and markup never
reaches the content.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field, TypeAdapter
from typing_extensions import TypedDict

from langchain_flashmoe import ChatFlashMoE

# Free strings are bounded (maxLength): a random-weight model never closes an unbounded one.
City = Annotated[str, Field(max_length=10)]


@tool
def get_weather(city: City) -> str:
    """Current weather for a city."""
    return f"Sunny in {city}."


@tool
def add(a: Annotated[int, Field(ge=0, le=99)], b: Annotated[int, Field(ge=0, le=99)]) -> int:
    """Add two integers."""
    return a + b


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


class PersonDict(TypedDict):
    """A person."""

    name: Annotated[Literal["Ann", "Bob", "Eve"], ..., "the name"]
    adult: Annotated[bool, ..., "whether the person is an adult"]


PERSON_SCHEMA = {
    "title": "Person",
    "description": "A person.",
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
VALIDATORS = {
    Person: Person.model_validate,
    "typeddict": TypeAdapter(PersonDict).validate_python,
    "json": Person.model_validate,
}


@pytest.fixture(scope="module")
def llm(tiny_store: Path, cache_gb: float) -> ChatFlashMoE:
    return ChatFlashMoE(model=str(tiny_store), cache_gb=cache_gb, max_tokens=80, enable_thinking=False)


def _collect(stream) -> AIMessageChunk:
    full = None
    for chunk in stream:
        full = chunk if full is None else full + chunk
    assert full is not None
    return full


def _assert_valid_call(message: AIMessage, name: str | None = None) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call["id"] and call["type"] == "tool_call"
        assert "<tool_call>" not in message.content and "<function=" not in message.content
        tool_ = {"get_weather": get_weather, "add": add}[call["name"]]
        tool_.args_schema.model_validate(call["args"])  # arguments follow the tool's schema
    if name:
        assert {c["name"] for c in message.tool_calls} == {name}


# ------------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool_choice", [True, "add", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls(llm: ChatFlashMoE, tool_choice) -> None:
    bound = llm.bind_tools([get_weather, add], tool_choice=tool_choice)
    result = bound.invoke("What is 2 + 3?")
    name = "add" if isinstance(tool_choice, dict) or tool_choice == "add" else None
    _assert_valid_call(result, name)
    assert result.response_metadata["finish_reason"] == "tool_calls"


def test_streamed_tool_calls_match_invoke(llm: ChatFlashMoE) -> None:
    bound = llm.bind_tools([get_weather, add], tool_choice="get_weather")
    invoked = bound.invoke("Weather in Paris?")
    full = _collect(bound.stream("Weather in Paris?"))
    _assert_valid_call(full, "get_weather")
    assert full.tool_call_chunks and all(c["id"] for c in full.tool_call_chunks)
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [
        (c["name"], c["args"]) for c in invoked.tool_calls
    ]
    assert full.chunk_position == "last"


async def test_async_tool_calls(llm: ChatFlashMoE) -> None:
    bound = llm.bind_tools([get_weather, add], tool_choice="add")
    _assert_valid_call(await bound.ainvoke("2 + 3?"), "add")
    full = None
    async for chunk in bound.astream("2 + 3?"):
        full = chunk if full is None else full + chunk
    _assert_valid_call(full, "add")


def test_tool_choice_none_never_calls(llm: ChatFlashMoE) -> None:
    result = llm.bind_tools([get_weather, add], tool_choice="none").invoke("Weather in Paris?")
    assert not result.tool_calls and "<tool_call>" not in result.content


def test_parallel_tool_calls_false_gives_one_call(llm: ChatFlashMoE) -> None:
    bound = llm.bind_tools([get_weather, add], tool_choice="required", parallel_tool_calls=False)
    result = bound.invoke("Weather in Paris and Lyon?")
    assert len(result.tool_calls) == 1


def test_auto_tool_choice_returns_a_well_formed_message(llm: ChatFlashMoE) -> None:
    result = llm.bind_tools([get_weather, add]).invoke("Weather in Paris?")
    assert "<tool_call>" not in result.content
    for call in result.tool_calls:
        assert call["id"] and call["name"] in ("get_weather", "add")


def test_tool_round_trip_history(llm: ChatFlashMoE) -> None:
    bound = llm.bind_tools([get_weather, add], tool_choice="get_weather")
    first = bound.invoke([HumanMessage("Weather in Paris?")])
    call = first.tool_calls[0]
    messages = [HumanMessage("Weather in Paris?"), first,
                ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"], name=call["name"])]
    final = llm.bind_tools([get_weather, add], tool_choice="none").invoke(messages)
    assert isinstance(final, AIMessage) and final.content and not final.tool_calls


def test_bad_tools_are_refused_when_bound(llm: ChatFlashMoE) -> None:
    no_schema = {"type": "function", "function": {"name": "lookup", "description": "Look up."}}
    with pytest.raises(ValueError, match="lookup"):
        llm.bind_tools([no_schema])
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    with pytest.raises(ValueError, match="object"):
        llm.bind_tools([bad_schema])
    with pytest.raises(ValueError, match="nope"):
        llm.bind_tools([add], tool_choice="nope")
    impossible = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}}}}
    with pytest.raises(ValueError, match="'g'"):
        llm.bind_tools([impossible])
    with pytest.raises(ValueError):
        llm.bind_tools([42])  # type: ignore[list-item]


# ------------------------------------------------------------------------------------------------
# Structured output
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("schema", [Person, PersonDict, PERSON_SCHEMA], ids=["pydantic", "typeddict", "json"])
def test_structured_output(llm: ChatFlashMoE, schema, method: str) -> None:
    result = llm.with_structured_output(schema, method=method).invoke("Invent a person.")
    if schema is Person:
        assert isinstance(result, Person)
    else:
        assert isinstance(result, dict)
        VALIDATORS["typeddict" if schema is PersonDict else "json"](result)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_stream_matches_invoke(llm: ChatFlashMoE, method: str) -> None:
    chat = llm.with_structured_output(Person, method=method)
    chunks = list(chat.stream("Invent a person."))
    assert chunks and chunks[-1] == chat.invoke("Invent a person.")


async def test_structured_output_async_include_raw(llm: ChatFlashMoE) -> None:
    chat = llm.with_structured_output(Person, include_raw=True)
    out = await chat.ainvoke("Invent a person.")
    assert isinstance(out["parsed"], Person) and out["parsing_error"] is None
    assert isinstance(out["raw"], AIMessage)
    assert Person.model_validate_json(out["raw"].content) == out["parsed"]
    chunks = [chunk async for chunk in chat.astream("Invent a person.")]
    assert chunks and chunks[-1]["parsed"] == out["parsed"]


def _json_object_or_incomplete(message: AIMessage) -> None:
    """JSON mode admits any object, free keys included; a random model may not close a free string
    within max_tokens, so either a whole object or a cut-off one reported as incomplete."""
    assert message.content.startswith("{")
    if message.response_metadata["finish_reason"] != "incomplete":
        assert isinstance(json.loads(message.content), dict)


def test_json_mode(llm: ChatFlashMoE) -> None:
    out = llm.with_structured_output(method="json_mode", include_raw=True).invoke("Any JSON object.")
    _json_object_or_incomplete(out["raw"])
    if out["parsing_error"] is None:
        assert isinstance(out["parsed"], dict)


def test_response_format_kwarg(llm: ChatFlashMoE) -> None:
    openai_style = {"type": "json_schema", "json_schema": {"name": "Person", "schema": PERSON_SCHEMA}}
    for response_format in (openai_style, PERSON_SCHEMA, Person):
        result = llm.invoke("Invent a person.", response_format=response_format)
        Person.model_validate_json(result.content)
    _json_object_or_incomplete(llm.invoke("Any JSON object.", response_format={"type": "json_object"}))
    free = llm.invoke("Hello", response_format={"type": "text"})
    assert free.content and free.response_metadata["finish_reason"] in ("stop", "length")


def test_ls_structured_output_format_is_passed(llm: ChatFlashMoE) -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class Options(BaseCallbackHandler):
        def __init__(self) -> None:
            self.options: list = []

        def on_chat_model_start(self, serialized, messages, *, options=None, **kwargs):
            self.options.append(options)

    for method in ("json_schema", "function_calling", "json_mode"):
        handler = Options()
        chat = llm.with_structured_output(Person, method=method, include_raw=True)
        chat.invoke("x", config={"callbacks": [handler]})
        fmt = handler.options[0]["ls_structured_output_format"]
        assert fmt["kwargs"]["method"] == method
        assert fmt["schema"]["title"] == "Person"


def test_bad_schemas_are_refused(llm: ChatFlashMoE) -> None:
    with pytest.raises(ValueError):
        llm.with_structured_output({"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(ValueError):
        llm.with_structured_output(
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}}
        )
    with pytest.raises(ValueError, match="method"):
        llm.with_structured_output(Person, method="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        llm.invoke("x", response_format={"type": "json_schema", "json_schema": {"name": "n"}})


def test_literal_schema_field(llm: ChatFlashMoE) -> None:
    class Choice(BaseModel):
        answer: Literal["yes", "no"]

    assert llm.with_structured_output(Choice).invoke("Yes or no?").answer in ("yes", "no")
