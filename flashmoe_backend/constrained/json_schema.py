"""JSON schemas for the grammar engine: loading, checking, embedding, and validating outputs.

llguidance compiles JSON Schema (draft 2020-12) itself; this module decides what reaches it:

* :func:`load_schema` / :func:`check_schema` reject what the grammar engine would miss or get
  wrong (non-local ``$ref``s, contradictory bounds, unknown ``$schema``, bounds it cannot read
  exactly, ...) with a :class:`ValueError` that names the problem and where it is;
  :func:`load_schema` also spells out the regex escapes whose meaning differs between ECMA-262
  (JSON Schema's regex dialect), llguidance and Python's ``re`` (:func:`ecma_regex`), so that
  the grammar and the output validator agree;
* :func:`json_grammar` is the schema as a Lark fragment (``%json{...}``) with the project's
  whitespace rules and closed objects;
* :func:`schema_error` turns llguidance's compile error into :class:`UnsupportedSchemaError`,
  which names each keyword it cannot enforce and every path it occurs at (the meta-schema's
  verdict first, :func:`check_meta_schema`), so a constraint is never lost silently. With
  ``lenient=True`` (tool parameters) those keywords are dropped from the grammar and reported
  instead; the tool-call parser then checks them after generation;
"""

from __future__ import annotations

import decimal
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import jsonschema

__all__ = [
    "DEFAULT_WHITESPACE",
    "UnsupportedSchemaError",
    "check_meta_schema",
    "check_schema",
    "ecma_regex",
    "json_grammar",
    "keyword_paths",
    "load_schema",
    "unsupported_keywords",
]

#: Whitespace allowed wherever JSON allows whitespace: at most one space.
DEFAULT_WHITESPACE = r"[ ]?"

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then",
               "else", "unevaluatedItems", "unevaluatedProperties", "additionalItems")


class UnsupportedSchemaError(ValueError):
    """The grammar engine cannot enforce a keyword of the schema (named with its paths)."""

    def __init__(self, message: str, keywords: tuple[str, ...] = ()):
        super().__init__(message)
        self.keywords = keywords


def load_schema(schema: Any) -> dict:
    """A JSON schema given as a dict or JSON text, as a dict (``ValueError`` if it is not one).

    The result is the schema to compile *and* to validate outputs with: its regexes (``pattern``,
    ``patternProperties``) have the escapes whose meaning differs between dialects spelled out in
    their ECMA-262 meaning (:func:`ecma_regex`); the input is never modified."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
    if isinstance(schema, bool):
        raise ValueError("a boolean JSON schema does not describe a structure to generate")
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object (dict), got {type(schema).__name__}")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the JSON schema is not JSON-serialisable: {exc}") from None
    return _explicit_patterns(schema)


# ---------------------------------------------------------------------------------------------
# Regexes: ECMA-262 (what JSON Schema means) spelled out so that every engine reads it alike
# ---------------------------------------------------------------------------------------------

#: ECMA-262 ``\s`` (WhiteSpace and LineTerminator), as the inside of a character class.
_ECMA_SPACE = r"\t\n\x0b\f\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": _ECMA_SPACE}
#: ECMA-262 ``.``: any character but a line terminator.
_ECMA_DOT = r"[^\n\r\u2028\u2029]"


class _RegexRefused(ValueError):
    pass


def ecma_regex(pattern: str) -> str:
    r"""``pattern`` (an ECMA-262 regex, JSON Schema's dialect) with ``\d \w \s \D \W \S`` and
    ``.`` written as explicit character classes of their ECMA-262 meaning.

    The same text means different things to the three engines involved: ECMA-262 ``\w``/``\d``
    are ASCII, Python's ``re`` (the output validator) makes them Unicode, and llguidance follows
    ECMA for ``\w``/``\d`` but Rust's Unicode ``\s`` and a ``.`` that matches ``\r``. Without
    this, llguidance generates ``"é"`` for ``^\W$`` (right by ECMA-262) and the validator
    refuses it. The rewrite is exactly equivalent under ECMA-262, and the classes it writes mean
    the same to all three engines. Raises ``ValueError`` for
    syntax the dialects parse differently (``[]``, ``[^]``, a negated escape inside a negated
    class)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if e in _CLASS_ESCAPES:
                out.append(f"[{_CLASS_ESCAPES[e]}]")
            elif e.lower() in _CLASS_ESCAPES:
                out.append(f"[^{_CLASS_ESCAPES[e.lower()]}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
        elif c == "[":
            i = _ecma_class(pattern, i, out)
        elif c == ".":
            out.append(_ECMA_DOT)
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _ecma_class(pattern: str, i: int, out: list[str]) -> int:
    """Rewrite the character class starting at ``pattern[i] == "["``; returns the index after."""
    n = len(pattern)
    j = i + 1
    negated = j < n and pattern[j] == "^"
    j += negated
    if j < n and pattern[j] == "]":
        raise _RegexRefused("'[]' and '[^]' mean an empty class / any character in ECMA-262 "
                            "but a literal ']' in Python's re")
    body: list[str] = []
    negated_sets: list[str] = []
    while j < n and pattern[j] != "]":
        if pattern[j] == "\\" and j + 1 < n:
            e = pattern[j + 1]
            if e in _CLASS_ESCAPES:
                body.append(_CLASS_ESCAPES[e])
            elif e.lower() in _CLASS_ESCAPES:
                negated_sets.append(_CLASS_ESCAPES[e.lower()])
            else:
                body.append(pattern[j : j + 2])
            j += 2
        else:
            body.append(pattern[j])
            j += 1
    if j >= n:  # unterminated: leave it to the regex engines to reject
        out.append(pattern[i:])
        return n
    if not negated_sets:
        out.append("[" + "^" * negated + "".join(body) + "]")
    elif negated:
        raise _RegexRefused(r"a negated escape (\D, \W, \S) inside a negated class [^...] has no "
                            "equivalent every engine reads alike")
    else:  # [a\S] = a or not-space
        parts = ([f"[{''.join(body)}]"] if body else []) + [f"[^{s}]" for s in negated_sets]
        out.append(parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")")
    return j + 1


def _explicit_patterns(schema: dict) -> dict:
    """``schema`` with :func:`ecma_regex` applied to every ``pattern`` and ``patternProperties``
    key (a copy, if anything changes)."""
    def rewrite(pattern: str, keyword: str, path: str) -> str:
        try:
            out = ecma_regex(pattern)
        except _RegexRefused as exc:
            raise UnsupportedSchemaError(
                f"unsupported JSON schema keyword '{keyword}' at {path}: regex {pattern!r}: {exc}",
                (keyword,)) from None
        try:
            re.compile(out)
        except re.error:  # e.g. [\w-.]: Python's re cannot read the original either; leave it
            return pattern  # to check_schema, which names it as the user wrote it
        return out

    def needs(node: dict) -> bool:
        pats = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            pats += list(node["patternProperties"])
        return any(isinstance(p, str) and _regex_changes(p) for p in pats)

    if not any(needs(node) for _, node in subschemas(schema)):
        return schema
    schema = json.loads(json.dumps(schema))
    for path, node in subschemas(schema):
        if isinstance(node.get("pattern"), str):
            node["pattern"] = rewrite(node["pattern"], "pattern", path)
        props = node.get("patternProperties")
        if isinstance(props, dict):
            node["patternProperties"] = {
                rewrite(k, "patternProperties", path) if isinstance(k, str) else k: v
                for k, v in props.items()}
    return schema


def _regex_changes(pattern: str) -> bool:
    """Whether :func:`ecma_regex` changes (or refuses) ``pattern``."""
    try:
        return ecma_regex(pattern) != pattern
    except _RegexRefused:
        return True


def subschemas(node: Any, path: str = "#") -> Iterator[tuple[str, dict]]:
    """Every schema object inside ``node`` (itself first), with its JSON-pointer path."""
    if not isinstance(node, dict):
        return
    yield path, node
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                yield from subschemas(sub, f"{path}/{key}/{_pointer(name)}")
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                yield from subschemas(sub, f"{path}/{key}/{i}")
    for key in _SCHEMA_ONE:
        sub = node.get(key)
        if isinstance(sub, list):  # draft-4 tuple items
            for i, s in enumerate(sub):
                yield from subschemas(s, f"{path}/{key}/{i}")
        else:
            yield from subschemas(sub, f"{path}/{key}")


def _pointer(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


def keyword_paths(schema: dict, keyword: str) -> list[str]:
    """The paths of the schema objects that use ``keyword``."""
    return [p for p, node in subschemas(schema) if keyword in node]


def check_schema(schema: dict) -> None:
    """Reject, before compiling, what the grammar engine would miss or get wrong: non-local
    ``$ref``s, contradictory bounds, and what it would enforce more loosely than JSON Schema
    means it (:func:`_check_enforceable`). Meta-schema violations are left to the compiler, which
    refuses them; :func:`schema_error` then names them (:func:`check_meta_schema`): the
    meta-schema check costs milliseconds per schema, too much for every tool of every request."""
    for path, node in subschemas(schema):
        _check_bounds(node, path)
        for where, pattern in [("pattern", node.get("pattern"))] + [
                ("patternProperties", p) for p in node.get("patternProperties") or ()]:
            try:
                if isinstance(pattern, str):
                    re.compile(pattern)
            except re.error as exc:  # generation's output validator (Python's re) must read it
                raise ValueError(f"malformed JSON schema at {path}/{where}: invalid regex "
                                 f"{pattern!r}: {exc}") from None
        ref = node.get("$ref")
        if ref is None:
            continue
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchemaError(
                f"unsupported JSON schema keyword '$ref' at {path}: only local references "
                f"('#/...') are supported, got {ref!r}", ("$ref",))
    _check_enforceable(schema)


def check_meta_schema(schema: dict) -> None:
    """Reject a schema its meta-schema (draft 2020-12 unless ``$schema`` names another) rejects,
    with the path of the problem."""
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(_draft4_bounds(schema))
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(["#", *(_pointer(p) for p in exc.absolute_path)])
        hint = ""
        if exc.validator == "format" and exc.validator_value == "regex":
            hint = " (the output validator, Python's re, cannot read it)"
        raise ValueError(f"malformed JSON schema at {where}: {exc.message}{hint}") from None


#: Integers up to this size are read exactly (as an f64) by llguidance.
_EXACT_INT = 2**53
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _check_enforceable(schema: dict) -> None:
    """Refuse, naming keyword and path, what llguidance would enforce more loosely than JSON
    Schema means it (each found by generating from the JSON Schema Test Suite):

    * ``$schema`` naming a meta-schema that is not a standard draft: it would be fetched (it
      cannot be, offline) and its vocabularies could change what the keywords mean;
    * a numeric bound llguidance cannot read exactly: it parses numbers as f64 with serde_json's
      fast path, which is exact only for at most 2**53 significant-digit values with a decimal
      exponent within +-22 (``maximum: 1.9999999999999998`` is read as 2, and "2" is generated);
    * ``minProperties`` more than one beyond the names the schema lists, on an object that may
      have other keys: llguidance counts keys, not distinct ones, so ``{"x": 1, "x": 2}``
      passes ``minProperties: 2`` although it is an object with one property."""
    import jsonschema

    meta = schema.get("$schema")
    if isinstance(meta, str) and jsonschema.validators.validator_for(schema, default=None) is None:
        raise UnsupportedSchemaError(
            f"unsupported JSON schema keyword '$schema' at #: unknown meta-schema {meta!r} (only "
            "the standard JSON Schema drafts are supported; meta-schemas are not fetched)",
            ("$schema",))
    for path, node in subschemas(schema):
        for key in _BOUNDS:
            value = node.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not _read_exactly(value):
                raise UnsupportedSchemaError(
                    f"unsupported JSON schema keyword '{key}' at {path}: the grammar engine cannot "
                    f"read {value!r} exactly (it reads numbers as 64-bit floats, exactly only with "
                    "at most ~15 significant digits and exponents within 1e+-22), so the bound "
                    "is refused rather than rounded", (key,))
        least = node.get("minProperties")
        if isinstance(least, int) and not isinstance(least, bool):
            listed = set(node.get("properties") or {}) | {
                r for r in node.get("required") or [] if isinstance(r, str)}
            closed = node.get("additionalProperties") is False and not node.get("patternProperties")
            if not closed and least >= len(listed) + 2:
                raise UnsupportedSchemaError(
                    f"unsupported JSON schema keyword 'minProperties' at {path}: the grammar "
                    f"engine counts keys, not distinct keys, so it cannot enforce {least} "
                    f"properties when fewer than {least - 1} are named (a repeated key would "
                    "count twice)", ("minProperties",))


def _read_exactly(value: int | float) -> bool:
    """Whether serde_json's fast path (what llguidance parses schemas with) reads ``value``, as
    :func:`json.dumps` writes it, as exactly this number."""
    if isinstance(value, int):
        return abs(value) <= _EXACT_INT
    if not math.isfinite(value):
        return False
    digits = decimal.Decimal(repr(value)).as_tuple()
    significand = int("".join(map(str, digits.digits)) or "0")
    return significand <= _EXACT_INT and -22 <= int(digits.exponent) <= 22


_BOUND_PAIRS = (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"),
                ("minProperties", "maxProperties"), ("exclusiveMinimum", "maximum"),
                ("minimum", "exclusiveMaximum"), ("exclusiveMinimum", "exclusiveMaximum"))


def _check_bounds(node: dict, path: str) -> None:
    """Contradictory bounds are valid JSON Schema but always a mistake: say so, where."""
    for lo, hi in _BOUND_PAIRS:
        a, b = node.get(lo), node.get(hi)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            continue
        strict = lo.startswith("exclusive") or hi.startswith("exclusive")
        if a > b or (strict and a == b):
            raise ValueError(f"malformed JSON schema at {path}: {lo}={a} and {hi}={b} leave no "
                             "value")


def _draft4_bounds(schema: Any) -> Any:
    """Draft-4 boolean ``exclusiveMinimum``/``exclusiveMaximum`` in their later numeric form."""
    if isinstance(schema, list):
        return [_draft4_bounds(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _draft4_bounds(v) for k, v in schema.items()}
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(flag), bool):
            if out.pop(flag) and bound in out:
                out[flag] = out.pop(bound)
    return out


_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")


def _closed_objects(schema: Any, in_all_of: bool = False) -> Any:
    """``additionalProperties: false`` on each object schema that lists its ``properties`` and
    says nothing about other ones, as OpenAI's strict mode, XGrammar and outlines-core generate:
    every output is still valid, and a model is not invited to invent keys. Left open where that
    would change what is valid: other keys required (``required`` or ``minProperties`` beyond the
    listed ones) or the object composed with ``allOf``."""
    if isinstance(schema, list):
        return [_closed_objects(s, in_all_of) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {n: _closed_objects(s, in_all_of and k == "$defs") for n, s in v.items()}
        elif k in _SCHEMA_LISTS or k in _SCHEMA_ONE:
            out[k] = _closed_objects(v, in_all_of or k == "allOf")
        else:
            out[k] = v
    props = out.get("properties")
    if (isinstance(props, dict) and not in_all_of and not any(k in out for k in _OPEN_KEYS)
            and all(r in props for r in out.get("required", []) if isinstance(r, str))
            and out.get("minProperties", 0) <= len(props)):
        out["additionalProperties"] = False
    return out


def json_grammar(schema: dict, *, whitespace: str | None = DEFAULT_WHITESPACE,
                 lenient: bool = False) -> str:
    """The schema as a Lark fragment, ``%json{...}`` (JSON whitespace limited to ``whitespace``;
    ``None``: any). ``lenient`` drops the keywords the engine cannot enforce."""
    schema = _closed_objects(_draft4_bounds(schema))
    options: dict[str, Any] = dict(schema.get("x-guidance") or {})
    if whitespace is not None:
        options.setdefault("whitespace_pattern", whitespace)
    if lenient:
        options["lenient"] = True
    body = {**schema, "x-guidance": options} if options else schema
    return "%json " + json.dumps(body, ensure_ascii=False)


_UNIMPLEMENTED = re.compile(r'Unimplemented keys: (\[.*?\])')


def strict_check(schema: dict) -> tuple[tuple[str, ...], list[str]]:
    """llguidance's verdict on the schema's strict grammar: ``(keywords it does not implement,
    its messages)``; ``((), [])`` when the grammar is valid."""
    from llguidance import LLMatcher

    grammar = LLMatcher.grammar_from_lark("start: " + json_grammar(schema))
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return (unsupported_keywords(messages), messages) if failed else ((), [])


def unsupported_keywords(messages: list[str]) -> tuple[str, ...]:
    """The keywords llguidance's messages say it does not implement."""
    found: list[str] = []
    for msg in messages:
        for m in _UNIMPLEMENTED.finditer(msg):
            try:
                found += [k for k in json.loads(m.group(1)) if k not in found]
            except json.JSONDecodeError:  # pragma: no cover - message format changed
                continue
    return tuple(found)


def schema_error(schema: dict, message: str) -> ValueError:
    """llguidance's compile error for ``schema`` as a ValueError that names keyword and path
    (the meta-schema's verdict first, where it has one)."""
    try:
        check_meta_schema(schema)
    except ValueError as exc:
        return exc
    keys = unsupported_keywords([message])
    if keys:
        where = "; ".join(f"'{k}' at {', '.join(keyword_paths(schema, k)) or '#'}" for k in keys)
        return UnsupportedSchemaError(
            f"unsupported JSON schema keyword{'s' if len(keys) > 1 else ''} {where}: the grammar "
            "engine cannot enforce it, so the schema is refused rather than loosened", keys)
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    first = re.sub(r"^(at \d+\(\d+\):\s*)?(failed to compile JSON schema:\s*)?", "", first)
    if first.rstrip().endswith(":"):  # e.g. "regex parse error:", details on the next lines
        first = " ".join([first.rstrip(), *(ln.strip() for ln in message.strip().splitlines()[1:4])])
    if first.startswith("Unsatisfiable schema"):
        return UnsupportedSchemaError(
            "unsatisfiable JSON schema: no value is valid, so there is nothing to generate "
            f"({first.split(':', 1)[-1].strip()})")
    keys = _message_keywords(schema, first)
    if not keys:
        return UnsupportedSchemaError(f"unsupported JSON schema: {first}")
    if list(keys) == ["oneOf"]:
        first = ("the grammar engine cannot enforce 'exactly one of' (approximating it with anyOf "
                 "would loosen the constraint)")
    where = "; ".join(f"'{k}' at {', '.join(paths)}" for k, paths in keys.items())
    return UnsupportedSchemaError(
        f"unsupported JSON schema keyword{'s' if len(keys) > 1 else ''} {where}: {first}",
        tuple(keys))


#: llguidance messages that name no keyword, and the keywords they are about.
_MESSAGE_TOPICS = (
    (re.compile(r"oneOf constraints"), ("oneOf",)),
    (re.compile(r"patternProperty regex"), ("patternProperties",)),
    (re.compile(r"float range|int(eger)? range"),
     ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")),
    (re.compile(r"min/maxProperties"), ("minProperties", "maxProperties")),
    (re.compile(r"\bregex\b|lookaround"), ("pattern", "patternProperties")),
)


def _message_keywords(schema: dict, message: str) -> dict[str, list[str]]:
    """The keywords an llguidance message is about, with the paths where the schema uses them
    (only keywords the schema does use)."""
    names = re.findall(r"'([$A-Za-z]+)'", message)
    for rx, topic in _MESSAGE_TOPICS:
        if rx.search(message):
            names += topic
    found: dict[str, list[str]] = {}
    fmt = re.search(r"Unknown format: (\S+)", message)
    if fmt:
        paths = [p for p, node in subschemas(schema) if node.get("format") == fmt.group(1)]
        if paths:
            found["format"] = paths
    for name in dict.fromkeys(names):
        paths = keyword_paths(schema, name)
        if paths and name not in found:
            found[name] = paths
    return found
