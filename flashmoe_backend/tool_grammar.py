"""Grammars that force a tool call in the model's own format (``tool_choice`` required or named).

:func:`tool_call_regex` is one regex over all the allowed calls (XML values typed by each
parameter's JSON schema; Hermes bodies by ``json_schema``); ``tool_call_constraint`` compiles
it into a :class:`~flashmoe_backend.structured.Constraint` (in tool_calls.py, beside the parser).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from .json_schema import DEFAULT_WHITESPACE, FORMAT_REGEXES, regex_escape, schema_to_regex
from .tool_specs import (
    THINK_CLOSE,
    XML_CLOSERS,
    ToolFormat,
    ToolSpec,
    _check_fmt,
    normalize_tool_choice,
    normalize_tools,
)


def bare_text_regex(forbidden: Sequence[str] = XML_CLOSERS) -> str:
    """Regex for any text that contains none of ``forbidden`` (each of which starts with ``<``
    and holds no other ``<``): the exact complement, built from the prefix trie of the words.

    After a ``<`` the text either loops back to a new ``<``, leaves the trie on a character that
    continues no forbidden word, or ends inside a proper prefix."""
    words = []
    for w in forbidden:
        if not w.startswith("<") or "<" in w[1:] or len(w) < 2:
            raise ValueError(f"forbidden word {w!r} must start with '<' and hold no other '<'")
        words.append(w[1:])
    nodes: dict[str, set[str]] = {}
    for w in words:
        for k in range(len(w)):
            nodes.setdefault(w[:k], set()).add(w[k])
    # A node that is itself a full forbidden word cannot be a node (unless it's a prefix of
    # another word, which would make that word unreachable anyway).
    for w in words:
        nodes.pop(w, None)
    nonempty = sorted(p for p in nodes if p)
    pre = "(" + "|".join(regex_escape(p) for p in nonempty) + ")?" if nonempty else ""
    loop = f"{pre}<"
    exits = []
    for p, children in sorted(nodes.items()):
        cls = "".join(_class_escape(c) for c in sorted(children | {"<"}))
        exits.append(regex_escape(p) + f"[^{cls}]")
    exit_re = "(" + "|".join(exits) + ")"
    return rf"([^<]|<({loop})*{exit_re})*(<({loop})*{pre})?"


def _class_escape(c: str) -> str:
    return "\\" + c if c in "\\]^-[&~" else c


def _strip_anchors(pattern: str) -> str:
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    return pattern


def _resolve(schema: Any, root: dict) -> dict:
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 16:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        node: Any = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"unresolvable $ref {ref!r}")
            node = node[part]
        schema = node
        seen += 1
    return schema if isinstance(schema, dict) else {}


def _string_branches(schema: dict, root: dict) -> tuple[list[dict], bool] | None:
    """If every alternative of ``schema`` is a string (or null), return (string alternatives,
    nullable); else None."""
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
                r = _string_branches(sub, root)
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


def _bare_string_regex(s: dict) -> str:
    if "const" in s:
        return regex_escape(s["const"])
    if "enum" in s:
        return "(" + "|".join(regex_escape(v) for v in s["enum"]) + ")"
    if "pattern" in s:
        return "(" + _strip_anchors(s["pattern"]) + ")"
    fmt = s.get("format")
    if fmt in FORMAT_REGEXES:
        return "(" + FORMAT_REGEXES[fmt] + ")"
    if fmt == "uuid":
        quoted = schema_to_regex({"type": "string", "format": fmt})
        return "(" + quoted[1:-1] + ")"
    lo, hi = s.get("minLength"), s.get("maxLength")
    if lo is not None or hi is not None:
        # Bounded strings: counted characters other than '<' (so no closing tag can appear).
        return f"[^<]{{{lo or 0},{'' if hi is None else hi}}}"
    return bare_text_regex()


def _xml_value_regex(prop: dict, root: dict, ws: str | None) -> str:
    branches = _string_branches(prop, root)
    if branches is not None:
        strs, nullable = branches
        alts = [_bare_string_regex(s) for s in strs]
        if nullable:
            alts.append("null")
        return "(" + "|".join(alts) + ")"
    sub = dict(prop)
    for k in ("$defs", "definitions"):
        if k in root and k not in sub:
            sub[k] = root[k]
    return "(" + schema_to_regex(sub, ws) + ")"


def _xml_call_regex(tool: ToolSpec, ws: str | None) -> str:
    root = tool.parameters
    props: dict = root.get("properties", {})
    required = set(root.get("required", []))
    parts = [r"<tool_call>\n<function=" + regex_escape(tool.name) + r">\n"]
    for pname, pschema in props.items():
        block = (
            "<parameter=" + regex_escape(pname) + r">\n"
            + _xml_value_regex(pschema, root, ws)
            + r"\n</parameter>\n"
        )
        parts.append(block if pname in required else f"({block})?")
    parts.append(r"</function>\n</tool_call>")
    return "".join(parts)


def _hermes_call_regex(tool: ToolSpec, ws: str | None) -> str:
    args = schema_to_regex(tool.parameters, ws)
    name = regex_escape(json.dumps(tool.name))
    return (
        r"<tool_call>\n\{\"name\": " + name + r", \"arguments\": (" + args + r")\}\n</tool_call>"
    )


def tool_call_regex(
    tools: Iterable[Any],
    tool_choice: Any = "required",
    fmt: ToolFormat = "hermes",
    parallel: bool = True,
    *,
    leading_whitespace: bool = True,
    reasoning_prefix: bool = False,
    whitespace_pattern: str | None = DEFAULT_WHITESPACE,
) -> str:
    """Regex for what the assistant writes after the generation prompt when it must call tools.

    ``tool_choice``: ``"required"`` (or ``"auto"``: the same grammar, used by auto mode once the
    model opens ``<tool_call>``) gives the union over all tools, a named tool just that one.
    Each call's arguments satisfy that tool's JSON schema (XML: bare text for string parameters,
    JSON for the others; required parameters present, optional ones may be omitted, in the
    schema's order). ``parallel`` allows one or more calls separated by a newline.
    ``leading_whitespace`` allows up to two newlines first; ``reasoning_prefix`` allows a
    ``...</think>`` reasoning block first (for prompts that end inside ``<think>``).
    """
    fmt = _check_fmt(fmt)
    specs = normalize_tools(tools)
    if not specs:
        raise ValueError("no tools to call")
    mode, name = normalize_tool_choice(tool_choice, specs)
    if mode == "none":
        raise ValueError("tool_choice 'none' has no tool-call grammar")
    chosen = [s for s in specs if s.name == name] if mode == "named" else specs
    build = _xml_call_regex if fmt == "xml" else _hermes_call_regex
    one = "(" + "|".join(build(s, whitespace_pattern) for s in chosen) + ")"
    calls = rf"{one}(\n{one})*" if parallel else one
    prefix = ""
    if reasoning_prefix:
        prefix += "(" + bare_text_regex((THINK_CLOSE,)) + r"</think>\n{0,2})?"
    if leading_whitespace:
        prefix += r"\n{0,2}"
    return prefix + calls
