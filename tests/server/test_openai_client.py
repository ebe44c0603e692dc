"""The official ``openai`` client against ``flashmoe serve`` (a real uvicorn server on a loopback
port, the demo model): chat streamed and not, usage, tools forced and automatic with the
tool-call round trip, streamed tool-call deltas, JSON schemas, text completions, the model list.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from flashmoe_backend.cli.demo import REQUEST, WEATHER_TOOL, fake_weather
from tests.server.conftest import ENDLESS, GROUNDED, MODEL


@pytest.fixture(scope="module")
def client(serve):
    return serve().client()


def _streamed(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# -- chat --------------------------------------------------------------------------------------


def test_chat_answers_from_the_document(client, engine):
    response = client.chat.completions.create(model=MODEL, messages=GROUNDED, temperature=0)
    [choice] = response.choices
    assert "pharmacist" in choice.message.content
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert response.model == MODEL and response.object == "chat.completion"
    direct = engine.generate(GROUNDED, temperature=0)  # the server adds nothing to the engine's answer
    assert choice.message.content == direct.text
    assert response.usage.prompt_tokens == len(direct.prompt_token_ids)
    assert response.usage.completion_tokens == len(direct.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_chat_equals_the_answer_and_ends_with_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=GROUNDED, seed=7, max_tokens=64)
    stream = client.chat.completions.create(
        model=MODEL, messages=GROUNDED, seed=7, max_tokens=64, stream=True,
        stream_options={"include_usage": True},
    )
    text, chunks = _streamed(stream)
    assert text == whole.choices[0].message.content and "pharmacist" in text
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == [] and last.usage is not None  # OpenAI's usage chunk: no choices
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.prompt_tokens_details.cached_tokens > 0  # the prompt cache served the prefix
    assert all(c.usage is None for c in body)
    assert [c.choices[0].finish_reason for c in body][-1] == "stop"


def test_stream_without_include_usage_has_no_usage_chunk(client):
    _, chunks = _streamed(client.chat.completions.create(model=MODEL, messages=GROUNDED, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_max_completion_tokens_cuts_with_finish_reason_length(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about Lisbon."}], max_completion_tokens=3
    )
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 3


def test_stop_string_ends_the_answer(client):
    response = client.chat.completions.create(model=MODEL, messages=GROUNDED, stop=["macist"])
    assert response.choices[0].message.content == "phar"
    assert response.choices[0].finish_reason == "stop"


# -- tools -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_forced_tool_call(client, tool_choice):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": REQUEST}], tools=[WEATHER_TOOL],
        tool_choice=tool_choice,
    )
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
    assert arguments["city"] == "Lisbon"


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_streamed_tool_call_is_openai_deltas_the_client_reassembles(client, tool_choice):
    request = dict(model=MODEL, messages=[{"role": "user", "content": REQUEST}], tools=[WEATHER_TOOL],
                   tool_choice=tool_choice, seed=1)
    whole = client.chat.completions.create(**request).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(**request, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    header, *pieces = deltas
    # OpenAI's form: a header (index, id, type, name, empty arguments), then argument pieces
    assert (header.index, header.type, header.function.name) == (0, "function", "get_weather")
    assert header.id.startswith("call_")  # each response's call gets its own id
    assert header.function.arguments == ""
    assert len(pieces) >= 2 and all(p.index == 0 and p.id is None and p.function.name is None for p in pieces)
    assert "".join(p.function.arguments for p in pieces) == whole[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the client's own accumulation (what its stream helper gives) rebuilds the same call
    with client.chat.completions.stream(**request) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", whole[0].function.arguments)
    assert call.id.startswith("call_")


def test_tool_call_round_trip_answers_from_the_result(client):
    messages = [{"role": "user", "content": REQUEST}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert first.choices[0].finish_reason == "tool_calls"  # auto: the model chose to call
    message = first.choices[0].message
    [call] = message.tool_calls
    result = fake_weather(**json.loads(call.function.arguments))
    messages += [
        message.model_dump(exclude_none=True),  # the assistant turn as the client holds it
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    [choice] = answer.choices
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert "sunny" in choice.message.content and "21" in choice.message.content


def test_tool_choice_none_answers_in_text(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": REQUEST}], tools=[WEATHER_TOOL],
        tool_choice="none", max_tokens=40,
    )
    [choice] = response.choices
    assert not choice.message.tool_calls and choice.finish_reason in ("stop", "length")
    assert "<tool_call>" not in (choice.message.content or "")


# -- structured output -------------------------------------------------------------------------

FLIGHT = {
    "type": "object",
    "properties": {"passenger": {"type": "string"}, "flight": {"type": "string"}, "seat": {"type": "string"}},
    "required": ["passenger", "flight", "seat"],
    "additionalProperties": False,
}
EXTRACT = [{
    "role": "user",
    "content": "Extract the data from the text below as JSON matching this schema.\n\nSchema:\n"
    + json.dumps(FLIGHT) + "\n\nText:\nPassenger Lena Okafor is booked on flight TP1352 from Lisbon "
    "to Porto on 3 March 2027, departing at 09:40. The seat is 12A.",
}]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_strict_output_validates(client, stream):
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "flight", "schema": FLIGHT, "strict": True}}
    request = dict(model=MODEL, messages=EXTRACT, response_format=response_format, max_tokens=200)
    if stream:
        text, chunks = _streamed(client.chat.completions.create(**request, stream=True))
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        text = client.chat.completions.create(**request).choices[0].message.content
    jsonschema.validate(json.loads(text), FLIGHT)


def test_json_object_output_is_a_json_object(client):
    response = client.chat.completions.create(
        model=MODEL, messages=EXTRACT, response_format={"type": "json_object"}, max_tokens=200
    )
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_openai_parse_helper_gets_a_pydantic_object(client):
    from pydantic import BaseModel

    class Flight(BaseModel):
        passenger: str
        flight: str
        seat: str

    parsed = client.chat.completions.parse(model=MODEL, messages=EXTRACT, response_format=Flight,
                                           max_tokens=200).choices[0].message.parsed
    assert isinstance(parsed, Flight)


# -- text completions, models, health ----------------------------------------------------------


def test_text_completion_streamed_and_not(client, engine):
    direct = engine.generate(ENDLESS, max_tokens=12, temperature=0)
    whole = client.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=12, temperature=0)
    [choice] = whole.choices
    assert choice.text == direct.text and choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.object == "text_completion"
    chunks = list(client.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.text
    assert chunks[-1].usage.completion_tokens == 12


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_health(serve):
    import httpx

    s = serve()
    assert httpx.get(s.root + "/health").json() == {"status": "ok", "model": MODEL, "requests": 0}


# -- reasoning ---------------------------------------------------------------------------------


def test_reasoning_is_reasoning_content_streamed_and_not(client, engine):
    # The demo store does not think by default; asked to, it writes (poor) reasoning first.
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    direct = engine.generate(GROUNDED, enable_thinking=True, max_tokens=60, temperature=0)
    assert direct.reasoning  # else this test would prove nothing
    message = client.chat.completions.create(model=MODEL, messages=GROUNDED, max_tokens=60, temperature=0,
                                             extra_body=thinking).choices[0].message
    assert message.reasoning_content == direct.reasoning
    assert (message.content or "") == direct.text and "<think>" not in (message.content or "")
    chunks = list(client.chat.completions.create(model=MODEL, messages=GROUNDED, max_tokens=60, temperature=0,
                                                 extra_body=thinking, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == direct.reasoning
    assert "".join(d.content or "" for d in deltas) == direct.text
