"""``uniqueItems`` enforced while decoding: tokens that would repeat an array's item are masked.

A context-free grammar cannot say "an item not written before", so llguidance leaves
``uniqueItems`` out. For arrays whose items are scalars (strings, numbers, booleans, enums) the
processor asks a :class:`UniqueItemsGuard` each step which tokens to take away: it follows the
generated JSON byte by byte (:class:`JsonCursor`) and bans a token when

* it completes an item equal, as a JSON value, to an earlier item of the same array; or
* the schema allows finitely many items (an enum, a bounded integer range, booleans) and after
  the token no unused one can be completed -- which also stops an array from asking for one
  more item once every value is used.

Arrays of objects or arrays keep the check after generation (a call that repeats one is an
``InvalidToolCall``). Where the guard would ban every token the grammar allows, it bans none,
so it can never stall generation; the check after generation still holds then.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np

from flashmoe_backend.constrained.json_schema import strict_check, subschemas

__all__ = ["JsonCursor", "UniqueItemsGuard", "enforced_while_decoding", "guarded_unique_arrays",
           "item_domain", "response_guard"]

#: Locates the JSON value being generated: ``text -> (schema, root, start)`` or None.
Locator = Callable[[bytes], "tuple[dict, dict, int] | None"]

_NUMBER_BYTES = frozenset(b"0123456789+-.eE")
_LITERAL_BYTES = frozenset(b"truefalsn")
_WHITESPACE = frozenset(b" \t\r\n")
_SCALAR_TYPES = frozenset({"string", "integer", "number", "boolean", "null"})
#: Finite item domains up to this size are followed exactly; larger ones count as free.
_MAX_DOMAIN = 4096
#: Above this many allowed tokens only the tokens that spell out an earlier item are checked.
_CHECK_ALL_LIMIT = 4096


def resolve(schema: Any, root: dict) -> dict:
    """``schema`` with local ``$ref`` chains followed (``{}`` where it is not an object)."""
    for _ in range(16):
        if not (isinstance(schema, dict) and isinstance(schema.get("$ref"), str)):
            break
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            return {}
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(
                node, dict) else None
        schema = node
    return schema if isinstance(schema, dict) else {}


def _branch(schema: dict, root: dict, kind: str) -> dict:
    """The alternative of ``schema`` (``anyOf``/``oneOf``) that is a JSON ``kind``, if any."""
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            sub = resolve(sub, root)
            t = sub.get("type")
            if t == kind or (isinstance(t, list) and kind in t) or (
                    t is None and (("items" in sub) if kind == "array" else ("properties" in sub))):
                return sub
    return schema


def item_domain(items: dict, root: dict) -> tuple[bytes, ...] | None:
    """Every item ``items`` allows, as compact JSON bytes, when they are few; else None."""
    items = resolve(items, root)
    if "const" in items:
        values = [items["const"]]
    elif isinstance(items.get("enum"), list):
        values = items["enum"]
    elif items.get("type") == "boolean":
        values = [True, False]
    elif items.get("type") == "integer":
        lo, hi = _int_bounds(items)
        if lo is None or hi is None or hi - lo >= _MAX_DOMAIN:
            return None
        values = list(range(lo, hi + 1))
    else:
        return None
    if len(values) > _MAX_DOMAIN or not all(_is_scalar(v) for v in values):
        return None
    return tuple(json.dumps(v, ensure_ascii=False).encode() for v in values)


def _int_bounds(schema: dict) -> tuple[int | None, int | None]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    low = [int(-(-lo // 1))] if isinstance(lo, (int, float)) else []
    low += [int(xlo // 1) + 1] if isinstance(xlo, (int, float)) and not isinstance(xlo, bool) else []
    high = [int(hi // 1)] if isinstance(hi, (int, float)) else []
    high += [int(-(-xhi // 1)) - 1] if isinstance(xhi, (int, float)) and not isinstance(
        xhi, bool) else []
    return (max(low) if low else None), (min(high) if high else None)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _scalar_items(items: Any, root: dict) -> bool:
    items = resolve(items, root)
    if "const" in items or "enum" in items:
        return all(_is_scalar(v) for v in (
            [items["const"]] if "const" in items else items["enum"] or []))
    t = items.get("type")
    types = t if isinstance(t, list) else [t]
    return bool(types) and all(x in _SCALAR_TYPES for x in types)


def guarded_unique_arrays(schema: dict, root: dict | None = None) -> tuple[list[str], list[str]]:
    """Paths of the ``uniqueItems`` arrays in ``schema``: ``(guarded, left to the check after
    generation)``; guarded ones have scalar items."""
    root = schema if root is None else root
    guarded, unguarded = [], []
    for path, node in subschemas(schema):
        if node.get("uniqueItems") is True:
            ok = isinstance(node.get("items"), dict) and "prefixItems" not in node and \
                _scalar_items(node["items"], root)
            (guarded if ok else unguarded).append(path)
    return guarded, unguarded


def enforced_while_decoding(schema: dict) -> bool:
    """Whether ``uniqueItems`` over scalars is all that keeps the schema's strict grammar from
    compiling: then the grammar leaves it out and a :class:`UniqueItemsGuard` enforces it."""
    guarded, unguarded = guarded_unique_arrays(schema)
    return bool(guarded) and not unguarded and strict_check(schema)[0] == ("uniqueItems",)


def response_guard(schema: dict, after_reasoning: bool = False) -> UniqueItemsGuard:
    """The guard of a JSON ``response_format`` whose value is the whole reply (or what follows
    the reasoning block's ``</think>``)."""

    def locate(text: bytes) -> tuple[dict, dict, int] | None:
        if not after_reasoning:
            return schema, schema, 0
        end = text.find(b"</think>")
        return None if end < 0 else (schema, schema, end + len(b"</think>"))

    return UniqueItemsGuard(locate)


def canonical(raw: bytes) -> Any:
    """A JSON scalar's value for comparing items: ``"a"`` and ``"\\u0061"`` are one item, so
    are ``1`` and ``1.0``."""
    try:
        if raw[:1] == b'"':
            return ("s", json.loads(raw))
        if raw[:1] in b"-0123456789":
            return ("n", Decimal(raw.decode()))
    except (ValueError, InvalidOperation):
        pass
    return ("r", raw)


@dataclass
class _Frame:
    kind: str  # "object" | "array"
    schema: dict
    expect: str = "value"  # objects: key | colon | value | comma; arrays: value | comma
    key: str | None = None
    count: int = 0
    unique: bool = False
    domain: tuple[bytes, ...] | None = None
    seen: tuple = ()  # canonical values of the finished items (unique arrays)
    raw: tuple[bytes, ...] = ()


class JsonCursor:
    """Follows a JSON value byte by byte, with the schema of each open container, the items
    each ``uniqueItems`` array has finished and the scalar being written."""

    def __init__(self, schema: dict, root: dict):
        self.root = root
        self.schema = resolve(schema, root)
        self.stack: list[_Frame] = []
        self.scalar: bytearray | None = None
        self.scalar_is_key = False
        self.escape = False
        self.done = False
        self.repeated = False  # an item equal to an earlier one was finished

    def copy(self) -> JsonCursor:
        c = object.__new__(JsonCursor)
        c.__dict__.update(self.__dict__)
        c.stack = [dataclasses.replace(f) for f in self.stack]
        c.scalar = None if self.scalar is None else bytearray(self.scalar)
        return c

    # -- reading --------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bool:
        """Advance over ``data``; False once it finishes a repeated item, leaves the JSON
        value or breaks JSON's syntax."""
        for b in data:
            if self.done or not self._byte(b):
                return False
            if self.repeated:
                return False
        return True

    def _byte(self, b: int) -> bool:
        if self.scalar is not None:
            if self.scalar[0] == 0x22:  # a string
                self.scalar.append(b)
                if self.escape:
                    self.escape = False
                elif b == 0x5C:
                    self.escape = True
                elif b == 0x22:
                    self._end_scalar()
                return True
            if b in _NUMBER_BYTES or b in _LITERAL_BYTES:
                self.scalar.append(b)
                return True
            self._end_scalar()
            if self.done:
                return False
        return self._structural(b)

    def _structural(self, b: int) -> bool:
        if b in _WHITESPACE:
            return True
        top = self.stack[-1] if self.stack else None
        if top is not None and top.kind == "object" and top.expect in ("key", "colon", "comma"):
            return self._object_punctuation(top, b)
        if top is not None and top.expect == "comma":  # an array after an item
            if b == 0x2C:
                top.expect = "value"
                return True
            return b == 0x5D and self._close()
        if b == 0x5D and top is not None and top.kind == "array" and top.count == 0:
            return self._close()
        return self._value_start(b)

    def _object_punctuation(self, top: _Frame, b: int) -> bool:
        if top.expect == "key":
            if b == 0x22:
                self.scalar, self.scalar_is_key = bytearray(b'"'), True
                return True
            return b == 0x7D and self._close()
        if top.expect == "colon":
            top.expect = "value"
            return b == 0x3A
        if b == 0x2C:
            top.expect = "key"
            return True
        return b == 0x7D and self._close()

    def _value_start(self, b: int) -> bool:
        schema = self._child_schema()
        if b == 0x7B:
            self.stack.append(_Frame("object", _branch(schema, self.root, "object"), "key"))
            return True
        if b == 0x5B:
            s = _branch(schema, self.root, "array")
            items = s.get("items") if isinstance(s.get("items"), dict) else None
            unique = s.get("uniqueItems") is True and items is not None and \
                "prefixItems" not in s and _scalar_items(items, self.root)
            self.stack.append(_Frame("array", s, unique=unique,
                                     domain=item_domain(items, self.root) if unique else None))
            return True
        if b == 0x22 or b in _NUMBER_BYTES or b in _LITERAL_BYTES:
            self.scalar, self.scalar_is_key = bytearray([b]), False
            return True
        return False

    def _child_schema(self) -> dict:
        if not self.stack:
            return self.schema
        top = self.stack[-1]
        s = top.schema
        if top.kind == "object":
            props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
            sub = props.get(top.key, s.get("additionalProperties"))
        else:
            prefix = s.get("prefixItems")
            sub = prefix[top.count] if isinstance(prefix, list) and top.count < len(
                prefix) else s.get("items")
        return resolve(sub, self.root)

    def _end_scalar(self) -> None:
        raw, self.scalar = bytes(self.scalar), None
        top = self.stack[-1] if self.stack else None
        if self.scalar_is_key:
            try:
                top.key = json.loads(raw)
            except ValueError:
                top.key = None
            top.expect = "colon"
            return
        self._finish_value(raw)

    def _finish_value(self, raw: bytes | None) -> None:
        top = self.stack[-1] if self.stack else None
        if top is None:
            self.done = True
            return
        if top.kind == "array":
            if top.unique and raw is not None:
                value = canonical(raw)
                if value in top.seen:
                    self.repeated = True
                top.seen += (value,)
                top.raw += (raw,)
            top.count += 1
        top.expect = "comma"

    def _close(self) -> bool:
        self.stack.pop()
        self._finish_value(None)
        return True

    # -- where the cursor is --------------------------------------------------------------------

    def unique_array(self) -> _Frame | None:
        """The innermost open container when it is a guarded array and an item of it may be
        under way (not inside a nested container)."""
        top = self.stack[-1] if self.stack else None
        return top if top is not None and top.kind == "array" and top.unique else None

    def dead_end(self) -> bool:
        """True when a finite-domain unique array waits for, or is writing, an item that no
        unused value can complete."""
        top = self.unique_array()
        if top is None or top.domain is None:
            return False
        if self.scalar is not None:
            prefix = bytes(self.scalar)
        elif top.expect == "value":
            prefix = b""
        else:
            return False
        return not any(v.startswith(prefix) and canonical(v) not in top.seen
                       for v in top.domain)


class UniqueItemsGuard:
    """The tokens not to allow next so that no ``uniqueItems`` array repeats an item.

    ``locate(text)`` finds the JSON value being generated in the text so far (its schema, the
    root for ``$ref`` and where it starts), or None outside one; each tool-call format has its
    own. Holds no state of a generation: each call reads the value from the text it is given
    (continuing from the previous call's reading where the text extends it)."""

    def __init__(self, locate: Locator):
        self.locate = locate
        self._last: tuple[int, bytes, JsonCursor] | None = None  # the value read last step

    def _cursor_after(self, value: bytes, schema: dict, root: dict) -> JsonCursor | None:
        """A cursor that has read ``value``; from the last step's cursor where ``value``
        extends what it read (one token more, as a rule)."""
        last = self._last
        if last is not None and last[0] == id(schema) and value.startswith(last[1]):
            cursor, rest = last[2].copy(), value[len(last[1]):]
        else:
            cursor, rest = JsonCursor(schema, root), value
        if not cursor.feed(rest):
            return None
        self._last = (id(schema), value, cursor.copy())
        return cursor

    def banned(self, text: bytes, vocabulary: Any, matcher: Any,
               allowed: Callable[[int], np.ndarray | None]) -> np.ndarray | None:
        """Ids to take out of the grammar's mask: ``matcher`` is the grammar's state after
        ``text``, ``allowed(limit)`` the ids its mask allows (None if more than ``limit``)."""
        where = self.locate(text)
        if where is None:
            return None
        schema, root, start = where
        cursor = self._cursor_after(text[start:], schema, root)
        if cursor is None:
            return None
        frame = cursor.unique_array()
        if frame is None or (not frame.seen and frame.domain is None):
            return None
        candidates = allowed(_CHECK_ALL_LIMIT)
        if candidates is None:
            candidates = self._spelling_earlier(cursor, frame, vocabulary)
        tb = vocabulary.token_bytes
        out = []
        for t in candidates.tolist():
            c = cursor.copy()
            fed = c.feed(tb[t])
            if c.repeated or (fed and c.dead_end()):
                out.append(t)
        out += self._into_forced_repeats(cursor, frame, vocabulary, matcher)
        return np.asarray(out, dtype=np.int64)

    @staticmethod
    def _spelling_earlier(cursor: JsonCursor, frame: _Frame, vocabulary: Any) -> np.ndarray:
        """Inside a free string many tokens are allowed; only those starting with the rest of
        an earlier item can finish a repeat."""
        partial = bytes(cursor.scalar or b"")
        found = [vocabulary.ids_with_prefix(raw[len(partial):]) for raw in frame.raw
                 if raw.startswith(partial) and len(raw) > len(partial)]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    @staticmethod
    def _into_forced_repeats(cursor: JsonCursor, frame: _Frame, vocabulary: Any,
                             matcher: Any) -> list[int]:
        """Tokens that spell an earlier string item but its closing quote, where the grammar
        then allows only that quote (a string at its ``maxLength``): after them, any way on
        repeats the item."""
        partial = bytes(cursor.scalar) if cursor.scalar is not None else None
        if partial is None or partial[:1] != b'"':
            return []
        out = []
        for raw in frame.raw:
            if not (raw[:1] == b'"' and raw.startswith(partial) and len(raw) - len(partial) >= 2):
                continue
            rest = raw[len(partial):-1]
            ids = vocabulary.ids_with_prefix(rest)
            exact = [t for t in ids[:4].tolist() if vocabulary.token_bytes[t] == rest]
            for t in exact:
                trial = matcher.deep_copy()
                if trial.consume_token(t) and not _allows_other_than_quote(trial, vocabulary):
                    out.append(t)
        return out


def _allows_other_than_quote(matcher: Any, vocabulary: Any) -> bool:
    mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    ids = np.flatnonzero(np.unpackbits(mask, bitorder="little")[:vocabulary.size])
    tb = vocabulary.token_bytes
    return any(tb[t][:1] != b'"' for t in ids.tolist())
