"""What a generation must produce, and turning its raw text into content, reasoning, tool calls
and a parsed object.

``OutputPlan`` is decided before generation (so bad tools, tool choices and schemas fail early):
free text, a structured ``response_format``, forced tool calls (``required`` / a named tool) or
``auto`` tool calls. It supplies the logits processors of one generation and, afterwards,
splits the raw text. ``MarkupFilter`` does the same split incrementally for streaming, so no
``<think>`` or ``<tool_call>`` markup ever reaches streamed content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx
import numpy as np

from .structured import Constraint, IncompleteOutputError, StructuredOutputError
from .tool_calls import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    AutoToolProcessor,
    InvalidToolCall,
    ToolCall,
    ToolSpec,
    bare_text_regex,
    detect_tool_format,
    normalize_tool_choice,
    normalize_tools,
    parse_tool_calls,
    split_reasoning,
    tool_call_constraint,
)

Mode = Literal["text", "structured", "forced_tools", "auto_tools"]


@dataclass
class Finished:
    """The parts of a finished generation's text."""

    content: str
    reasoning: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
    parsed: Any = None
    finish_reason: str = "stop"


@dataclass
class OutputPlan:
    """How one generation is constrained and how its text is read back."""

    mode: Mode
    tools: list[ToolSpec]
    tool_format: str
    constraint: Constraint | None = None  # what generation is held to (reasoning prefix included)
    result_format: Constraint | None = None  # structured mode: what the text after reasoning is
    parallel: bool = True
    render_tools: bool = True
    _auto: AutoToolProcessor | None = None

    @classmethod
    def build(cls, tokenizer, *, tools: Sequence[Any] | None, tool_choice: Any,
              parallel_tool_calls: bool, response_format: Any, in_think: bool) -> OutputPlan:
        """Validate everything and compile the grammars (raises ``ValueError`` on bad input)."""
        specs = normalize_tools(tools)
        choice, _ = normalize_tool_choice(tool_choice, specs)
        fmt = detect_tool_format(tokenizer.chat_template)
        if choice in ("required", "named"):
            if response_format is not None:
                raise ValueError("response_format cannot be combined with a forced tool_choice")
            constraint = tool_call_constraint(specs, tool_choice, fmt, tokenizer,
                                              parallel=parallel_tool_calls,
                                              reasoning_prefix=in_think)
            return cls("forced_tools", specs, fmt, constraint, parallel_tool_calls)
        if response_format is not None:
            result_format = Constraint.from_response_format(response_format, tokenizer)
            constraint = result_format
            if in_think:  # let the model finish thinking, then hold it to the format
                reasoning = bare_text_regex((THINK_CLOSE,)) + THINK_CLOSE
                constraint = Constraint.from_regex(reasoning + result_format.regex, tokenizer)
            return cls("structured", specs, fmt, constraint, result_format,
                       render_tools=choice != "none")
        if choice == "auto":
            return cls("auto_tools", specs, fmt, parallel=parallel_tool_calls)
        return cls("text", specs, fmt, render_tools=False)

    def processors(self, tokenizer, in_think: bool, max_tokens: int) -> list:
        """Fresh logits processors for one generation."""
        if self.constraint is not None:
            return [CloseInTime(self.constraint.logits_processor(), max_tokens)]
        if self.mode == "auto_tools":
            self._auto = AutoToolProcessor(tokenizer, self.tools, self.tool_format,
                                           parallel=self.parallel, in_think=in_think)
            return [self._auto]
        return []

    def finish(self, raw: str, finish_reason: str, in_think: bool) -> Finished:
        """Split ``raw`` into content, reasoning, tool calls, parsed object; set finish reason."""
        if self.mode == "structured":
            # The format's own text may contain markup-like strings: only a leading reasoning
            # block (when the prompt opened one) is split off.
            reasoning, rest = _leading_reasoning(raw) if in_think else (None, raw)
            try:
                parsed = self.result_format.parse(rest)
            except IncompleteOutputError:
                return Finished(rest, reasoning, finish_reason="incomplete")
            return Finished(rest, reasoning, parsed=parsed, finish_reason=finish_reason)
        reasoning, rest = split_reasoning(raw, in_think=in_think)
        reasoning = reasoning or None
        if self.mode == "forced_tools":
            try:
                calls = self.constraint.parse(raw)
            except IncompleteOutputError:
                partial = InvalidToolCall(None, rest, "incomplete tool call: max_tokens reached")
                return Finished("", reasoning, invalid_tool_calls=[partial],
                                finish_reason="incomplete")
            return Finished("", reasoning, tool_calls=calls, finish_reason="tool_calls")
        content, calls, invalid = parse_tool_calls(rest, self.tool_format, self.tools)
        if self.mode == "text":  # tool_choice "none": markup removed, no calls returned
            return Finished(content, reasoning, finish_reason=finish_reason)
        if self._auto is not None and self._auto.triggered and not self._auto.is_complete:
            finish_reason = "incomplete"
        elif calls and not invalid:
            finish_reason = "tool_calls"
        return Finished(content, reasoning, calls, invalid, finish_reason=finish_reason)


class CloseInTime:
    """Wraps a constrained processor so the structure is complete by ``max_tokens``.

    Each automaton state's distance (in tokens) to an accepting state is known from the index;
    once the tokens left could no longer cover the distance after some choice, only tokens that
    keep the structure completable in time stay allowed. Earlier steps are untouched, so this
    only shapes the last few tokens (closing an open string, then the object), and a
    generation that has room ends as the model chose.
    """

    _DISTANCES: dict[int, tuple[Any, dict[int, int], int]] = {}  # id(index) -> (index, dist, max)

    def __init__(self, inner, max_tokens: int):
        self.inner = inner
        self.max_tokens = max_tokens
        self.dist, self.max_dist = _distances(inner.index)

    def __getattr__(self, name: str) -> Any:  # is_complete, generated_ids, ... of the inner one
        return getattr(self.inner, name)

    def __call__(self, tokens, logits):
        logits = self.inner(tokens, logits)
        left = self.max_tokens - len(self.inner.generated_ids)  # including this step's token
        if left > self.max_dist + 1 or self.inner.eos_generated:
            return logits
        index, state = self.inner.index, self.inner.guide.get_state()
        # The index ends in an end-of-text sentinel that is never generated: one step less.
        spare = 1 if getattr(self.inner, "_sentinel", None) is not None else 0
        eos = set(self.inner.vocabulary.eos_token_ids)
        keep = []
        for t in self.inner.allowed_token_ids():
            if t in eos:  # allowed only on a full match: ending is always in time
                keep.append(t)
                continue
            # A full match may go on (another parallel call): only where it can end in time.
            nxt = index.get_next_state(state, t)
            if nxt is not None and self.dist.get(nxt, left + spare) - spare <= left - 1:
                keep.append(t)
        if not keep:  # no way to finish in time from here: leave the constraint as it is
            return logits
        mask = np.zeros(logits.shape[-1], dtype=bool)
        mask[[t for t in keep if t < len(mask)]] = True
        return mx.where(mx.array(mask), logits, mx.array(-np.inf, dtype=logits.dtype))


def _distances(index) -> tuple[dict[int, int], int]:
    """Fewest tokens from each state of ``index`` to an accepting state (reverse BFS)."""
    cached = CloseInTime._DISTANCES.get(id(index))
    if cached is not None and cached[0] is index:
        return cached[1], cached[2]
    reverse: dict[int, set[int]] = {}
    for state, moves in index.get_transitions().items():
        for nxt in set(moves.values()):
            reverse.setdefault(nxt, set()).add(state)
    dist = {s: 0 for s in index.get_final_states()}
    frontier = list(dist)
    while frontier:
        step = []
        for state in frontier:
            for prev in reverse.get(state, ()):
                if prev not in dist:
                    dist[prev] = dist[state] + 1
                    step.append(prev)
        frontier = step
    longest = max(dist.values(), default=0)
    CloseInTime._DISTANCES[id(index)] = (index, dist, longest)
    return dist, longest


def _leading_reasoning(raw: str) -> tuple[str | None, str]:
    end = raw.find(THINK_CLOSE)
    if end < 0:
        return raw.strip() or None, ""
    return raw[:end].strip() or None, raw[end + len(THINK_CLOSE) :]


class MarkupFilter:
    """Routes streamed text: reasoning inside ``<think>``, nothing inside ``<tool_call>``,
    content elsewhere. Text that might be the start of a tag is held back until it is not.
    With ``markup=False`` (structured output) only the end of a leading reasoning block is
    recognised; after it everything is content, tag-like strings included."""

    _ALL_TAGS = (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)

    def __init__(self, in_think: bool, markup: bool = True):
        self.state = "reasoning" if in_think else "content"
        self._markup = markup
        self._pending = ""

    def _tags(self) -> tuple[str, ...]:
        if self._markup:
            return self._ALL_TAGS
        return (THINK_CLOSE,) if self.state == "reasoning" else ()

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        """Returns ``(kind, text)`` pieces, kind ``"content"`` or ``"reasoning"``."""
        self._pending += text
        out: list[tuple[str, str]] = []
        while self._pending:
            i = self._pending.find("<")
            if i < 0:
                self._emit(out, self._pending)
                self._pending = ""
                break
            self._emit(out, self._pending[:i])
            self._pending = self._pending[i:]
            tags = self._tags()
            tag = next((t for t in tags if self._pending.startswith(t)), None)
            if tag is None:
                if not final and any(t.startswith(self._pending) for t in tags):
                    break  # maybe a tag still arriving
                self._emit(out, "<")
                self._pending = self._pending[1:]
                continue
            self._pending = self._pending[len(tag):]
            self.state = {THINK_OPEN: "reasoning", THINK_CLOSE: "content",
                          TOOL_CALL_OPEN: "tool_call", TOOL_CALL_CLOSE: "content"}[tag]
        return out

    def _emit(self, out: list, text: str) -> None:
        if text and self.state != "tool_call":
            out.append((self.state, text))


def prompt_in_think(tokenizer, prompt_ids: Sequence[int]) -> bool:
    """Whether the prompt ends inside an open ``<think>`` block (thinking enabled)."""
    tail = tokenizer.decode(list(prompt_ids[-64:]))
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


__all__ = ["Finished", "MarkupFilter", "OutputPlan", "StructuredOutputError", "prompt_in_think"]
