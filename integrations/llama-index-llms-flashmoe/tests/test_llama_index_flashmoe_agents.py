"""Tool calling and agents: ``chat_with_tools`` / ``predict_and_call``, ``FunctionAgent`` (a
tool round-trip, streaming and not, sync and async) and ``ReActAgent``.

The model has random weights: it calls a tool when a call is forced (``tool_required``,
``tool_choice``, ``initial_tool_choice``) and the constrained decoding makes the call valid; what
it writes freely is gibberish, which is fine for the agents' final answers.
"""


import asyncio

import pytest
from llama_index.core.agent.workflow import (
    AgentOutput,
    AgentStream,
    FunctionAgent,
    ReActAgent,
    ToolCallResult,
)
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, ToolCallBlock
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.tools import FunctionTool
from llama_index.llms.flashmoe import FlashMoE
from pydantic import BaseModel, Field


class Operands(BaseModel):
    """Two small integers (bounded, so that a random model cannot write digits forever)."""

    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


def add(a: int, b: int) -> int:
    """Add two small integers."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two small integers."""
    return a * b


TOOLS = [FunctionTool.from_defaults(fn=add, fn_schema=Operands),
         FunctionTool.from_defaults(fn=multiply, fn_schema=Operands)]
FNS = {"add": add, "multiply": multiply}


@pytest.fixture
def tool_llm(make_llm):
    return make_llm(max_tokens=96)  # one call in the XML format is ~65 tokens of this vocabulary


def _check_selection(sel: ToolSelection, name: str | None = None) -> None:
    assert sel.tool_name in FNS if name is None else sel.tool_name == name
    assert sel.tool_id
    assert set(sel.tool_kwargs) == {"a", "b"}
    assert all(isinstance(v, int) and 0 <= v <= 99 for v in sel.tool_kwargs.values())


# -- the FunctionCallingLLM interface -------------------------------------------------------


def test_chat_with_tools_required(tool_llm):
    response = tool_llm.chat_with_tools(TOOLS, user_msg="What is 2 + 3?", tool_required=True)
    blocks = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    assert len(blocks) == 1  # allow_parallel_tool_calls=False
    (selection,) = tool_llm.get_tool_calls_from_response(response)
    _check_selection(selection)
    assert selection.tool_id == blocks[0].tool_call_id
    assert response.raw["finish_reason"] == "tool_calls"


def test_tool_choice_names_a_tool(tool_llm):
    response = tool_llm.chat_with_tools(TOOLS, user_msg="Compute.", tool_choice="multiply")
    (selection,) = tool_llm.get_tool_calls_from_response(response)
    _check_selection(selection, "multiply")


def test_parallel_tool_calls(tool_llm):
    response = tool_llm.chat_with_tools(TOOLS, user_msg="Compute both.", tool_required=True,
                                        allow_parallel_tool_calls=True, max_tokens=200)
    selections = tool_llm.get_tool_calls_from_response(response)
    assert len(selections) >= 1
    for sel in selections:
        _check_selection(sel)


def test_prepare_chat_with_tools(tool_llm):
    history = [ChatMessage(role="user", content="Earlier question.")]
    prepared = tool_llm._prepare_chat_with_tools(TOOLS, user_msg="Now?", chat_history=history,
                                                 tool_required=True, allow_parallel_tool_calls=True)
    assert len(history) == 1  # the caller's history is not modified
    assert [m.content for m in prepared["messages"]] == ["Earlier question.", "Now?"]
    assert prepared["tool_choice"] == "required" and prepared["parallel_tool_calls"] is True
    names = [t["function"]["name"] for t in prepared["tools"]]
    assert names == ["add", "multiply"]
    assert prepared["tools"][0]["function"]["parameters"]["properties"]["a"]["maximum"] == 99
    auto = tool_llm._prepare_chat_with_tools(TOOLS, user_msg="Now?")
    assert auto["tool_choice"] == "auto" and auto["parallel_tool_calls"] is False


def test_streamed_tool_calls_arrive_on_the_last_chunk(tool_llm):
    chunks = list(tool_llm.stream_chat_with_tools(TOOLS, user_msg="2 + 3?", tool_required=True))
    for chunk in chunks[:-1]:  # partial chunks: no calls yet, and no error
        assert tool_llm.get_tool_calls_from_response(chunk, error_on_no_tool_call=False) == []
    (selection,) = tool_llm.get_tool_calls_from_response(chunks[-1])
    _check_selection(selection)


def test_no_tool_call(tool_llm):
    response = ChatResponse(message=ChatMessage(role="assistant", content="plain text"))
    assert tool_llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="Expected at least one tool call"):
        tool_llm.get_tool_calls_from_response(response)
    none = tool_llm.chat_with_tools(TOOLS, user_msg="Hi", tool_choice="none", max_tokens=8)
    assert tool_llm.get_tool_calls_from_response(none, error_on_no_tool_call=False) == []


def test_predict_and_call(tool_llm):
    output = tool_llm.predict_and_call(TOOLS, user_msg="What is 2 + 3?", tool_required=True)
    (source,) = output.sources
    assert not source.is_error
    assert source.tool_name in FNS
    assert source.raw_output == FNS[source.tool_name](**source.raw_input["kwargs"])


@pytest.mark.asyncio
async def test_apredict_and_call(tool_llm):
    output = await tool_llm.apredict_and_call(TOOLS, user_msg="What is 2 * 3?", tool_choice="multiply")
    (source,) = output.sources
    assert source.tool_name == "multiply" and not source.is_error
    assert output.response == str(multiply(**source.raw_input["kwargs"]))


def test_tool_errors(tool_llm):
    with pytest.raises(ValueError, match="no 'parameters'"):
        tool_llm.chat([ChatMessage(role="user", content="x")],
                      tools=[{"type": "function", "function": {"name": "schemaless"}}])
    bad_schema = {"type": "function", "function": {
        "name": "bad", "parameters": {"type": "object", "properties": {"x": {"type": "no-such-type"}}}}}
    with pytest.raises(ValueError, match="bad"):
        tool_llm.chat([ChatMessage(role="user", content="x")], tools=[bad_schema])
    with pytest.raises(ValueError, match="unknown tool"):
        tool_llm.chat_with_tools(TOOLS, user_msg="x", tool_choice="divide")
    with pytest.raises(ValueError, match="needs at least one tool"):
        tool_llm.chat_with_tools([], user_msg="x", tool_required=True)


# -- FunctionAgent --------------------------------------------------------------------------


def _function_agent(llm, streaming: bool) -> FunctionAgent:
    return FunctionAgent(tools=TOOLS, llm=llm, initial_tool_choice="add", streaming=streaming,
                         system_prompt="You are a calculator. Use the tools.")


async def _run_agent(agent, question: str) -> tuple[list, list, AgentOutput]:
    handler = agent.run(user_msg=question, max_iterations=6)
    results, streamed = [], []
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            results.append(event)
        elif isinstance(event, AgentStream):
            streamed.append(event)
    output = await handler
    return results, streamed, output


def _check_round_trip(results: list, output: AgentOutput) -> None:
    assert results, "no tool was called"
    first = results[0]
    assert first.tool_name == "add"  # forced on the first turn
    assert set(first.tool_kwargs) == {"a", "b"}
    assert not first.tool_output.is_error
    assert first.tool_output.raw_output == add(**first.tool_kwargs)
    assert isinstance(output, AgentOutput)
    assert output.response.role == "assistant"


def test_function_agent_round_trip_sync(tool_llm):
    # Agents are workflows (async inside); a synchronous caller runs them with asyncio.run.
    results, streamed, output = asyncio.run(_run_agent(_function_agent(tool_llm, True),
                                                       "What is 2 + 3?"))
    _check_round_trip(results, output)
    assert streamed and any(e.tool_calls for e in streamed)  # the last chunk carried the call


@pytest.mark.asyncio
async def test_function_agent_round_trip_async(tool_llm):
    results, streamed, output = await _run_agent(_function_agent(tool_llm, False), "What is 4 + 5?")
    _check_round_trip(results, output)
    assert not streamed


# -- ReActAgent -----------------------------------------------------------------------------


def test_react_agent_runs_sync(make_llm):
    agent = ReActAgent(tools=TOOLS, llm=make_llm(max_tokens=24), streaming=False)

    async def run() -> AgentOutput:  # the workflow's handler needs a running loop
        return await agent.run(user_msg="What is 2 + 3?", max_iterations=4)

    output = asyncio.run(run())
    assert isinstance(output, AgentOutput)
    assert isinstance(output.response.content, str)


class _ReActFormatted(FlashMoE):
    """Output held to the ReAct format by a regex: an action on the first turn, an answer once
    an observation came back (the random model cannot follow the format on its own)."""

    @staticmethod
    def _format(prompt: list[dict]) -> object:
        from outlines.types import Regex

        if any(str(m.get("content", "")).startswith("Observation:") for m in prompt):
            return Regex(r"Thought: I can answer without using any more tools\.\nAnswer: [a-z]{1,8}")
        return Regex(r'Thought: I need a tool\.\nAction: add\nAction Input: \{"a": [1-9], "b": [1-9]\}')

    def _astream(self, prompt, kwargs):
        return super()._astream(prompt, {**kwargs, "response_format": self._format(prompt)})

    def _agenerate(self, prompt, kwargs):
        return super()._agenerate(prompt, {**kwargs, "response_format": self._format(prompt)})


@pytest.mark.asyncio
async def test_react_agent_tool_round_trip_async(store, cache_gb):
    llm = _ReActFormatted(model=str(store), cache_gb=cache_gb, temperature=0.0, max_tokens=48,
                          enable_thinking=False)
    agent = ReActAgent(tools=TOOLS, llm=llm, streaming=True)
    results, _, output = await _run_agent(agent, "What is 2 + 3?")
    assert len(results) == 1 and results[0].tool_name == "add"
    assert results[0].tool_output.raw_output == add(**results[0].tool_kwargs)
    assert output.response.content and output.response.content.isalpha()
