"""Structured output through constrained decoding: ``structured_predict`` (sync, async,
streaming) and ``as_structured_llm``, valid every time even on a random-weights model."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import (
    LLMChatStartEvent,
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.structured_llm import StructuredLLM
from llama_index.core.program.utils import FlexibleModel
from llama_index.core.prompts import PromptTemplate
from pydantic import BaseModel, Field

PROMPT = PromptTemplate("Invent a person who lives in {place}.")
PET = PromptTemplate("Invent a pet that lives in {place}.")


class Person(BaseModel):
    """A person."""

    name: str = Field(min_length=1, max_length=12)
    age: int = Field(ge=0, le=120)
    city: Literal["Paris", "Tokyo", "Lima", "Oslo"]
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=3)


class Pet(BaseModel):
    """A pet (small: a few dozen tokens, so that 20 runs stay quick)."""

    name: str = Field(min_length=1, max_length=8)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog", "fish"]


def _valid(obj: object, cls: type[BaseModel] = Person) -> BaseModel:
    assert isinstance(obj, cls)
    return cls.model_validate(obj.model_dump())  # re-validates every constraint


class _Events(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Events"

    def handle(self, event, **kwargs) -> None:
        self.events.append(event)


@pytest.fixture
def events():
    recorder = _Events(events=[])
    root = get_dispatcher()
    root.add_event_handler(recorder)
    yield recorder.events
    root.event_handlers.remove(recorder)


def test_structured_predict_is_always_valid(make_llm, events):
    llm = make_llm(temperature=1.0, max_tokens=64)
    pets = [_valid(llm.structured_predict(Pet, PET, llm_kwargs={"seed": seed}, place="Oslo"), Pet)
            for seed in range(20)]
    assert len({p.model_dump_json() for p in pets}) > 1, "sampling with different seeds never varied"
    kinds = [type(e) for e in events]
    assert kinds.count(LLMStructuredPredictStartEvent) == kinds.count(LLMStructuredPredictEndEvent) == 20
    assert kinds.count(LLMChatStartEvent) == 20  # one constrained chat call each, no retries
    assert "Oslo" in events[kinds.index(LLMChatStartEvent)].messages[-1].content


@pytest.mark.asyncio
async def test_astructured_predict(make_llm):
    llm = make_llm(temperature=0.8, max_tokens=64)
    for seed in range(3):
        _valid(await llm.astructured_predict(Pet, PET, llm_kwargs={"seed": seed}, place="Lima"), Pet)


def test_stream_structured_predict(make_llm):
    llm = make_llm(max_tokens=128)
    parts = list(llm.stream_structured_predict(Person, PROMPT, place="Paris"))
    assert len(parts) > 1
    assert all(isinstance(p, (Person, FlexibleModel)) for p in parts[:-1])
    final = _valid(parts[-1])
    assert final == llm.structured_predict(Person, PROMPT, place="Paris")  # greedy: same object


@pytest.mark.asyncio
async def test_astream_structured_predict(make_llm):
    llm = make_llm(max_tokens=64)
    stream = await llm.astream_structured_predict(Pet, PET, place="Tokyo")
    parts = [p async for p in stream]
    assert _valid(parts[-1], Pet) == llm.structured_predict(Pet, PET, place="Tokyo")


@pytest.mark.asyncio
async def test_as_structured_llm(make_llm):
    llm = make_llm(max_tokens=64)
    sllm = llm.as_structured_llm(Pet)
    assert isinstance(sllm, StructuredLLM)
    messages = [ChatMessage(role="user", content="Invent a pet.")]
    response = sllm.chat(messages)
    pet = _valid(response.raw, Pet)
    assert Pet.model_validate_json(response.message.content) == pet
    streamed = list(sllm.stream_chat(messages))
    assert Pet.model_validate_json(streamed[-1].message.content) == pet
    assert Pet.model_validate_json((await sllm.achat(messages)).message.content) == pet


def test_response_format_dict_schema(make_llm):
    llm = make_llm(max_tokens=64)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    response = llm.chat([ChatMessage(role="user", content="ok?")], response_format=schema)
    assert isinstance(response.raw["parsed"], dict) and isinstance(response.raw["parsed"]["ok"], bool)


def test_schema_that_cannot_compile_is_a_clear_error(make_llm):
    llm = make_llm(max_tokens=32)

    class Weird(BaseModel):
        value: int = Field(ge=10, le=1)  # an empty range: no JSON can match

    with pytest.raises(ValueError):
        llm.structured_predict(Weird, PROMPT, place="Oslo")
    with pytest.raises(ValueError):
        llm.chat([ChatMessage(role="user", content="x")],
                 response_format={"type": "object", "properties": {"x": {"type": "no-such-type"}}})


def test_truncated_structure_is_a_clear_error(make_llm):
    llm = make_llm(max_tokens=3)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.structured_predict(Person, PROMPT, place="Oslo")
