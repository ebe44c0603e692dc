"""Qwen3.5 / Qwen3-Coder XML tool calls::

    <tool_call>
    <function=NAME>
    <parameter=P>
    VALUE
    </parameter>
    </function>
    </tool_call>

One ``<parameter=P>`` block per argument, in the schema's order (required ones present, optional
ones may be left out). VALUE is raw text for string parameters, as the chat template writes it,
and JSON for the others; either way it is constrained by the parameter's own schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flashmoe_backend.constrained.json_schema import DEFAULT_WHITESPACE, json_grammar
from flashmoe_backend.constrained.lark import lark_literal, lark_regex
from flashmoe_backend.tools.specs import XML_CLOSERS, ToolSpec

__all__ = ["FORMAT_REGEXES", "call_rules", "open_json_value", "scan_call", "string_branches"]

_IPV4_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_HOST_LABEL = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?"
_YEAR = r"[1-9][0-9]{3}"
_LEAP_YEAR = r"([1-9][0-9](0[48]|[2468][048]|[13579][26])|([2468][048]|[13579][26])00)"
_DATE = (rf"({_YEAR}-(0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])"
         rf"|{_YEAR}-(0[469]|11)-(0[1-9]|[12][0-9]|30)|{_YEAR}-02-(0[1-9]|1[0-9]|2[0-8])"
         rf"|{_LEAP_YEAR}-02-29)")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_URI = (r"(https?|ftp)://" + _HOST_LABEL + r"(\." + _HOST_LABEL + r"){0,4}(:[1-9][0-9]{0,4})?"
        r"(/[a-zA-Z0-9._~%!$&'()*+,;=:@-]{0,40}){0,6}(\?[a-zA-Z0-9._~%!$&'()*+,;=:@/?-]{0,60})?")
#: Raw-text regexes for string formats (calendar-valid dates, RFC 3339 times with an offset).
FORMAT_REGEXES: dict[str, str] = {
    "email": r"[a-zA-Z0-9][a-zA-Z0-9._%+-]{0,39}@" + _HOST_LABEL + r"(\." + _HOST_LABEL
    + r"){0,3}\.[a-zA-Z]{2,10}",
    "uri": _URI,
    "url": _URI,
    "ipv4": rf"{_IPV4_OCTET}(\.{_IPV4_OCTET}){{3}}",
    "hostname": _HOST_LABEL + r"(\." + _HOST_LABEL + r"){0,4}",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
}

# A raw value may hold any text but the tags that would end it early when parsed.
_NO_CLOSER = "/(?s:.*)/ & ~/(?s:.*)(" + "|".join(
    lark_regex(t)[1:-1] for t in XML_CLOSERS) + ")(?s:.*)/"
_PARAM_END = lark_literal("\n</parameter>")


def _resolve(schema: Any, root: dict) -> dict:
    for _ in range(16):
        if not (isinstance(schema, dict) and isinstance(schema.get("$ref"), str)):
            break
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            return schema
        node: Any = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"unresolvable $ref {ref!r}")
            node = node[part]
        schema = node
    return schema if isinstance(schema, dict) else {}


def string_branches(schema: dict, root: dict) -> tuple[list[dict], bool] | None:
    """If every alternative of ``schema`` is a string (or null), the string alternatives and
    whether null is allowed; else None (the value is written as JSON)."""
    schema = _resolve(schema, root)
    if "const" in schema:
        v = schema["const"]
        return ([schema], False) if isinstance(v, str) else (([], True) if v is None else None)
    if "enum" in schema:
        vals = schema["enum"]
        strs = [v for v in vals if isinstance(v, str)]
        if strs and all(isinstance(v, str) or v is None for v in vals):
            return [{"enum": strs}], any(v is None for v in vals)
        return None
    for key in ("anyOf", "oneOf"):
        if key in schema:
            out: list[dict] = []
            nullable = False
            for sub in schema[key]:
                r = string_branches(sub, root)
                if r is None:
                    return None
                out += r[0]
                nullable = nullable or r[1]
            return (out, nullable) if out else None
    t = schema.get("type")
    if t == "string":
        return [schema], False
    if t == "null":
        return [], True
    if isinstance(t, list) and "string" in t and set(t) <= {"string", "null"}:
        return [{**schema, "type": "string"}], "null" in t
    return None


def _raw_string_terminal(s: dict) -> str:
    """A Lark terminal for a raw string value: its pattern, format and length together.

    A value must not hold a tag that would end it early when parsed. Free text is any text
    without those tags (a complement); a constrained one simply holds no ``<``, because a
    complement combined with a counted length exhausts llguidance's lexer (``maxLength`` 40 and
    up failed)."""
    parts = []
    if "pattern" in s:
        parts += [lark_regex(s["pattern"]), "/[^<]*/"]
    if s.get("format") in FORMAT_REGEXES:
        parts.append(lark_regex(FORMAT_REGEXES[s["format"]]))
    lo, hi = s.get("minLength"), s.get("maxLength")
    if lo is not None or hi is not None:
        parts.append(f"/[^<]{{{lo or 0},{'' if hi is None else hi}}}/")
    return " & ".join(parts) if parts else _NO_CLOSER


def _value_rules(prop: dict, root: dict, rule: str, whitespace: str | None) -> list[str]:
    """Rules for one parameter's value followed by ``\\n</parameter>``; the first is ``rule``."""
    branches = string_branches(prop, root)
    if branches is None:
        sub = dict(prop)
        for k in ("$defs", "definitions"):
            if k in root and k not in sub:
                sub[k] = root[k]
        return [f"{rule}: {json_grammar(sub, whitespace=whitespace, lenient=True)} {_PARAM_END}"]
    strs, nullable = branches
    alts, rules = [], []
    for i, s in enumerate(strs):
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            alts += [f"{lark_literal(v)} {_PARAM_END}" for v in values]
            continue
        term = f"{rule.upper()}_{i}"
        # lazy: the value ends at the first "\n</parameter>" (it cannot hold one).
        rules += [f"{rule}_{i}[lazy]: {term} {_PARAM_END}", f"{term}: {_raw_string_terminal(s)}"]
        alts.append(f"{rule}_{i}")
    if nullable:
        alts.append(f'"null" {_PARAM_END}')
    return [f"{rule}: " + " | ".join(alts)] + rules


def call_rules(tool: ToolSpec, rule: str, whitespace: str | None = DEFAULT_WHITESPACE) -> str:
    """Lark rules for one call of ``tool`` after ``<tool_call>``; the first is ``rule``."""
    root = tool.parameters
    required = set(root.get("required", []))
    parts = [lark_literal(f"\n<function={tool.name}>\n")]
    rules: list[str] = []
    for i, (pname, pschema) in enumerate(root.get("properties", {}).items()):
        value = f"{rule}_v{i}"
        rules += _value_rules(pschema if isinstance(pschema, dict) else {}, root, value,
                              whitespace)
        block = f"{lark_literal(f'<parameter={pname}>' + chr(10))} {value} \"\\n\""
        parts.append(f"({block})" + ("" if pname in required else "?"))
    parts.append(lark_literal("</function>\n</tool_call>"))
    return "\n".join([f"{rule}: " + " ".join(parts)] + rules)


_FUNCTION_OPEN = re.compile(r"<function=([^>\n]+)>\n?")
_PARAMETER_OPEN = re.compile(r"<parameter=([^>\n]+)>\n?")
_PARAMETER_CLOSE = "</parameter>"


def scan_call(text: str, start: int, tools: dict[str, ToolSpec]) -> tuple[str, dict, int] | None:
    """Read the XML call at ``text[start:]`` (``<function=NAME>...</function>``) parameter by
    parameter: ``(name, {parameter: raw value}, end)``, or None where it is not one.

    A JSON-valued parameter (by the tool's schema) is read as JSON, so a string inside it may
    hold ``</parameter>`` or ``</tool_call>``, as the grammar allows; a raw string value ends
    at the first ``</parameter>``, which the grammar keeps out of it."""
    m = _FUNCTION_OPEN.match(text, start)
    if m is None:
        return None
    name, pos, raw = m.group(1).strip(), m.end(), {}
    spec = tools.get(name)
    decoder = json.JSONDecoder()
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if text.startswith("</function>", pos):
            return name, raw, pos + len("</function>")
        p = _PARAMETER_OPEN.match(text, pos)
        if p is None:
            return None
        pname, value_start, value_end = p.group(1).strip(), p.end(), -1
        prop = spec.parameters.get("properties", {}).get(pname) if spec else None
        if isinstance(prop, dict) and string_branches(prop, spec.parameters) is None:
            try:
                value_end = decoder.raw_decode(text, value_start)[1]
            except json.JSONDecodeError:
                value_end = -1
            close = value_end + text.startswith("\n", value_end) if value_end >= 0 else -1
            if close < 0 or not text.startswith(_PARAMETER_CLOSE, close):
                value_end = -1
        if value_end < 0:
            close = text.find(_PARAMETER_CLOSE, value_start)
            if close < 0:
                return None
            value_end = close - 1 if close > value_start and text[close - 1] == "\n" else close
        raw[pname] = text[value_start:value_end]
        pos = close + len(_PARAMETER_CLOSE)


_FUNCTION_OPEN_BYTES = re.compile(rb"<function=([^>\n]+)>\n")
_PARAMETER_OPEN_BYTES = re.compile(rb"<parameter=([^>\n]+)>\n")


def open_json_value(text: bytes, tools: dict[str, ToolSpec]) -> tuple[dict, dict, int] | None:
    """Where the JSON-valued parameter being written starts in ``text`` (the reply so far):
    ``(its schema, the tool's parameters, offset)``, or None when the reply is not inside one.
    Raw string values have no JSON to follow."""
    call = text.rfind(b"<tool_call>")
    if call < 0:
        return None
    at = text.rfind(b"<function=", call)
    fn = _FUNCTION_OPEN_BYTES.match(text, at) if at >= 0 else None
    if fn is None or (spec := tools.get(fn.group(1).decode(errors="replace").strip())) is None:
        return None
    at = text.rfind(b"<parameter=", fn.end())
    p = _PARAMETER_OPEN_BYTES.match(text, at) if at >= 0 else None
    if p is None:
        return None
    prop = spec.parameters.get("properties", {}).get(p.group(1).decode(errors="replace").strip())
    if not isinstance(prop, dict) or string_branches(prop, spec.parameters) is not None:
        return None
    return prop, spec.parameters, p.end()
