"""Tool calls in the model's own formats: validation, forcing grammars, parsing, auto mode.

Two formats, both wrapped in ``<tool_call>...</tool_call>``:

* ``"xml"`` (Qwen3.5, Qwen3-Coder)::

      <tool_call>
      <function=NAME>
      <parameter=P>
      VALUE
      </parameter>
      </function>
      </tool_call>

  VALUE is bare text for string parameters and JSON for the others.
* ``"hermes"`` (Qwen3-Next, Qwen3)::

      <tool_call>
      {"name": "NAME", "arguments": {...}}
      </tool_call>

``tool_choice`` ``"required"`` and a named tool are forced with a grammar over the format
(:func:`tool_call_regex`, :func:`tool_call_constraint`); ``"auto"`` decodes freely and switches to
the grammar once the model opens ``<tool_call>`` (:class:`AutoToolProcessor`). Whatever the mode,
:func:`parse_tool_calls` reads both formats back, and :func:`split_reasoning` separates a
``<think>`` block, so neither markup reaches the content shown to the user.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import mlx.core as mx

from .json_schema import DEFAULT_WHITESPACE, FORMAT_REGEXES, regex_escape, schema_to_regex
from .structured import (
    ConstrainedLogitsProcessor,
    Constraint,
    StructuredOutputError,
    _read_new_tokens,
)
from .vocabulary import Vocabulary

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "AssistantOutput",
    "AutoToolProcessor",
    "InvalidToolCall",
    "ToolCall",
    "ToolFormat",
    "ToolSpec",
    "bare_text_regex",
    "detect_tool_format",
    "new_call_id",
    "normalize_tool_choice",
    "normalize_tools",
    "parse_assistant_output",
    "parse_tool_calls",
    "split_reasoning",
    "tool_call_constraint",
    "tool_call_regex",
]

ToolFormat = Literal["xml", "hermes"]
TOOL_FORMATS: tuple[str, ...] = ("xml", "hermes")

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

#: Closing tags a bare XML string value must not contain (they would end it early on parsing).
XML_CLOSERS: tuple[str, ...] = ("</parameter>", "</function>", "</tool_call>")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# =============================================================================================
# Tool specs and tool_choice
# =============================================================================================


@dataclass(frozen=True)
class ToolSpec:
    """A validated function tool."""

    name: str
    parameters: dict
    description: str = ""

    def to_openai(self) -> dict:
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


def detect_tool_format(chat_template: str | None) -> ToolFormat:
    """``"xml"`` if the chat template writes ``<function=`` (Qwen3.5 / Qwen3-Coder), else
    ``"hermes"``."""
    if chat_template and "<function=" in chat_template:
        return "xml"
    return "hermes"


def _check_fmt(fmt: str) -> ToolFormat:
    if fmt not in TOOL_FORMATS:
        raise ValueError(f"unknown tool-call format {fmt!r}; expected 'xml' or 'hermes'")
    return fmt  # type: ignore[return-value]


def _spec_from_any(tool: Any, i: int) -> ToolSpec:
    if isinstance(tool, ToolSpec):
        return tool
    try:
        from pydantic import BaseModel

        if isinstance(tool, type) and issubclass(tool, BaseModel):
            return _spec_from_dict(
                {
                    "name": tool.__name__,
                    "description": (tool.__doc__ or "").strip(),
                    "parameters": tool.model_json_schema(),
                },
                i,
            )
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(tool, dict):
        raise ValueError(
            f"tool #{i}: expected an OpenAI-style tool dict "
            f"({{'type': 'function', 'function': {{...}}}}), got {type(tool).__name__}"
        )
    if "function" in tool:
        if tool.get("type", "function") != "function":
            raise ValueError(f"tool #{i}: only 'function' tools are supported, got {tool['type']!r}")
        fn = tool["function"]
        if not isinstance(fn, dict):
            raise ValueError(f"tool #{i}: 'function' must be an object")
        return _spec_from_dict(fn, i)
    if tool.get("type") not in (None, "function"):
        raise ValueError(f"tool #{i}: only 'function' tools are supported, got {tool['type']!r}")
    return _spec_from_dict(tool, i)


def _spec_from_dict(fn: dict, i: int) -> ToolSpec:
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool #{i}: missing function name")
    if not _NAME_RE.match(name):
        raise ValueError(
            f"tool {name!r}: function names may only hold letters, digits, '_', '.', ':' and '-' "
            "(at most 128)"
        )
    desc = fn.get("description") or ""
    if not isinstance(desc, str):
        raise ValueError(f"tool {name!r}: description must be a string")
    params = fn.get("parameters", fn.get("input_schema"))
    if params is None:
        raise ValueError(
            f"tool {name!r} has no 'parameters' JSON schema (use "
            "{'type': 'object', 'properties': {}} for a tool without arguments)"
        )
    if not isinstance(params, dict):
        raise ValueError(f"tool {name!r}: 'parameters' must be a JSON schema object")
    ptype = params.get("type", "object" if "properties" in params else None)
    if ptype != "object":
        raise ValueError(
            f"tool {name!r}: 'parameters' must be a schema of type 'object', got {ptype!r}"
        )
    props = params.get("properties", {})
    if not isinstance(props, dict):
        raise ValueError(f"tool {name!r}: 'parameters.properties' must be an object")
    for p in props:
        if not isinstance(p, str) or not p or any(c in p for c in "<>\n\r"):
            raise ValueError(f"tool {name!r}: invalid parameter name {p!r}")
    params = {**params, "type": "object", "properties": props}
    try:
        schema_to_regex(params)  # validates the schema (meta-schema, semantics, support)
    except ValueError as exc:
        raise ValueError(f"tool {name!r}: {exc}") from None
    return ToolSpec(name=name, parameters=params, description=desc)


def normalize_tools(tools: Iterable[Any] | None) -> list[ToolSpec]:
    """Validate OpenAI-style tools (``{"type": "function", "function": {...}}``, the bare function
    dict, or a Pydantic model class) into :class:`ToolSpec`; raises :class:`ValueError` for a
    missing or malformed parameters schema or duplicate names."""
    specs = [_spec_from_any(t, i) for i, t in enumerate(tools or [])]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"duplicate tool name {s.name!r}")
        seen.add(s.name)
    return specs


def normalize_tool_choice(
    tool_choice: Any, tools: Sequence[ToolSpec]
) -> tuple[str, str | None]:
    """``(mode, name)`` with mode ``"none"``, ``"auto"``, ``"required"`` or ``"named"``.

    Accepts ``None`` (auto when there are tools), the strings ``none``/``auto``/``required``
    (``any`` = required), a tool name, ``{"type": "function", "function": {"name": N}}``,
    ``{"type": "function", "name": N}`` and Anthropic's ``{"type": "tool"|"any"|"auto", ...}``.
    Unknown names raise :class:`ValueError`.
    """
    names = [t.name for t in tools]
    name: str | None = None
    if tool_choice is None:
        return ("auto", None) if tools else ("none", None)
    if isinstance(tool_choice, str):
        key = tool_choice.strip()
        if key in ("none", "auto", "required", "any"):
            mode = "required" if key == "any" else key
            if mode == "required" and not tools:
                raise ValueError("tool_choice 'required' needs at least one tool")
            return mode, None
        name = key
    elif isinstance(tool_choice, dict):
        t = tool_choice.get("type")
        fn = tool_choice.get("function")
        if isinstance(fn, dict):
            name = fn.get("name")
        elif t in ("function", "tool") and isinstance(tool_choice.get("name"), str):
            name = tool_choice["name"]
        elif t in ("none", "auto", "required", "any") and len(tool_choice) == 1:
            return normalize_tool_choice(t, tools)
        if not isinstance(name, str):
            raise ValueError(f"cannot read a tool name from tool_choice {tool_choice!r}")
    else:
        raise ValueError(f"unsupported tool_choice {tool_choice!r}")
    if name not in names:
        raise ValueError(
            f"tool_choice names unknown tool {name!r}; available: {names or 'none'}"
        )
    return "named", name


# =============================================================================================
# Grammars
# =============================================================================================


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


def tool_call_constraint(
    tools: Iterable[Any],
    tool_choice: Any,
    fmt: ToolFormat,
    tokenizer: Any,
    *,
    parallel: bool = True,
    leading_whitespace: bool = True,
    reasoning_prefix: bool = False,
) -> Constraint:
    """A :class:`~flashmoe_backend.structured.Constraint` forcing tool calls; its ``parse``
    returns the list of :class:`ToolCall` (raising if any call is invalid)."""
    specs = normalize_tools(tools)
    regex = tool_call_regex(
        specs, tool_choice, fmt, parallel,
        leading_whitespace=leading_whitespace, reasoning_prefix=reasoning_prefix,
    )

    def parse(text: str) -> list[ToolCall]:
        _, calls, invalid = parse_tool_calls(text, fmt, specs)
        if invalid:
            raise StructuredOutputError(f"invalid tool call: {invalid[0].error}")
        return calls

    return Constraint(regex, tokenizer, kind="tool_calls", parser=parse,
                      description=f"{fmt} tool call")


# =============================================================================================
# Parsing
# =============================================================================================


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
        branches = _string_branches(prop, root)
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
        import jsonschema
    except ImportError:  # pragma: no cover
        return ToolCall(name, args)
    try:
        jsonschema.validate(args, spec.parameters)
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


# =============================================================================================
# Auto mode
# =============================================================================================


class AutoToolProcessor:
    """mlx-lm logits processor for ``tool_choice="auto"``.

    Leaves the logits alone while the model writes ordinary text (or reasoning); once the
    generated text contains ``<tool_call>`` (outside a ``<think>`` block) it switches to the
    tool-call grammar, which then constrains the rest of that call and any further calls (after
    the last call only EOS or another call may follow). Detection runs on the generated token
    ids' bytes, so it works whether ``<tool_call>`` is one added token or split across tokens.

    ``in_think``: whether the prompt ends inside ``<think>`` (default: read from the prompt).
    One processor per generation.
    """

    def __init__(
        self,
        tokenizer: Any,
        tools: Iterable[Any],
        fmt: ToolFormat,
        *,
        parallel: bool = True,
        in_think: bool | None = None,
        whitespace_pattern: str | None = DEFAULT_WHITESPACE,
        constraint: Constraint | None = None,
    ):
        self.vocabulary = Vocabulary.from_tokenizer(tokenizer)
        self.fmt = _check_fmt(fmt)
        self.tools = normalize_tools(tools)
        if constraint is None:
            regex = tool_call_regex(
                self.tools, "required", fmt, parallel,
                leading_whitespace=False, whitespace_pattern=whitespace_pattern,
            )
            constraint = Constraint(regex, self.vocabulary, kind="tool_calls",
                                    description=f"{fmt} tool call")
        self.constraint = constraint
        self.inner: ConstrainedLogitsProcessor | None = None
        self.failed = False
        self._in_think = in_think
        self._buf = bytearray()
        self._scan_from = 0
        self._n_seen: int | None = None
        self._opener = TOOL_CALL_OPEN.encode()
        self._think_close = THINK_CLOSE.encode()

    @property
    def triggered(self) -> bool:
        """True once the model opened a tool call."""
        return self.inner is not None or self.failed

    @property
    def is_complete(self) -> bool:
        """False while a tool call is open (the structure is incomplete)."""
        if self.inner is None:
            return not self.failed
        return self.inner.is_complete

    def is_finished(self) -> bool:
        return self.is_complete

    def _prompt_in_think(self, tokens: mx.array) -> bool:
        tail = tokens[-64:].tolist()
        data = self.vocabulary.decode_bytes(tail)
        return data.rfind(THINK_OPEN.encode()) > data.rfind(self._think_close)

    def _feed(self, ids: list[int]) -> None:
        if self.inner is not None:
            self.inner.consume(ids)
            return
        if self.failed:
            return
        eos = self.vocabulary.eos_token_ids
        for t in ids:
            if t not in eos:
                self._buf += self.vocabulary.decode_bytes((t,))
        self._scan()

    def _scan(self) -> None:
        buf = self._buf
        if self._in_think:
            j = buf.find(self._think_close, self._scan_from)
            if j < 0:
                self._scan_from = max(0, len(buf) - len(self._think_close) + 1)
                return
            self._in_think = False
            self._scan_from = j + len(self._think_close)
        i = buf.find(self._opener, self._scan_from)
        if i < 0:
            self._scan_from = max(self._scan_from, len(buf) - len(self._opener) + 1)
            # A later <think> (unusual) re-enters reasoning.
            k = buf.find(THINK_OPEN.encode(), self._scan_from - len(THINK_OPEN) + 1)
            if k >= 0 and buf.find(self._think_close, k) < 0:
                self._in_think = True
                self._scan_from = k + len(THINK_OPEN)
            return
        inner = self.constraint.logits_processor()
        if inner.advance_text(bytes(buf[i:])):
            self.inner = inner
        else:  # the token that opened the call already left the grammar: stop constraining
            self.failed = True

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.ndim == 2:
            tokens = tokens.reshape(-1)
        n = int(tokens.shape[0])
        if self._n_seen is None:
            self._n_seen = n
            if self._in_think is None:
                self._in_think = self._prompt_in_think(tokens) if n else False
        elif n > self._n_seen:
            new = _read_new_tokens(tokens, self._n_seen)
            self._n_seen = n
            self._feed(new)
        if self.inner is not None:
            return self.inner.mask_logits(logits)
        return logits
