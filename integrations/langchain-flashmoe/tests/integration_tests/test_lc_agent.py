"""Agents over ChatFlashMoE: ``langchain.agents.create_agent`` with two tools completes a tool
round trip, and its provider strategy for structured responses works through ``profile``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_flashmoe import ChatFlashMoE

agents = pytest.importorskip("langchain.agents")
middleware = pytest.importorskip("langchain.agents.middleware")

CALLS: list[tuple[str, dict]] = []
# Bounded: a random-weight model never closes an unbounded string argument.
City = Annotated[str, Field(max_length=10)]


@tool
def get_weather(city: City) -> str:
    """Current weather for a city."""
    CALLS.append(("get_weather", {"city": city}))
    return f"It is sunny in {city}."


@tool
def get_time(city: City) -> str:
    """Local time in a city."""
    CALLS.append(("get_time", {"city": city}))
    return f"It is noon in {city}."


@pytest.fixture(scope="module")
def llm(tiny_store: Path, cache_gb: float) -> ChatFlashMoE:
    return ChatFlashMoE(model=str(tiny_store), cache_gb=cache_gb, max_tokens=64, enable_thinking=False)


class CallAToolFirst(middleware.AgentMiddleware):
    """Force a tool call on the first turn and a plain answer once a tool has answered (a
    random-weight model would otherwise decide arbitrarily)."""

    @staticmethod
    def _choose(request):
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return request.override(tool_choice="none" if answered else "get_weather")

    def wrap_model_call(self, request, handler):
        return handler(self._choose(request))

    async def awrap_model_call(self, request, handler):
        return await handler(self._choose(request))


call_a_tool_first = CallAToolFirst()


def test_create_agent_tool_round_trip(llm: ChatFlashMoE) -> None:
    CALLS.clear()
    agent = agents.create_agent(llm, tools=[get_weather, get_time], middleware=[call_a_tool_first])
    state = agent.invoke({"messages": [HumanMessage("What is the weather in Paris?")]})
    messages = state["messages"]
    kinds = [type(m).__name__ for m in messages]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"], kinds
    call = messages[1].tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    assert messages[2].tool_call_id == call["id"]
    assert messages[2].content.startswith("It is sunny in ")
    assert CALLS == [("get_weather", call["args"])]
    final = messages[3]
    assert isinstance(final, AIMessage) and final.content and not final.tool_calls


async def test_create_agent_async_stream(llm: ChatFlashMoE) -> None:
    agent = agents.create_agent(llm, tools=[get_weather, get_time], middleware=[call_a_tool_first])
    updates = [u async for u in agent.astream({"messages": [HumanMessage("Weather in Oslo?")]},
                                              stream_mode="updates")]
    assert len([u for u in updates if "tools" in u]) == 1
    assert len([u for u in updates if "model" in u]) == 2


class Forecast(BaseModel):
    """A forecast."""

    city: str = Field(max_length=16)
    sunny: bool


def test_create_agent_provider_strategy(llm: ChatFlashMoE) -> None:
    from langchain.agents.factory import _supports_provider_strategy

    assert _supports_provider_strategy(llm, tools=[])  # read from llm.profile["structured_output"]
    agent = agents.create_agent(llm, tools=[], response_format=Forecast)
    state = agent.invoke({"messages": [HumanMessage("Forecast for Paris?")]})
    assert isinstance(state["structured_response"], Forecast)
