"""LangChain's ``ChatOpenAI`` (langchain-openai) pointed at ``flashmoe serve``, unchanged: tools
bound and called (invoke and stream), ``with_structured_output`` on a JSON schema, and an agent
loop (``create_agent``) that calls the tool and answers from its result."""

from __future__ import annotations

import json

import langchain_openai
import pytest

from flashmoe_backend.cli.demo import REQUEST, fake_weather
from tests.server.conftest import GROUNDED, MODEL


def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return json.dumps(fake_weather(city))


@pytest.fixture(scope="module")
def llm(serve):
    server = serve()
    return langchain_openai.ChatOpenAI(base_url=server.url, api_key="unused", model=MODEL, temperature=0,
                                       max_retries=0)


def test_invoke_and_stream_answer(llm):
    from langchain_core.messages import HumanMessage, SystemMessage

    messages = [SystemMessage(GROUNDED[0]["content"]), HumanMessage(GROUNDED[1]["content"])]
    answer = llm.invoke(messages)
    assert "pharmacist" in answer.content and answer.usage_metadata["output_tokens"] > 0
    streamed = "".join(chunk.content for chunk in llm.stream(messages))
    assert streamed == answer.content


def test_bind_tools_invoke_and_stream_call_the_tool(llm):
    bound = llm.bind_tools([get_weather], tool_choice="required")
    [call] = bound.invoke(REQUEST).tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Lisbon"}
    merged = None
    for chunk in bound.stream(REQUEST):  # LangChain merges the streamed deltas by index
        merged = chunk if merged is None else merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("get_weather", {"city": "Lisbon"})]


def test_with_structured_output_json_schema(llm):
    from pydantic import BaseModel

    class Flight(BaseModel):
        passenger: str
        flight: str
        seat: str

    structured = llm.with_structured_output(Flight, method="json_schema", strict=True)
    flight = structured.invoke("Extract the flight booking as JSON. Passenger Lena Okafor is booked on "
                               "flight TP1352 from Lisbon to Porto. The seat is 12A.")
    assert isinstance(flight, Flight)


def test_agent_loop_calls_the_tool_and_answers(llm):
    from langchain.agents import create_agent

    agent = create_agent(llm, tools=[get_weather])
    messages = agent.invoke({"messages": [{"role": "user", "content": REQUEST}]})["messages"]
    kinds = [m.type for m in messages]
    assert kinds == ["human", "ai", "tool", "ai"], kinds
    assert messages[1].tool_calls[0]["name"] == "get_weather"
    assert "sunny" in messages[-1].content
