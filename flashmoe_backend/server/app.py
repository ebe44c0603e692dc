"""The FastAPI application: routes, authentication and the request-body limit.

Routes translate and delegate: the request model gives the engine's arguments (``protocol``),
``EngineGate`` queues and runs the generation, ``protocol`` / ``streaming`` write the answer.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from sse_starlette import EventSourceResponse

from flashmoe_backend.generation.params import GenerationResult
from flashmoe_backend.server import protocol, streaming
from flashmoe_backend.server.errors import (
    ENGINE_ERRORS,
    APIError,
    engine_error,
    error_body,
    install_error_handlers,
    log,
)
from flashmoe_backend.server.gate import EngineGate, Generation
from flashmoe_backend.server.settings import ServerSettings

#: What needs no API key: liveness probes carry none.
OPEN_PATHS = frozenset({"/health"})


class Guard:
    """ASGI middleware in front of every route: the API key, then the body limit.

    Both are checked before the body is read (FastAPI reads it before any dependency runs), so an
    unauthenticated client gets 401 whatever it sends, and nobody can make the server hold more
    than ``settings.max_body_bytes`` of body: 413, whether the body announces its length or is
    sent in chunks (then it is counted as it arrives).
    """

    def __init__(self, app: Any, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.settings.api_key is not None and scope.get("path") not in OPEN_PATHS:
            if not _has_key(headers.get(b"authorization", b""), self.settings.api_key):
                return await _send(
                    APIError(
                        401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                        type="authentication_error", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    ),
                    send,
                )
        limit = self.settings.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send(_too_large(limit), send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # An HTTPException: FastAPI turns any other error while reading a body into 400.
                    raise HTTPException(413, _too_large(limit).message)
            return message

        await self.app(scope, counted, send)


def _has_key(header: bytes, key: str) -> bool:
    scheme, _, given = header.decode("latin-1").partition(" ")
    # compare_digest: the time taken does not tell how much of a guessed key was right
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
        code="request_too_large",
    )


async def _send(error: APIError, send: Callable) -> None:
    async def no_body() -> dict:
        return {"type": "http.disconnect"}

    await error.response()({"type": "http"}, no_body, send)


def create_app(engine: Any, settings: ServerSettings) -> FastAPI:
    """An OpenAI-compatible app serving ``engine`` (a loaded ``FlashMoE``) as ``settings.model_id``.

    The app holds the engine but does not own it: the caller closes it after the server stops.
    ``app.state.gate`` is the requests' queue (``EngineGate``).
    """
    app = FastAPI(title="flashmoe", summary="OpenAI-compatible API over a FlashMoE engine")
    install_error_handlers(app)
    app.add_middleware(Guard, settings=settings)
    gate = EngineGate(engine, max_queue=settings.max_queue, timeout=settings.timeout)
    app.state.gate = gate
    app.state.settings = settings
    created = int(time.time())

    def served(model: str) -> None:
        # The model is chosen when the server starts; a request only names it.
        if model != settings.model_id:
            raise APIError(
                404, f"the model {model!r} does not exist; this server serves {settings.model_id!r}",
                param="model", code="model_not_found",
            )

    async def admit(prompt: Any, kwargs: dict[str, Any], prompt_param: str) -> Generation:
        try:
            return await gate.open(prompt, kwargs)
        except ENGINE_ERRORS as e:
            raise engine_error(e, prompt_param) from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness (no API key needed), and how many requests are queued or running."""
        return {"status": "ok", "model": settings.model_id, "requests": gate.admitted}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one model served."""
        return protocol.model_list(settings.model_id, created)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        """The served model; 404 for any other."""
        served(model_id)
        return protocol.model_list(settings.model_id, created)["data"][0]

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request) -> Any:
        """OpenAI's chat completions, streamed (SSE) or not."""
        served(body.model)
        messages, kwargs = body.engine_arguments(settings)
        generation = await admit(messages, kwargs, "messages")
        if body.stream:
            events = streaming.chat_events(generation.items(), settings.model_id, body.include_usage)
            return _sse(events, generation)
        return protocol.chat_completion(await _result(generation, request), settings.model_id)

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request) -> Any:
        """OpenAI's (legacy) text completions: the prompt as is, no chat template."""
        served(body.model)
        prompt, kwargs = body.engine_arguments(settings)
        generation = await admit(prompt, kwargs, "prompt")
        if body.stream:
            events = streaming.completion_events(generation.items(), settings.model_id, body.include_usage)
            return _sse(events, generation)
        return protocol.text_completion(await _result(generation, request), settings.model_id)

    return app


async def _result(generation: Generation, request: Request) -> GenerationResult:
    """The generation's result; a client that disconnects while waiting for it cancels it
    (uvicorn does not cancel a handler whose client left, so the request's receive channel is
    watched: after the body it only ever says ``http.disconnect``)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        generation.release()

    watcher = asyncio.create_task(watch())
    try:
        result = None
        async for item in generation.items(only_result=True):
            if isinstance(item, GenerationResult):
                result = item
    finally:
        watcher.cancel()
    if result is None:  # pragma: no cover - the engine always ends with its result
        raise APIError(500, "the generation ended without a result", type="server_error")
    return result


def _sse(events: AsyncIterator[str], generation: Generation) -> EventSourceResponse:
    """A streamed response (sse-starlette: it stops the body when the client disconnects, sends
    a keep-alive comment every 15 s, so proxies keep a long prefill's connection open, and
    ``Cache-Control: no-store``).

    An error after the headers went out (a timeout, a bug) is sent as an error event, as OpenAI
    does, and the stream ends without ``[DONE]``."""

    async def body() -> AsyncIterator[str]:
        try:
            async for data in events:
                yield data
        except APIError as e:
            yield streaming.event(e.body())
            return
        except Exception as e:
            log.exception("error while streaming")
            yield streaming.event(error_body(f"internal server error ({type(e).__name__})", "server_error"))
            return
        finally:
            generation.release()  # also when the client left: the engine stops at its next step
        yield streaming.DONE

    # sep "\n": clients that split events on a blank line written as "\n\n" read them too
    return EventSourceResponse(body(), sep="\n")
