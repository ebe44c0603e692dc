"""What the server tests share: the demo engine (one per test module), real uvicorn servers on
loopback ports started in a thread, and the demo model's prompts.

``serve(**settings)`` starts a server of the module's engine with those ``ServerSettings`` (the
model id is ``demo``) and returns it (``.url``, ``.client()``: the official ``openai`` client,
``.gate``); servers stop at the end of the module. Several servers may share the engine: its
own lock serialises their generations. ``spawn(*options)`` runs ``flashmoe serve demo`` in a
process of its own instead, for what needs a fresh process (a restart).
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
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


@contextlib.contextmanager
def spawn(*options: str, timeout: float = 120) -> Iterator[str]:
    """``flashmoe serve demo --port 0 --offline *options`` in a new process; yields its base URL
    (``.../v1``) once it serves, and ends it with Ctrl-C (SIGINT) as a user would."""
    process = subprocess.Popen(
        [sys.executable, "-m", "flashmoe_backend.cli", "serve", "demo", "--port", "0", "--offline", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,  # stdout: uvicorn's access log
    )
    try:
        port, seen, drain = None, [], None
        deadline = time.monotonic() + timeout
        for line in process.stderr:  # "flashmoe: serving 'demo' at http://127.0.0.1:PORT/v1"
            seen.append(line)
            if match := re.search(r"serving 'demo' at http://127\.0\.0\.1:(\d+)/v1", line):
                port = int(match.group(1))
                break
            assert time.monotonic() < deadline, "the server did not start in time"
        assert port, "the server did not say where it serves:\n" + "".join(seen)
        # keep reading what it logs: a full pipe would block it
        drain = threading.Thread(target=seen.extend, args=(process.stderr,), daemon=True)
        drain.start()
        url = f"http://127.0.0.1:{port}/v1"
        import httpx

        while True:  # the line comes just before uvicorn starts: wait until it answers
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "the server did not answer"
            time.sleep(0.05)
        yield url
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130, "".join(seen)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if drain is not None:
            drain.join(10)  # at the end of the pipe, now that the process is gone
        process.stderr.close()
