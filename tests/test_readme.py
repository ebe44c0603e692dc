"""The README's Python snippets run as written, in order, on the embedded demo store, and say
what they claim (the snippets' own comments)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_snippets_this_test_runs():
    snippets = python_snippets()
    assert len(snippets) == 3, "update this test with the README"
    assert all('"demo"' in s for s in (snippets[0], snippets[2]))


@pytest.fixture(scope="module")
def namespace() -> dict:
    """One namespace through all snippets, as a reader running them one after another."""
    ns: dict = {"__name__": "readme"}
    for i, code in enumerate(python_snippets()):
        exec(compile(code, f"README.md python block #{i + 1}", "exec"), ns)
    return ns


def test_engine_snippets_run_and_answer(namespace):
    from flashmoe_backend import GenerationResult

    result = namespace["result"]  # the last one: the forced tool call
    assert isinstance(result, GenerationResult)
    [call] = result.tool_calls
    assert call.name == "get_weather" and isinstance(call.arguments.get("city"), str)
    engine = namespace["engine"]
    hello = engine.generate([{"role": "user", "content": "Hello"}], max_tokens=200)
    assert hello.text.strip() and hello.finish_reason == "stop"
    invoice = engine.generate(namespace["messages"], response_format=namespace["Invoice"])
    assert isinstance(invoice.parsed, namespace["Invoice"])


def test_integration_snippet_calls_the_tool(namespace):
    message = namespace["llm"].invoke("What is the weather in Lisbon?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
