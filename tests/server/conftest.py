"""What the server tests share: the demo engine (one per test module), real uvicorn servers on
loopback ports started in a thread, and the demo model's prompts.

``serve(**settings)`` starts a server of the module's engine with those ``ServerSettings`` (the
model id is ``demo``) and returns it (``.url``, ``.client()``: the official ``openai`` client,
``.gate``); servers stop at the end of the module. Several servers may share the engine: its
own lock serialises their generations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from flashmoe_backend.cli.demo import DOCUMENT, QUESTION

MODEL = "demo"
GROUNDED = [
    {"role": "system", "content": "Use the following facts to answer.\n" + DOCUMENT},
    {"role": "user", "content": QUESTION},
]
#: A raw prompt the demo model continues until max_tokens: a generation as long as a test needs.
ENDLESS = "Once upon a time"


@dataclass
class Server:
    """A running server: its base URL (``.../v1``), its uvicorn server and its app's gate."""

    url: str
    uvicorn: Any
    thread: threading.Thread
    gate: Any

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def client(self, **options: Any):
        """The official openai client on this server; no retries (a 429 must reach the test)."""
        import openai

        return openai.OpenAI(base_url=self.url, api_key=options.pop("api_key", "unused"),
                             max_retries=0, **options)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def engine():
    """The embedded demo model, loaded once per test module."""
    from flashmoe_backend import FlashMoE

    engine = FlashMoE.load(MODEL)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def serve(engine) -> Iterator[Callable[..., Server]]:
    """Factory: ``serve(**ServerSettings fields) -> Server`` on a free loopback port."""
    from flashmoe_backend.server import ServerSettings
    from flashmoe_backend.server.run import listen, server

    started: list[Server] = []

    def start(**settings: Any) -> Server:
        sock = listen("127.0.0.1", 0)
        uv = server(engine, ServerSettings(model_id=MODEL, **settings), log_level="warning")
        thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = sock.getsockname()[1]
        s = Server(f"http://127.0.0.1:{port}/v1", uv, thread, uv.config.app.state.gate)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
