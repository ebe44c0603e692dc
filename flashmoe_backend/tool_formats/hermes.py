"""Hermes JSON tool calls (Qwen3, Qwen3-Next)::

    <tool_call>
    {"name": "NAME", "arguments": {...}}
    </tool_call>

The arguments are JSON constrained by the tool's parameter schema.
"""

from __future__ import annotations

import json

from ..json_schema import DEFAULT_WHITESPACE, json_grammar
from ..lark import lark_literal
from ..tool_specs import ToolSpec


def call_rules(tool: ToolSpec, rule: str, whitespace: str | None = DEFAULT_WHITESPACE) -> str:
    """Lark rules for one call of ``tool`` after ``<tool_call>``; the first is ``rule``."""
    head = '\n{"name": ' + json.dumps(tool.name) + ', "arguments": '
    args = json_grammar(tool.parameters, whitespace=whitespace, lenient=True)
    return f'{rule}: {lark_literal(head)} {args} {lark_literal("}" + chr(10) + "</tool_call>")}'
