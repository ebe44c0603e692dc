"""Terminal output of the ``flashmoe`` commands: streamed answers with the reasoning set apart, and
the statistics line.

Reasoning (text the model writes inside ``<think>``) is never printed as if it were the answer: on
a terminal it is dimmed, elsewhere (a pipe, a file) each of its lines starts with
``REASONING_PREFIX``, and it can be hidden. Only the standard library is imported here: the
commands that stream import the engine themselves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, TextIO

if TYPE_CHECKING:
    from flashmoe_backend.distributed import DistributedStats
    from flashmoe_backend.generation.params import Chunk, GenerationResult
    from flashmoe_backend.generation.stats import Stats

MiB = 1024**2
DIM = "\x1b[2m"
RESET = "\x1b[0m"
REASONING_PREFIX = "[reasoning] "

ReasoningStyle = Literal["dim", "prefix", "hide"]


def reasoning_style(out: TextIO, hide: bool = False) -> ReasoningStyle:
    """How to show reasoning on ``out``: hidden if asked, dimmed on a colour terminal, else
    prefixed (escape codes would end up in files; ``NO_COLOR`` is https://no-color.org)."""
    if hide:
        return "hide"
    is_tty = getattr(out, "isatty", lambda: False)()
    return "dim" if is_tty and not os.environ.get("NO_COLOR") else "prefix"


def _prefixed(lines: list[str], first_starts_line: bool) -> str:
    """Reasoning lines with the prefix in front of each (none on blank lines: no trailing space)."""
    out = []
    for i, line in enumerate(lines):
        if i == 0 and not first_starts_line:
            out.append(line)  # the rest of a line already prefixed
        else:
            out.append(REASONING_PREFIX + line if line else REASONING_PREFIX.rstrip())
    return "\n".join(out)


class ChunkPrinter:
    """Writes streamed ``(kind, text)`` pieces, kind "content" or "reasoning", to ``out``.

    Each run of one kind is a segment. Whitespace at a segment's edges is dropped (the model's
    ``\\n</think>\\n\\n`` around reasoning, or a trailing newline), so trailing whitespace is held
    back until more text of the same kind follows. A segment of reasoning ends with a newline
    before the answer starts.
    """

    def __init__(self, out: TextIO, style: ReasoningStyle):
        self.out = out
        self.style = style
        self._kind: str | None = None
        self._started = False  # the current segment has printed text
        self._pending = ""  # held-back trailing whitespace of the current segment

    def write(self, kind: str, text: str) -> None:
        """Print one streamed piece."""
        if kind == "reasoning" and self.style == "hide":
            return
        if kind != self._kind:
            if self._started:
                self.out.write("\n")
            self._kind, self._started, self._pending = kind, False, ""
        text = self._pending + text
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        self._pending = text[len(body) :]
        if body:
            self.out.write(self._styled(kind, body))
            self.out.flush()
            self._started = True

    def _styled(self, kind: str, body: str) -> str:
        if kind != "reasoning":
            return body
        if self.style == "dim":  # reset at once: an interrupt never leaves the terminal dim
            return DIM + body + RESET
        return _prefixed(body.split("\n"), first_starts_line=not self._started)

    def close(self) -> None:
        """End the output with one newline (also when nothing was printed: it ends the prompt line)."""
        self.out.write("\n")
        self.out.flush()


def stream_to_console(
    items: Iterable[Chunk | GenerationResult], out: TextIO | None = None, *, hide_reasoning: bool = False
) -> GenerationResult:
    """Print the chunks of ``FlashMoE.stream(...)`` as they come; return its ``GenerationResult``."""
    # imported here: mlx-lm is only imported by commands that generate
    from flashmoe_backend.generation.params import GenerationResult

    out = out or sys.stdout
    printer = ChunkPrinter(out, reasoning_style(out, hide_reasoning))
    result = None
    for item in items:
        if isinstance(item, GenerationResult):
            result = item
        else:
            printer.write(item.kind, item.text)
    printer.close()
    if result is None:
        raise RuntimeError("generation ended without a result")  # pragma: no cover
    return result


def unanswered_hint(result: GenerationResult) -> str | None:
    """Why the answer is empty when the model only reasoned (what to do about it); else ``None``."""
    if result.text.strip() or result.tool_calls or not result.reasoning:
        return None
    if result.finish_reason == "length":
        return (
            f"the model spent all {result.stats.generated_tokens} tokens reasoning and gave no "
            "answer; raise --max-tokens or pass --no-enable-thinking"
        )
    return "the model reasoned but gave no answer; try --no-enable-thinking"


def format_stats(stats: Stats) -> str:
    """One line: token rates, expert cache hits and misses, bytes read, I/O and compute time."""
    return (
        f"[flashmoe] prompt {stats.prompt_tokens} tok at {stats.prompt_tps:.1f} tok/s, "
        f"generated {stats.generated_tokens} tok at {stats.generation_tps:.1f} tok/s | "
        f"experts: {stats.hits} hits, {stats.misses} misses ({stats.hit_rate:.0%} hit rate), "
        f"{stats.bytes_read / MiB:.1f} MiB read, I/O wait {stats.io_seconds:.2f}s, "
        f"compute {stats.compute_seconds:.2f}s, cache {stats.cache_bytes / MiB:.1f} MiB "
        f"(peak {stats.cache_bytes_peak / MiB:.1f} MiB)"
    )


def print_stats(stats: Stats, file: TextIO | None = None) -> None:
    """Print ``format_stats(stats)`` to ``file`` (default: stderr, so stdout holds only text)."""
    print(format_stats(stats), file=file or sys.stderr)


def format_distributed_stats(stats: DistributedStats) -> list[str]:
    """One line per rank of a group (``mlx.launch``): what it read and served, and its time in
    collectives per generated token (waiting for slower ranks included)."""
    tokens = max(stats.generated_tokens, 1)
    return [
        f"[flashmoe] rank {r.rank}: {r.bytes_read / MiB:.1f} MiB read, {r.hits} hits, "
        f"{r.misses} misses ({r.hit_rate:.0%} hit rate), I/O wait {r.io_seconds:.2f}s, "
        f"collectives {1000 * r.comm_seconds / tokens:.1f} ms/token, cache peak "
        f"{r.cache_bytes_peak / MiB:.1f} of {r.budget_bytes / MiB:.1f} MiB"
        for r in stats.ranks
    ]
