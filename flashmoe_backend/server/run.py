"""Running the app with uvicorn: what ``flashmoe serve`` calls."""

from __future__ import annotations

import socket
from typing import Any

import uvicorn

from flashmoe_backend.server.app import create_app
from flashmoe_backend.server.settings import ServerSettings


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host``:``port`` (``port`` 0: any free one). Raises ``OSError``
    naming the address when it cannot be bound; ``flashmoe serve`` binds before loading the
    model, so a port in use is reported at once rather than after a long load."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses the port at once
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    # Listening now: connections made before uvicorn starts wait in the backlog, not refused.
    sock.listen(2048)
    return sock


def server(engine: Any, settings: ServerSettings, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server of ``engine``'s app (``server.run(sockets=[listen(host, port)])``)."""
    config = uvicorn.Config(
        create_app(engine, settings),
        log_level=log_level,
        # Ctrl-C: open streams get this long to end; sse-starlette then closes them
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def serve(engine: Any, settings: ServerSettings, sock: socket.socket) -> None:
    """Serve ``engine`` on the bound socket ``sock`` until interrupted (Ctrl-C)."""
    server(engine, settings).run(sockets=[sock])
