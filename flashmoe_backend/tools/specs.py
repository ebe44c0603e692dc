"""Tools as the engine sees them: validated specs, ``tool_choice``, the model's call format.

A tool given in any common form (OpenAI dict, bare function dict, Pydantic model, object with
``name``/``parameters``) becomes a :class:`ToolSpec`; :func:`detect_tool_format` reads the call
format (Qwen3.5 XML or Hermes JSON, see tool_calls.py) from the chat template.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flashmoe_backend.constrained.json_schema import (
    check_schema,
    json_grammar,
    keyword_paths,
    schema_error,
    strict_check,
)
from flashmoe_backend.constrained.unique_items import guarded_unique_arrays

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




@dataclass(frozen=True)
class ToolSpec:
    """A validated function tool."""

    name: str
    parameters: dict
    description: str = ""
    #: keywords of ``parameters`` the grammar cannot enforce (checked after generation instead).
    unenforced: tuple[str, ...] = ()

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


def check_format(fmt: str) -> ToolFormat:
    """``fmt`` if it names a tool-call format (``ValueError`` if not)."""
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
        return _checked_once(fn, i)
    if tool.get("type") not in (None, "function"):
        raise ValueError(f"tool #{i}: only 'function' tools are supported, got {tool['type']!r}")
    return _checked_once(tool, i)


def _checked_once(fn: dict, i: int) -> ToolSpec:
    """:func:`_spec_from_dict`, cached by the tool's JSON: agents send the same tools with every
    request, and checking a schema costs about a millisecond."""
    try:
        text = json.dumps(fn)  # key order kept: it is the order of the parameters
    except (TypeError, ValueError):
        return _spec_from_dict(fn, i)  # not JSON: let the checks say what is wrong
    try:
        return _spec_from_json(text, i)
    except ValueError as exc:
        raise type(exc)(str(exc)) from None


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
        unenforced = _unenforced_keywords(params)
    except ValueError as exc:
        raise type(exc)(f"tool {name!r}: {exc}") from None
    return ToolSpec(name=name, parameters=params, description=desc, unenforced=unenforced)


def _unenforced_keywords(params: dict) -> tuple[str, ...]:
    """Check a parameters schema; name the keywords the grammar will not enforce.

    One argument's ``uniqueItems`` must not make an agent's whole tool list fail: such keywords
    are left out of the call grammar (llguidance's lenient mode) and checked after generation,
    where a violation makes the call an ``InvalidToolCall``. ``uniqueItems`` over scalar items
    is enforced while decoding instead (unique_items.py), so it is not named."""
    from llguidance import LLMatcher

    check_schema(params)
    missing = [r for r in params.get("required", []) if r not in params["properties"]]
    if missing:
        raise ValueError(f"required parameter{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(repr, missing))} not in 'properties'")
    keys, messages = strict_check(params)
    if not messages:
        return ()
    lenient = LLMatcher.grammar_from_lark("start: " + json_grammar(params, lenient=True))
    if not keys or LLMatcher.validate_grammar_with_warnings(lenient)[0]:
        raise schema_error(params, messages[0])
    if "uniqueItems" in keys and not guarded_unique_arrays(params)[1]:
        keys = tuple(k for k in keys if k != "uniqueItems")  # enforced while decoding
    return tuple(f"'{k}' at {', '.join(keyword_paths(params, k)) or '#'} is not enforced by the "
                 "grammar; calls are checked against it after generation" for k in keys)


@functools.lru_cache(maxsize=1024)
def _spec_from_json(text: str, i: int) -> ToolSpec:
    return _spec_from_dict(json.loads(text), i)


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
