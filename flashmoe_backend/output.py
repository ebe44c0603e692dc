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

from flashmoe_backend.constrained.constraint import Constraint, IncompleteOutputError, StructuredOutputError
from flashmoe_backend.tools.calls import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    InvalidToolCall,
    ToolCall,
    ToolSpec,
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
    _processor: Any = None

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
            return cls("forced_tools", specs, fmt, constraint, parallel=parallel_tool_calls)
        if response_format is not None:
            result_format = Constraint.from_response_format(response_format, tokenizer)
            constraint = result_format
            if in_think:  # let the model finish thinking, then hold it to the format
                constraint = Constraint.from_response_format(response_format, tokenizer,
                                                             reasoning_prefix=True)
            return cls("structured", specs, fmt, constraint, result_format,
                       render_tools=choice != "none")
        if choice == "auto":
            constraint = tool_call_constraint(specs, "required", fmt, tokenizer,
                                              parallel=parallel_tool_calls, mode="auto",
                                              reasoning_prefix=in_think)
            return cls("auto_tools", specs, fmt, constraint, parallel=parallel_tool_calls)
        return cls("text", specs, fmt, render_tools=False)

    def processors(self, max_tokens: int) -> list:
        """Fresh logits processors for one generation."""
        if self.constraint is None:
            return []
        self._processor = self.constraint.logits_processor(max_tokens)
        return [self._processor]

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
        content, calls, invalid = parse_tool_calls(rest, self.tool_format, self.tools)
        incomplete = self._processor is not None and not self._processor.is_complete
        if self.mode == "forced_tools":
            if incomplete:
                partial = InvalidToolCall(None, rest, "incomplete tool call: max_tokens reached")
                return Finished("", reasoning, invalid_tool_calls=[partial],
                                finish_reason="incomplete")
            return Finished("", reasoning, calls, invalid, finish_reason="tool_calls")
        if self.mode == "text":  # tool_choice "none": markup removed, no calls returned
            return Finished(content, reasoning, finish_reason=finish_reason)
        if incomplete:
            finish_reason = "incomplete"
        elif calls and not invalid:
            finish_reason = "tool_calls"
        return Finished(content, reasoning, calls, invalid, finish_reason=finish_reason)


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
