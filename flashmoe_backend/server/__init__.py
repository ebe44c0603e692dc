"""``flashmoe serve``: an OpenAI-compatible HTTP server over one FlashMoE engine.

The server only translates: OpenAI's JSON to the engine's arguments and the engine's results back
(``protocol`` and ``streaming``), with the glue every front end shares in
``flashmoe_backend.chat``. Tool-call parsing, constrained JSON, reasoning extraction and stop
strings are the engine's. ``gate`` queues requests for the one engine and cancels abandoned
generations; ``errors`` writes OpenAI's error JSON; ``run`` serves the app with uvicorn.

FastAPI and uvicorn are imported by ``app``, ``errors`` and ``run`` only, on first use of
``create_app`` / ``serve`` (PEP 562), never by ``flashmoe_backend`` itself, the CLI's startup or
``settings`` (whose defaults the CLI reads).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flashmoe_backend.server.app import create_app
    from flashmoe_backend.server.run import serve
    from flashmoe_backend.server.settings import ServerSettings

_dynamic_imports = {"ServerSettings": "settings", "create_app": "app", "serve": "run"}

__all__ = ["ServerSettings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access."""
    module = _dynamic_imports.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
