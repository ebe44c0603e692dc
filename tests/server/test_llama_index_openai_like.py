"""LlamaIndex's ``OpenAILike`` (llama-index-llms-openai-like) pointed at ``flashmoe serve``,
unchanged: chat (sync, streamed, async), a ``FunctionAgent`` that calls the tool and answers from
its result, and ``structured_predict`` (a forced function call carrying the object)."""

from __future__ import annotations

import asyncio
import json

import pytest
from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ToolCallResult
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai_like import OpenAILike

from flashmoe_backend.cli.demo import REQUEST, fake_weather
from tests.server.conftest import GROUNDED, MODEL


def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return json.dumps(fake_weather(city))


@pytest.fixture(scope="module")
def server(serve):
    return serve()


@pytest.fixture
def llm(server, engine):
    # One per test: OpenAILike keeps its async client, which is bound to the event loop of its
    # first use, and each test's asyncio.run has a loop of its own.
    # OpenAILike knows nothing of a model named "demo": it must be told that it chats, calls
    # functions (else agents and structured_predict fall back to text prompting) and its window.
    return OpenAILike(model=MODEL, api_base=server.url, api_key="unused", is_chat_model=True,
                      is_function_calling_model=True, context_window=engine.context_window,
                      temperature=0, max_retries=0)


def _grounded() -> list[ChatMessage]:
    return [ChatMessage(role=m["role"], content=m["content"]) for m in GROUNDED]


def test_chat_stream_and_async_chat_answer(llm, engine):
    answer = llm.chat(_grounded())
    assert "pharmacist" in answer.message.content
    assert answer.message.content == engine.generate(GROUNDED, temperature=0).text
    assert answer.raw.usage.completion_tokens > 0
    streamed = "".join(chunk.delta or "" for chunk in llm.stream_chat(_grounded()))
    assert streamed == answer.message.content
    assert asyncio.run(llm.achat(_grounded())).message.content == answer.message.content


def test_function_agent_calls_the_tool_and_answers(llm):
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn=get_weather)], llm=llm)

    async def run() -> tuple[list[ToolCallResult], AgentOutput]:
        handler = agent.run(user_msg=REQUEST)
        results = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
        return results, await handler

    results, output = asyncio.run(run())
    assert [(r.tool_name, r.tool_kwargs) for r in results] == [("get_weather", {"city": "Lisbon"})]
    assert not results[0].tool_output.is_error
    assert json.loads(results[0].tool_output.content)["condition"] == "sunny"
    assert output.response.role == "assistant" and "sunny" in output.response.content
    # the run made that one call, then answered from its result
    assert [c.tool_name for c in output.tool_calls] == ["get_weather"]


def test_structured_predict_returns_the_model(llm):
    from pydantic import BaseModel

    class Flight(BaseModel):
        passenger: str
        flight: str
        seat: str

    prompt = PromptTemplate("Extract the flight booking as JSON. {text}")
    flight = llm.structured_predict(
        Flight, prompt, text="Passenger Lena Okafor is booked on flight TP1352 from Lisbon to Porto. "
        "The seat is 12A.",
    )
    # A function-calling model gets the object as a forced call of a tool named after the class:
    # the server's constrained decoding makes its arguments valid, so parsing cannot fail.
    assert isinstance(flight, Flight)
    assert all(isinstance(v, str) and v for v in flight.model_dump().values())
