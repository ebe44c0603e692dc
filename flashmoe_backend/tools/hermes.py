"""Hermes JSON tool calls (Qwen3, Qwen3-Next)::

    <tool_call>
    {"name": "NAME", "arguments": {...}}
    </tool_call>

The arguments are JSON constrained by the tool's parameter schema.
"""

from __future__ import annotations

import json
import re

from flashmoe_backend.constrained.json_schema import DEFAULT_WHITESPACE, json_grammar
from flashmoe_backend.constrained.lark import lark_literal
from flashmoe_backend.tools.specs import ToolSpec


def call_rules(tool: ToolSpec, rule: str, whitespace: str | None = DEFAULT_WHITESPACE) -> str:
    """Lark rules for one call of ``tool`` after ``<tool_call>``; the first is ``rule``."""
    head = '\n{"name": ' + json.dumps(tool.name) + ', "arguments": '
    args = json_grammar(tool.parameters, whitespace=whitespace, lenient=True)
    return f'{rule}: {lark_literal(head)} {args} {lark_literal("}" + chr(10) + "</tool_call>")}'


_CALL_HEAD = re.compile(rb'<tool_call>\n\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


def open_json_value(text: bytes, tools: dict[str, ToolSpec]) -> tuple[dict, dict, int] | None:
    """Where the arguments of the call being written start in ``text`` (the reply so far):
    ``(the tool's parameters, the same as root, offset)``, or None outside a call."""
    at = text.rfind(b"<tool_call>")
    head = _CALL_HEAD.match(text, at) if at >= 0 else None
    if head is None:
        return None
    try:
        spec = tools.get(json.loads(head.group(1)))
    except ValueError:
        return None
    return (spec.parameters, spec.parameters, head.end()) if spec is not None else None
