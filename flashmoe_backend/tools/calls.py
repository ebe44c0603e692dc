"""Tool calls in the model's own formats: the constraint over a reply, and parsing calls back.

Both formats wrap a call in ``<tool_call>...</tool_call>``: Qwen3.5's XML (``<function=NAME>``
with one ``<parameter=P>`` block per argument, ``tools/xml.py``) and Hermes JSON
(``{"name": ..., "arguments": {...}}``, ``tools/hermes.py``).

``tool_choice`` ``"required"`` and a named tool are forced with a grammar over the format
(:func:`tool_call_constraint`); with ``"auto"`` the grammar is lazy: free text until the model
opens ``<tool_call>``, then the calls' grammar. Whatever the mode,
:func:`parse_tool_calls` reads both formats back, and :func:`split_reasoning` separates a
``<think>`` block, so neither markup reaches the content shown to the user.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from flashmoe_backend.constrained.constraint import Constraint, StructuredOutputError
from flashmoe_backend.constrained.json_validation import exact_validator, exact_value
from flashmoe_backend.constrained.unique_items import UniqueItemsGuard, guarded_unique_arrays
from flashmoe_backend.tools import FORMATS
from flashmoe_backend.tools.grammar import tool_call_grammar
from flashmoe_backend.tools.specs import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolFormat,
    ToolSpec,
    check_format,
    detect_tool_format,
    new_call_id,
    normalize_tool_choice,
    normalize_tools,
)
from flashmoe_backend.tools.xml import scan_call, string_branches

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "AssistantOutput",
    "InvalidToolCall",
    "ToolCall",
    "ToolFormat",
    "ToolSpec",
    "detect_tool_format",
    "new_call_id",
    "normalize_tool_choice",
    "normalize_tools",
    "parse_assistant_output",
    "parse_tool_calls",
    "split_reasoning",
    "tool_call_constraint",
    "tool_call_grammar",
]


def tool_call_constraint(
    tools: Iterable[Any],
    tool_choice: Any,
    fmt: ToolFormat,
    tokenizer: Any,
    *,
    parallel: bool = True,
    mode: str = "forced",
    reasoning_prefix: bool = False,
) -> Constraint:
    """A :class:`~flashmoe_backend.structured.Constraint` over the reply when tools may
    (``mode="auto"``) or must (``"forced"``) be called; its ``parse`` returns the valid
    :class:`ToolCall` list (raising if any call is invalid)."""
    fmt = check_format(fmt)
    specs = normalize_tools(tools)
    grammar = tool_call_grammar(specs, tool_choice, fmt, parallel, mode=mode,
                                reasoning_prefix=reasoning_prefix)

    def parse(text: str) -> list[ToolCall]:
        _, calls, invalid = parse_tool_calls(split_reasoning(text)[1], fmt, specs)
        if invalid:
            raise StructuredOutputError(f"invalid tool call: {invalid[0].error}")
        return calls

    return Constraint(grammar, tokenizer, kind="tool_calls", parser=parse,
                      description=f"{fmt} tool call", guard=_unique_items_guard(specs, fmt))


def _unique_items_guard(specs: list[ToolSpec], fmt: ToolFormat) -> UniqueItemsGuard | None:
    """The guard that keeps ``uniqueItems`` arrays of scalars from repeating an item, when a
    tool has one."""
    if not any(guarded_unique_arrays(s.parameters)[0] for s in specs):
        return None
    by_name = {s.name: s for s in specs}
    locate = FORMATS[fmt].open_json_value
    return UniqueItemsGuard(lambda text: locate(text, by_name))


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }


@dataclass
class InvalidToolCall:
    name: str | None
    arguments: str | None
    error: str
    id: str = field(default_factory=new_call_id)


@dataclass
class AssistantOutput:
    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[InvalidToolCall]


_XML_FUNC = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_XML_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
_BARE_FUNC = re.compile(r"<function=([^>\n]+)>\n(?:<parameter=.*?)?</function>", re.DOTALL)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def parse_tool_calls(
    text: str,
    fmt: ToolFormat | None = None,
    tools: Iterable[Any] | None = None,
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split assistant text into ``(content, calls, invalid)``.

    Reads every ``<tool_call>`` block in either format (``fmt`` is only a hint), plus bare
    ``<function=...>...</function>`` blocks. With ``tools``, XML string values are converted to
    the parameter's type and each call is validated against its tool (unknown tool, schema
    violation -> :class:`InvalidToolCall`). An unterminated last block is parsed leniently. The
    content never contains tool-call markup.
    """
    specs = {s.name: s for s in normalize_tools(tools)} if tools is not None else None
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    content: list[str] = []
    pos = 0
    dec = json.JSONDecoder()
    while True:
        i = text.find(TOOL_CALL_OPEN, pos)
        if i < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:i])
        j = i + len(TOOL_CALL_OPEN)
        k = _skip_ws(text, j)
        body_end = end_tag = -1
        if text.startswith("{", k):  # Hermes: decode the JSON so '</tool_call>' inside is fine
            try:
                _, k2 = dec.raw_decode(text, k)
                after = _skip_ws(text, k2)
                if text.startswith(TOOL_CALL_CLOSE, after):
                    body_end, end_tag = k2, after
            except json.JSONDecodeError:
                pass
        elif specs and (scanned := scan_call(text, k, specs)) is not None:
            # XML read parameter by parameter: JSON values may hold closing tags in strings.
            after = _skip_ws(text, scanned[2])
            if text.startswith(TOOL_CALL_CLOSE, after):
                name, raw, _ = scanned
                item = _validated(name, {p: _convert_xml_value(v, p, specs.get(name))
                                         for p, v in raw.items()}, specs, text[j:after])
                (calls if isinstance(item, ToolCall) else invalid).append(item)
                pos = after + len(TOOL_CALL_CLOSE)
                continue
        if body_end < 0:
            end_tag = text.find(TOOL_CALL_CLOSE, j)
            body_end = end_tag if end_tag >= 0 else len(text)
        body = text[j:body_end]
        item = _parse_call_body(body, specs)
        if isinstance(item, InvalidToolCall) and end_tag < 0:
            item.error = "unterminated <tool_call> (generation stopped?): " + item.error
        (calls if isinstance(item, ToolCall) else invalid).append(item)
        pos = end_tag + len(TOOL_CALL_CLOSE) if end_tag >= 0 else len(text)
    # Bare XML function blocks (Qwen3-Coder sometimes omits the <tool_call> wrapper).
    pieces: list[str] = []
    for piece in content:
        last = 0
        if "<function=" in piece:
            for m in _BARE_FUNC.finditer(piece):
                pieces.append(piece[last : m.start()])
                item = _parse_call_body(m.group(0), specs)
                (calls if isinstance(item, ToolCall) else invalid).append(item)
                last = m.end()
        pieces.append(piece[last:])
    pieces = [p.replace(TOOL_CALL_CLOSE, "") for p in pieces]
    if len(pieces) == 1:
        return pieces[0].strip(), calls, invalid
    # Drop the whitespace that separated the removed blocks from the text around them.
    return "\n\n".join(p.strip() for p in pieces if p.strip()), calls, invalid


def _parse_call_body(body: str, specs: dict[str, ToolSpec] | None) -> ToolCall | InvalidToolCall:
    stripped = body.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            return InvalidToolCall(None, stripped, f"tool call is not valid JSON: {exc}")
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return InvalidToolCall(None, stripped, "tool call JSON has no 'name'")
        name = obj["name"]
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                return InvalidToolCall(name, args, f"arguments are not valid JSON: {exc}")
        if not isinstance(args, dict):
            return InvalidToolCall(name, json.dumps(args), "arguments are not a JSON object")
        return _validated(name, args, specs, stripped)
    m = _XML_FUNC.search(stripped)
    if m:
        name = m.group(1).strip()
        inner = m.group(2)
        spec = specs.get(name) if specs else None
        args: dict[str, Any] = {}
        for pm in _XML_PARAM.finditer(inner):
            pname = pm.group(1).strip()
            raw = pm.group(2)
            args[pname] = _convert_xml_value(raw, pname, spec)
        return _validated(name, args, specs, stripped)
    return InvalidToolCall(None, stripped, "unrecognised tool call (neither JSON nor XML)")


def _convert_xml_value(raw: str, pname: str, spec: ToolSpec | None) -> Any:
    if spec is None:
        return raw
    root = spec.parameters
    prop = root.get("properties", {}).get(pname)
    if prop is None:
        return _json_or_raw(raw)
    try:
        branches = string_branches(prop, root)
    except ValueError:
        branches = None
    if branches is not None:
        strs, nullable = branches
        if nullable and raw.strip() == "null":
            return None
        return raw
    return _json_or_raw(raw)


_PY_LITERALS = {"True": True, "False": False, "None": None}


def _json_or_raw(raw: str) -> Any:
    s = raw.strip()
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    if s in _PY_LITERALS:
        return _PY_LITERALS[s]
    return raw


def _validated(
    name: str, args: dict, specs: dict[str, ToolSpec] | None, raw: str
) -> ToolCall | InvalidToolCall:
    if specs is None:
        return ToolCall(name, args)
    spec = specs.get(name)
    if spec is None:
        return InvalidToolCall(name, json.dumps(args), f"unknown tool {name!r}")
    try:
        exact_validator(spec.parameters, formats=True).validate(exact_value(args))
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        msg = f"arguments do not match the schema of {name!r}"
        msg += f" at {where}: {exc.message}" if where else f": {exc.message}"
        return InvalidToolCall(name, json.dumps(args), msg)
    return ToolCall(name, args)


def split_reasoning(text: str, *, in_think: bool = False) -> tuple[str, str]:
    """``(reasoning, content)`` from text holding a ``<think>...</think>`` block.

    Also handles text that starts inside the block (the opening ``<think>`` was in the prompt):
    everything before a first ``</think>`` that has no ``<think>`` before it is reasoning.
    ``in_think=True`` says the prompt ended inside the block, so text with no ``</think>`` at all
    (generation stopped while thinking) is all reasoning. An unclosed ``<think>`` likewise.
    """
    reasoning: list[str] = []
    content: list[str] = []
    rest = text
    inside = in_think
    while rest:
        if inside:
            j = rest.find(THINK_CLOSE)
            if j < 0:
                reasoning.append(rest)
                break
            reasoning.append(rest[:j])
            rest = rest[j + len(THINK_CLOSE) :]
            inside = False
            continue
        i = rest.find(THINK_OPEN)
        j = rest.find(THINK_CLOSE)
        if j >= 0 and (i < 0 or j < i) and not reasoning and not "".join(content).strip():
            # Opening tag was in the prompt.
            reasoning.append(rest[:j])
            rest = rest[j + len(THINK_CLOSE) :]
            continue
        if i < 0:
            content.append(rest.replace(THINK_CLOSE, ""))
            break
        content.append(rest[:i])
        rest = rest[i + len(THINK_OPEN) :]
        inside = True
    r = "\n\n".join(p.strip() for p in reasoning if p.strip())
    return r, "".join(content).strip()


def parse_assistant_output(
    text: str,
    fmt: ToolFormat | None = None,
    tools: Iterable[Any] | None = None,
    *,
    in_think: bool = False,
) -> AssistantOutput:
    """:func:`split_reasoning` then :func:`parse_tool_calls`."""
    reasoning, rest = split_reasoning(text, in_think=in_think)
    content, calls, invalid = parse_tool_calls(rest, fmt, tools)
    return AssistantOutput(reasoning, content, calls, invalid)
