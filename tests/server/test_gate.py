"""Concurrency and cancellation through a real server: concurrent clients get what sequential
ones get, a full queue gets 429, a client that disconnects mid-stream stops its generation within
a decode step and the next request's output is a fresh engine's, and a request past its timeout
gets 504 (or an error event when streaming) and is stopped too.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx
import openai
import pytest

from flashmoe_backend.cli.demo import REQUEST, WEATHER_TOOL
from tests.server.conftest import ENDLESS, GROUNDED, MODEL

LONG = 4000  # tokens: ~a minute of the demo model on a CPU, far longer than any test waits
RECORD_TOOL = {"type": "function", "function": {
    "name": "record", "description": "Record numbers.", "parameters": {
        "type": "object", "required": ["values"],
        "properties": {"values": {"type": "array", "items": {"type": "integer"}, "minItems": 1000}}}}}


@pytest.fixture(scope="module")
def fresh():
    """A second demo engine that serves nothing: what a fresh engine answers."""
    from flashmoe_backend import FlashMoE

    engine = FlashMoE.load(MODEL)
    yield engine
    engine.close()


@contextmanager
def _streaming(server, path: str, body: dict) -> Iterator[httpx.Response]:
    """An open streamed request (httpx), to read a few events of; leaving the block disconnects."""
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + path, json={**body, "stream": True}) as response:
            yield response


def _wait(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _generating(gate) -> bool:
    """Whether the gate's latest request is past prefill, decoding."""
    return gate.last is not None and gate.last.check.calls > 0


def test_four_concurrent_clients_get_the_sequential_answers(serve):
    client = serve().client()
    requests = [
        dict(messages=GROUNDED),
        dict(messages=[{"role": "user", "content": "Hello"}]),
        dict(messages=[{"role": "user", "content": REQUEST}], tools=[WEATHER_TOOL]),
        dict(messages=[{"role": "user", "content": REQUEST}], tools=[WEATHER_TOOL], tool_choice="required",
             stream=True),
    ]

    def ask(request):
        if request.get("stream"):
            chunks = list(client.chat.completions.create(model=MODEL, **request))
            calls = [d.function for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
            return ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                    calls[0].name, "".join(f.arguments for f in calls))
        message = client.chat.completions.create(model=MODEL, **request).choices[0].message
        return message.content, [(c.function.name, c.function.arguments) for c in message.tool_calls or []]

    sequential = [ask(r) for r in requests]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(ask, requests))
    assert concurrent == sequential
    assert "pharmacist" in sequential[0][0] and sequential[2][1][0][0] == "get_weather"


def test_a_full_queue_gets_429(serve):
    server = serve(max_queue=1)  # one generating, one waiting
    body = {"model": MODEL, "prompt": ENDLESS, "max_tokens": LONG}
    with ExitStack() as open_requests:
        first = open_requests.enter_context(_streaming(server, "/completions", body))
        assert first.status_code == 200
        assert _wait(lambda: _generating(server.gate))
        second = open_requests.enter_context(_streaming(server, "/completions", body))
        assert second.status_code == 200  # admitted: it waits its turn
        assert server.gate.admitted == 2
        with pytest.raises(openai.RateLimitError, match="the server is busy") as caught:
            server.client().chat.completions.create(model=MODEL, messages=GROUNDED)
        assert caught.value.code == "queue_full" and caught.value.status_code == 429
        assert caught.value.response.headers["retry-after"] == "1"
    assert _wait(lambda: server.gate.admitted == 0)  # both left; the queue is free again
    answer = server.client().chat.completions.create(model=MODEL, messages=GROUNDED)
    assert "pharmacist" in answer.choices[0].message.content


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_disconnect_mid_stream_stops_the_generation_and_the_next_is_exact(serve, engine, fresh, path):
    server = serve()
    if path == "/completions":
        body = {"model": MODEL, "prompt": ENDLESS, "max_tokens": LONG}
    else:  # a forced call of 1000 numbers: the engine holds a call back, nothing streams but the role
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Record some numbers."}],
                "tools": [RECORD_TOOL], "tool_choice": "required", "max_tokens": LONG}
    generated = engine.stats.generated_tokens
    with _streaming(server, path, body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # under way
        assert _wait(lambda: _generating(server.gate))
    generation = server.gate.last
    # The client is gone: the engine stops at its next decode step, and only that step.
    assert _wait(generation.cancelled.is_set, 10)
    steps = generation.check.calls
    assert generation.ended.wait(10), "the generation went on after its client left"
    assert generation.check.calls <= steps + 1 < LONG
    assert engine.stats.generated_tokens == generated  # it never finished
    assert not engine.lock.locked() and server.gate.admitted == 0

    client = server.client()
    # The same prompt again (its prefix snapshot was saved before the cancelled decode) and
    # another one: exactly what a fresh engine answers.
    again = client.completions.create(model=MODEL, prompt=ENDLESS, max_tokens=24, temperature=0)
    assert again.choices[0].text == fresh.generate(ENDLESS, max_tokens=24, temperature=0).text
    answer = client.chat.completions.create(model=MODEL, messages=GROUNDED, temperature=0)
    assert answer.choices[0].message.content == fresh.generate(GROUNDED, temperature=0).text
    call = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": REQUEST}],
                                          tools=[WEATHER_TOOL], temperature=0).choices[0].message.tool_calls
    expected = fresh.generate([{"role": "user", "content": REQUEST}], tools=[WEATHER_TOOL], temperature=0)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in call] == [
        (c.name, c.arguments) for c in expected.tool_calls]


def test_non_streamed_request_whose_client_leaves_is_stopped(serve, engine):
    server = serve()
    body = {"model": MODEL, "prompt": ENDLESS, "max_tokens": LONG}
    done = threading.Event()

    def leave_early():
        try:
            httpx.post(server.url + "/completions", json=body, timeout=1.5)
        except httpx.TimeoutException:  # httpx closes the connection
            pass
        done.set()

    threading.Thread(target=leave_early, daemon=True).start()
    assert _wait(lambda: _generating(server.gate)) and done.wait(10)
    generation = server.gate.last
    assert generation.ended.wait(10), "the generation went on after its client left"
    assert generation.check.calls < LONG and server.gate.admitted == 0


def test_timeout_is_504_and_stops_the_generation(serve):
    server = serve(timeout=1.0)
    started = time.monotonic()
    response = httpx.post(server.url + "/completions", json={"model": MODEL, "prompt": ENDLESS,
                                                             "max_tokens": LONG}, timeout=30)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "timeout" and "timed out after 1 s" in error["message"]
    assert time.monotonic() - started < 10
    generation = server.gate.last
    assert generation.ended.wait(10) and generation.check.calls < LONG

    # streamed: the headers went out, so the timeout is an error event the client raises
    with pytest.raises(openai.APIError, match="timed out after 1 s"):
        stream = server.client().completions.create(model=MODEL, prompt=ENDLESS, max_tokens=LONG, stream=True)
        for _ in stream:
            pass
    assert server.gate.last.ended.wait(10)
    assert server.gate.admitted == 0


def test_timeout_while_waiting_in_the_queue(serve):
    server = serve(timeout=1.0)
    other = serve()  # holds the engine (both servers share it) while this one's request waits
    body = {"model": MODEL, "prompt": ENDLESS, "max_tokens": LONG}
    with _streaming(other, "/completions", body):
        assert _wait(lambda: _generating(other.gate))
        # this server's turn comes at once, its engine call waits on the engine's lock
        response = httpx.post(server.url + "/chat/completions", json={"model": MODEL, "messages": GROUNDED},
                              timeout=30)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
