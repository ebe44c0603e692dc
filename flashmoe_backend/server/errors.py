"""OpenAI's error JSON, ``{"error": {"message", "type", "param", "code"}}``, with the right status.

Every failure a client can cause ends here: ``APIError`` for the server's own refusals (401, 404,
413, 429, 504), the engine's ``InvalidRequestError``s (a bad prompt, tool, schema, value, or a
context overflow: 400 with the engine's message, which names the item at fault), and pydantic's
validation errors (400 naming the field). Anything else is a 500 whose message is the exception's
type only: a bug must not kill the server, nor leak its internals.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashmoe_backend.constrained.json_schema import UnsupportedSchemaError
from flashmoe_backend.errors import (
    ContextWindowError,
    InvalidRequestError,
    ParameterError,
    PromptError,
    ResponseFormatError,
    ToolError,
)

log = logging.getLogger("flashmoe.server")


class APIError(Exception):
    """A refusal the server itself makes, answered as OpenAI's error JSON with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The error as OpenAI's JSON object."""
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        """The error as a response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


#: The request field each engine error is about (OpenAI's ``param``), most specific first;
#: ``None``: the prompt's field (``messages`` or ``prompt``).
_ENGINE_PARAMS: tuple[tuple[type[Exception], str | None, str | None], ...] = (
    (ContextWindowError, None, "context_length_exceeded"),
    (PromptError, None, None),
    (ToolError, "tools", None),
    (ResponseFormatError, "response_format", None),
    (UnsupportedSchemaError, "response_format", None),
)

#: Request fields a ``ParameterError``'s message may start with ("top_p must be a number ...").
_PARAMETERS = frozenset(
    ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
     "parallel_tool_calls", "enable_thinking")
)


def engine_error(error: Exception, prompt_param: str = "messages") -> APIError:
    """The 400 of an engine error (``InvalidRequestError`` or ``UnsupportedSchemaError``), with the
    engine's message; ``prompt_param`` is the request's field holding the prompt."""
    for kind, param, code in _ENGINE_PARAMS:
        if isinstance(error, kind):
            return APIError(400, str(error), param=param or prompt_param, code=code)
    if isinstance(error, ParameterError):  # the engine's messages start with the parameter's name
        match = re.match(r"(\w+)", str(error))
        name = match.group(1) if match else None
        return APIError(400, str(error), param=name if name in _PARAMETERS else None)
    return APIError(400, str(error))


#: What the engine raises for a caller's mistake.
ENGINE_ERRORS: tuple[type[Exception], ...] = (InvalidRequestError, UnsupportedSchemaError)


def _field(loc: tuple) -> str:
    # ("body", "messages", 0, "role") -> "messages[0].role"; "body" alone is the whole body
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(error: RequestValidationError) -> APIError:
    """A 400 naming the first bad field and what is wrong with it (pydantic's words)."""
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
    name = _field(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}")
    where = f"'{name}'" if name else "the request body"
    return APIError(400, f"{where}: {first.get('msg')}", param=name or None)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` OpenAI's error JSON."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(InvalidRequestError)
    async def _engine(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return engine_error(exc).response()

    @app.exception_handler(UnsupportedSchemaError)
    async def _schema(request: Request, exc: UnsupportedSchemaError) -> JSONResponse:
        return engine_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # routing's own refusals (no such route: 404, wrong method: 405) and the body limit (413)
        message = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        error = APIError(exc.status_code, str(message), code=codes.get(exc.status_code))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error serving %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__})", type="server_error").response()
