"""The one engine's door: a bounded queue, a timeout per request, and cancelling abandoned
generations.

``EngineGate.open(prompt, kwargs)`` admits a request (``APIError`` 429 when ``max_queue`` are
already waiting), and has the engine check it (``engine.stream`` checks everything when called,
so a bad request is refused with 400 before it waits, and before a streamed response's headers).
``Generation.items()`` then waits for the request's turn and yields the engine's items.

Cancellation: each generation carries a logits processor that raises ``GenerationCancelled`` once
the request is abandoned (client gone, timeout). The engine calls it at every decode step, so a
generation stops within one step even while the engine holds text back (a tool call is never
streamed as text). The engine's own lock keeps the next generation waiting until this one has
unwound, so it starts on an engine in the state a fresh one is in (prompt-cache snapshots are
copies, taken at prefill). The prompt's prefill itself is not interrupted: an abandoned request
stops at its first decode step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio

from flashmoe_backend.generation.aio import iterate_in_thread
from flashmoe_backend.generation.params import Chunk, GenerationResult
from flashmoe_backend.server.errors import APIError


class GenerationCancelled(Exception):
    """Raised inside the engine's decode loop to stop an abandoned generation."""


class CancelCheck:
    """A logits processor that passes the logits through and raises ``GenerationCancelled`` once
    ``event`` is set; ``calls`` counts the decode steps it saw (tests read it)."""

    def __init__(self, event: threading.Event):
        self.event = event
        self.calls = 0

    def __call__(self, tokens: Any, logits: Any) -> Any:
        self.calls += 1
        if self.event.is_set():
            raise GenerationCancelled("the request was abandoned")
        return logits


class EngineGate:
    """Queues requests for one engine: one generates, at most ``max_queue`` wait.

    Must be used from one event loop (the server's); ``admitted`` is only touched there.
    """

    def __init__(self, engine: Any, *, max_queue: int, timeout: float | None):
        self.engine = engine
        self.max_queue = max_queue
        self.timeout = timeout
        self._turn = asyncio.Lock()  # FIFO: requests generate in the order they were admitted
        self.admitted = 0  # requests checked, waiting or generating
        self.last: Generation | None = None  # the latest admitted request (tests inspect it)

    async def open(self, prompt: Any, kwargs: dict[str, Any]) -> Generation:
        """Admit a request and have the engine check it: 429 when the queue is full, the engine's
        ``InvalidRequestError`` for a bad request."""
        if self.admitted > self.max_queue:  # one generating + max_queue waiting
            raise APIError(
                429,
                f"the server is busy: {self.admitted} requests are queued or running "
                f"(--max-queue {self.max_queue}); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        generation = Generation(self)
        try:
            kwargs = {**kwargs, "logits_processors": [generation.check]}
            # In a thread: checking compiles grammars and renders the prompt, which can take a
            # while; the model itself is not touched until the turn comes.
            generation.iterator = await asyncio.to_thread(self.engine.stream, prompt, **kwargs)
        except BaseException:
            generation.release()
            raise
        self.last = generation
        return generation


class Generation:
    """One admitted request: ``items()`` waits for its turn and yields the engine's items."""

    def __init__(self, gate: EngineGate):
        self.gate = gate
        gate.admitted += 1
        self.started = time.monotonic()
        self.cancelled = threading.Event()
        self.check = CancelCheck(self.cancelled)
        self.iterator: Iterator[Chunk | GenerationResult] | None = None
        #: set once the engine's generation has ended (finished, failed or stopped), in its thread
        self.ended = threading.Event()
        self._released = False

    def release(self) -> None:
        """Leave the queue (idempotent); a generation still running stops at its next step."""
        self.cancelled.set()
        if not self._released:
            self._released = True
            self.gate.admitted -= 1

    def __del__(self) -> None:  # a response whose body was never iterated must not hold a place
        if not self._released:
            self.release()

    def _remaining(self) -> float | None:
        if self.gate.timeout is None:
            return None
        return max(self.gate.timeout - (time.monotonic() - self.started), 0.0)

    async def items(self, only_result: bool = False) -> AsyncIterator[Chunk | GenerationResult]:
        """The engine's ``Chunk``s, then its ``GenerationResult`` (``only_result``: just the
        result, for a response that is not streamed). Raises ``APIError`` 504 when the request's
        timeout passes, waiting or generating (the generation is stopped)."""
        turn = self.gate._turn
        try:
            try:
                with anyio.fail_after(self._remaining()):
                    await turn.acquire()
            except TimeoutError:
                raise self._timeout("waiting in the queue") from None
            try:
                async for item in self._generate(only_result):
                    yield item
            finally:
                # The engine may still be unwinding in its thread; its own lock holds the next
                # generation until it has.
                turn.release()
        finally:
            self.release()

    async def _generate(self, only_result: bool) -> AsyncIterator[Chunk | GenerationResult]:
        iterator, ended = self.iterator, self.ended

        def run() -> Iterator[Chunk | GenerationResult]:
            try:
                for item in iterator:
                    # Chunks nobody streams stay in the engine's thread: handing each to the
                    # event loop costs a wake-up per token (measured in bench/bench_server.py).
                    # Cancellation does not need them: CancelCheck stops the engine itself.
                    if not only_result or isinstance(item, GenerationResult):
                        yield item
            finally:
                ended.set()

        items = iterate_in_thread(run)
        try:
            while True:
                # The deadline covers each wait for the engine, never a ``yield``: a cancel
                # scope around a yield would cancel whatever the consumer awaits meanwhile.
                try:
                    with anyio.fail_after(self._remaining()):
                        item = await items.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._timeout("generating") from None
                except GenerationCancelled:  # released (client gone) while the engine ran
                    raise APIError(499, "the request was cancelled", code="cancelled") from None
                yield item
        finally:
            self.cancelled.set()  # before closing: the engine stops at its next step
            await _close(items)

    def _timeout(self, doing: str) -> APIError:
        return APIError(
            504,
            f"the request timed out after {self.gate.timeout:g} s ({doing}); --timeout sets the limit",
            type="timeout_error",
            code="timeout",
        )


async def _close(items: Any) -> None:
    # Shielded: under a cancelled scope (the client left) every await would be cancelled again.
    with anyio.CancelScope(shield=True):
        await items.aclose()
