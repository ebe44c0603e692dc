"""Running a blocking iterator (a generation) for asyncio without blocking the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Yield on the event loop the items of ``make_iterator()``, which runs in a worker thread.

    Items travel through an ``asyncio.Queue``; exceptions (also from building the iterator,
    e.g. a bad schema) are re-raised to the consumer. When the consumer stops early (break,
    cancellation, ``aclose``) the worker closes the iterator at its next item, which ends the
    generation and frees the engine for the next caller.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def post(entry) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, entry)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def work() -> None:
        try:
            iterator = make_iterator()
            try:
                for item in iterator:
                    if stop.is_set():
                        break
                    post((item, None))
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the consumer, who re-raises it
            post((None, exc))
        finally:
            post(_END)

    threading.Thread(target=work, name="flashmoe-stream", daemon=True).start()
    try:
        while True:
            entry = await queue.get()
            if entry is _END:
                return
            item, exc = entry
            if exc is not None:
                raise exc
            yield item
    finally:
        stop.set()
