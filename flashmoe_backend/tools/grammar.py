"""The grammar of what the assistant writes when it may or must call tools.

:func:`tool_call_grammar` puts the per-format call grammars (``tools/xml.py``, ``tools/hermes.py``) together:

* ``tool_choice`` ``"required"`` gives the union over all tools, a named tool just that one;
  ``parallel`` allows one or more calls separated by a newline;
* ``mode="auto"`` is a lazy grammar: any text that does not contain ``<tool_call>`` (so EOS is
  allowed anywhere in it), and once the model writes ``<tool_call>``, the calls' grammar;
* ``reasoning_prefix`` puts a ``...</think>`` reasoning block first, for prompts that end
  inside ``<think>`` (in auto mode the reply may also end while still reasoning). It is not
  optional: llguidance's lexer cannot end an open-ended reasoning text at a ``<tool_call>``
  that might equally be part of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal

from flashmoe_backend.constrained.json_schema import DEFAULT_WHITESPACE
from flashmoe_backend.constrained.lark import THINK_BLOCK_RULES, lark_literal
from flashmoe_backend.tools import FORMATS
from flashmoe_backend.tools.specs import (
    TOOL_CALL_OPEN,
    ToolFormat,
    check_format,
    normalize_tool_choice,
    normalize_tools,
)

__all__ = ["tool_call_grammar"]

# Text without the tool-call opener, and text up to the first opener (lazy: the shortest).
_FREE_TEXT = (f'FREE_TEXT: /(?s:.*)/ & ~/(?s:.*){TOOL_CALL_OPEN}(?s:.*)/\n'
              f'call_opener[lazy]: ANY_TEXT {lark_literal(TOOL_CALL_OPEN)}')
_NO_THINK_END = "REASONING: /(?s:.*)/ & ~/(?s:.*)<\\/think>(?s:.*)/"


def tool_call_grammar(
    tools: Iterable[Any],
    tool_choice: Any = "required",
    fmt: ToolFormat = "hermes",
    parallel: bool = True,
    *,
    mode: Literal["forced", "auto"] = "forced",
    reasoning_prefix: bool = False,
    whitespace_pattern: str | None = DEFAULT_WHITESPACE,
) -> str:
    """The Lark grammar of the assistant's reply (see the module docstring)."""
    module = FORMATS[check_format(fmt)]
    specs = normalize_tools(tools)
    if not specs:
        raise ValueError("no tools to call")
    choice, name = normalize_tool_choice(tool_choice, specs)
    if choice == "none":
        raise ValueError("tool_choice 'none' has no tool-call grammar")
    chosen = [s for s in specs if s.name == name] if choice == "named" else specs
    for s in chosen:
        for note in s.unenforced:
            warnings.warn(f"flashmoe: tool {s.name!r}: {note}", stacklevel=3)
    rules = [module.call_rules(s, f"tool{i}", whitespace_pattern) for i, s in enumerate(chosen)]
    rules.append("call_body: " + " | ".join(f"tool{i}" for i in range(len(chosen))))
    more = f'("\\n" {lark_literal(TOOL_CALL_OPEN)} call_body)*' if parallel else ""
    rules.append(f"calls: call_body {more}")
    if mode == "forced":
        head = 'think_block /\\n{0,2}/' if reasoning_prefix else '/\\n{0,2}/'
        start = [f"start: {head} {lark_literal(TOOL_CALL_OPEN)} calls"]
    else:
        start = ["reply: FREE_TEXT | call_opener calls", _FREE_TEXT]
        start.insert(0, "start: REASONING | think_block reply" if reasoning_prefix
                     else "start: reply")
        if reasoning_prefix:
            start.append(_NO_THINK_END)
    if reasoning_prefix or mode == "auto":
        start.append(THINK_BLOCK_RULES)
    return "\n".join(start + rules)
