"""Errors in OpenAI's error JSON with the right status, each message naming the problem: 400 for
bad schemas, tools, values, bodies and context overflow, 401 without the API key, 404 for an
unknown model or route, 413 for an oversized body, 500 for a bug; none of them stops the server.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from flashmoe_backend.cli.demo import REQUEST, WEATHER_TOOL
from flashmoe_backend.generation.params import Chunk
from tests.server.conftest import GROUNDED, MODEL

LIMIT = 512 * 1024  # the body limit of this module's server (a context overflow fits under it)


@pytest.fixture(scope="module")
def server(serve):
    return serve(max_body_bytes=LIMIT, max_tokens_limit=1000)


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, **kwargs)


def error_of(response: httpx.Response, status: int) -> dict:
    """The OpenAI error object of ``response``, checked to have ``status`` and every field."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": GROUNDED, **fields}


NO_PARAMETERS = {"type": "function", "function": {"name": "lookup", "description": "Look up."}}
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
    "type": "object", "properties": {"when": {"type": "string", "format": "fortnight"}}}}}

# id, request body, param, fragments of the message
BAD_REQUESTS = [
    ("schema-keyword", chat(response_format=BAD_SCHEMA), "response_format", ["format", "#/properties/when"]),
    ("schema-missing", chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format", ["no 'schema'"]),
    ("response-format-kind", chat(response_format={"type": "yaml"}), "response_format", ["yaml"]),
    ("tool-without-parameters", chat(tools=[NO_PARAMETERS]), "tools", ["'lookup'", "parameters"]),
    ("tool-choice-unknown", chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {
        "name": "get_time"}}), "tools", ["get_time"]),
    ("tool-choice-without-tools", chat(tool_choice="required"), "tools", ["required"]),
    ("temperature", chat(temperature=-1), "temperature", ["temperature must be a number >= 0"]),
    ("top-p", chat(top_p=2), "top_p", ["top_p must be a number in (0, 1]"]),
    ("seed", chat(seed=-3), "seed", ["seed must be"]),
    ("stop-empty", chat(stop=[""]), "stop", ["stop strings must be non-empty"]),
    ("max-tokens-zero", chat(max_tokens=0), "max_tokens", ["max_tokens must be a positive integer"]),
    ("max-tokens-limit", chat(max_completion_tokens=5000), "max_completion_tokens", ["limit of 1000"]),
    ("n", chat(n=3), "n", ["n=3"]),
    ("logprobs", chat(logprobs=True), "logprobs", ["logprobs"]),
    ("role", chat(messages=[{"role": "wizard", "content": "hi"}]), "messages", ["unknown role 'wizard'"]),
    ("tool-calls", chat(messages=[{"role": "assistant", "tool_calls": ["get_weather"]}]), "messages",
     ["tool call #0"]),
    ("image", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:,"}}]}]), "messages", ["message #0"]),
    ("messages-missing", {"model": MODEL}, "messages", ["'messages'", "Field required"]),
    ("messages-type", chat(messages="hi"), "messages", ["'messages'"]),
    ("messages-empty", chat(messages=[]), "messages", ["'messages'"]),
    ("model-missing", {"messages": GROUNDED}, "model", ["'model'", "Field required"]),
    ("temperature-type", chat(temperature="hot"), "temperature", ["'temperature'", "number"]),
]


@pytest.mark.parametrize("body,param,fragments", [pytest.param(*c[1:], id=c[0]) for c in BAD_REQUESTS])
def test_bad_request_is_400_naming_the_problem(server, body, param, fragments):
    error = error_of(post(server, "/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    for fragment in fragments:
        assert fragment in error["message"]


def test_context_overflow_is_400_context_length_exceeded(server, engine):
    words = "word " * (engine.context_window + 10)
    body = chat(messages=[{"role": "user", "content": words}])
    error = error_of(post(server, "/chat/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"context window is {engine.context_window}" in error["message"]
    error = error_of(post(server, "/completions", json={"model": MODEL, "prompt": words}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"


def test_bad_text_completion_requests(server, engine):
    body = {"model": MODEL, "prompt": [1, engine.vocab_size]}
    error = error_of(post(server, "/completions", json=body), 400)
    assert error["param"] == "prompt" and "outside the vocabulary" in error["message"]
    error = error_of(post(server, "/completions", json={"model": MODEL, "prompt": "x", "echo": True}), 400)
    assert error["param"] == "echo"
    error = error_of(post(server, "/completions", json={"model": MODEL, "prompt": ["a", "b"]}), 400)
    assert error["param"] == "prompt" and "one prompt" in error["message"]


def test_invalid_json_body_is_400(server):
    error = error_of(post(server, "/chat/completions", content=b'{"model": "demo", "messages": [',
                          headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in error["message"]
    error = error_of(post(server, "/chat/completions", json=[1, 2]), 400)
    assert "the request body" in error["message"]


def test_the_official_client_sees_the_message(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="temperature must be a number >= 0") as caught:
        client.chat.completions.create(model=MODEL, messages=GROUNDED, temperature=-1)
    assert caught.value.status_code == 400 and caught.value.param == "temperature"
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' does not exist") as caught:
        client.chat.completions.create(model="gpt-4o", messages=GROUNDED)
    assert caught.value.code == "model_not_found"


# -- 404, 405 ----------------------------------------------------------------------------------


def test_unknown_model_is_404(server):
    for path, body in [("/chat/completions", chat(model="../../etc/passwd")),
                       ("/completions", {"model": "other", "prompt": "x"})]:
        error = error_of(post(server, path, json=body), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert f"this server serves '{MODEL}'" in error["message"]
    error = error_of(httpx.get(server.url + "/models/other"), 404)
    assert error["code"] == "model_not_found"


def test_unknown_route_and_wrong_method(server):
    error = error_of(httpx.get(server.url + "/embeddings"), 404)
    assert "GET /v1/embeddings" in error["message"]
    error_of(httpx.get(server.url + "/chat/completions"), 405)


# -- 413 ---------------------------------------------------------------------------------------


def test_oversized_body_is_413(server):
    big = chat(messages=[{"role": "user", "content": "a" * LIMIT}])
    error = error_of(post(server, "/chat/completions", json=big), 413)
    assert error["code"] == "request_too_large" and f"limit of {LIMIT} bytes" in error["message"]

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"model": "demo", "messages": [{"role": "user", "content": "'
        for _ in range(LIMIT // 1024 + 1):
            yield b"a" * 1024
        yield b'"}]}'

    response = post(server, "/chat/completions", content=chunked(),
                    headers={"content-type": "application/json"})
    assert error_of(response, 413)["code"] == "request_too_large"


# -- 401 ---------------------------------------------------------------------------------------


def test_api_key_is_required_when_set(serve):
    s = serve(api_key="sekrit")
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}]:
        response = httpx.post(s.url + "/chat/completions", json=chat(), headers=headers)
        error = error_of(response, 401)
        assert error["type"] == "authentication_error" and "API key" in error["message"]
        # before the body is even read: an oversized or malformed body gets the same 401
    error_of(httpx.post(s.url + "/chat/completions", content=b"x" * (8 << 20)), 401)
    error_of(httpx.get(s.url + "/models"), 401)
    error_of(httpx.get(s.root + "/openapi.json"), 401)
    with pytest.raises(openai.AuthenticationError):
        s.client(api_key="wrong").models.list()
    assert httpx.get(s.root + "/health").status_code == 200  # liveness needs no key
    answer = s.client(api_key="sekrit").chat.completions.create(model=MODEL, messages=GROUNDED)
    assert "pharmacist" in answer.choices[0].message.content


# -- a bug is a 500, and the server goes on ------------------------------------------------------


class _Broken:
    """An engine whose generation fails: at the call, or after ``chunks`` pieces."""

    def __init__(self, chunks: int | None):
        self.chunks = chunks

    def stream(self, prompt, **kwargs):
        if self.chunks is None:
            raise RuntimeError("secret internals")

        def items():
            for _ in range(self.chunks):
                yield Chunk("piece", [1])
            raise RuntimeError("secret internals")

        return items()


def test_a_bug_is_a_500_and_the_server_keeps_serving(server, monkeypatch):
    monkeypatch.setattr(server.gate, "engine", _Broken(None))
    error = error_of(post(server, "/chat/completions", json=chat()), 500)
    assert error["type"] == "server_error" and error["message"] == "internal server error (RuntimeError)"
    monkeypatch.setattr(server.gate, "engine", _Broken(2))
    with pytest.raises(openai.APIError, match=r"internal server error \(RuntimeError\)"):
        text = ""
        for chunk in server.client().chat.completions.create(model=MODEL, messages=GROUNDED, stream=True):
            text += chunk.choices[0].delta.content or ""
    assert text == "piecepiece"  # what came before the failure was delivered
    monkeypatch.undo()
    assert server.gate.admitted == 0
    answer = server.client().chat.completions.create(model=MODEL, messages=GROUNDED)
    assert "pharmacist" in answer.choices[0].message.content


def test_after_every_bad_request_the_server_still_answers(server):
    response = post(server, "/chat/completions", json=chat(tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": REQUEST}], tool_choice="required"))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert httpx.get(server.root + "/health").json()["requests"] == 0
