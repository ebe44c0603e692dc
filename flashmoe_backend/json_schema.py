"""JSON schema -> regular expression, on top of outlines-core's ``build_regex_from_schema``.

:func:`schema_to_regex` first rejects malformed schemas with a clear :class:`ValueError` and
renders itself what outlines-core 0.2.14 leaves out or gets wrong: integer and number
``minimum``/``maximum`` (exclusive too, see :func:`integer_range_regex` /
:func:`number_range_regex`) and JSON-safe string formats (:data:`FORMAT_REGEXES`).
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from decimal import Decimal, InvalidOperation
from typing import Any

from outlines_core.json_schema import build_regex_from_schema

__all__ = [
    "DEFAULT_WHITESPACE",
    "FORMAT_REGEXES",
    "integer_range_regex",
    "number_range_regex",
    "regex_escape",
    "schema_to_regex",
]

#: Whitespace allowed wherever JSON allows whitespace: at most one space.
DEFAULT_WHITESPACE = r"[ ]?"


# =============================================================================================
# Regex helpers: escaping, integer and number ranges
# =============================================================================================

_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def regex_escape(text: str) -> str:
    """Escape ``text`` for outlines-core's (Rust) regex syntax; also valid for Python's ``re``."""
    out = []
    for c in text:
        if c in _REGEX_META:
            out.append("\\" + c)
        elif c == "\n":
            out.append(r"\n")
        elif c == "\t":
            out.append(r"\t")
        elif c == "\r":
            out.append(r"\r")
        else:
            out.append(c)
    return "".join(out)


def _grp(r: str) -> str:
    return f"({r})" if "|" in r else r


def _digit_class(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"[{lo}-{hi}]"


def _same_length_range(a: str, b: str) -> str:
    """Regex for the decimal strings of the same length as ``a`` and ``b`` with a <= s <= b."""
    if a == b:
        return a
    if a[0] == b[0]:
        return a[0] + _grp(_same_length_range(a[1:], b[1:]))
    n = len(a) - 1
    lo, hi = int(a[0]), int(b[0])
    if n == 0:
        return _digit_class(lo, hi)
    alts = []
    if a[1:] == "0" * n:
        full_lo = lo
    else:
        alts.append(a[0] + _grp(_same_length_range(a[1:], "9" * n)))
        full_lo = lo + 1
    tail = None
    if b[1:] == "9" * n:
        full_hi = hi
    else:
        full_hi = hi - 1
        tail = b[0] + _grp(_same_length_range("0" * n, b[1:]))
    if full_lo <= full_hi:
        rest = "[0-9]" if n == 1 else f"[0-9]{{{n}}}"
        alts.append(_digit_class(full_lo, full_hi) + rest)
    if tail:
        alts.append(tail)
    return "|".join(alts)


def _nonneg_int_range(lo: int, hi: int | None) -> str | None:
    """Regex for canonical decimal integers n with lo <= n <= hi (``hi=None``: no bound), lo >= 0."""
    if hi is not None and lo > hi:
        return None
    # Longest numbers first: outlines-core compiles regexes with leftmost-first semantics, so
    # at the end of a regex an alternative whose match is a prefix of a later one's hides it
    # ("[0-9]|[1-9][0-9]" would never produce "12").
    alts = []
    dlo = len(str(lo))
    if hi is None:
        alts.append(f"[1-9][0-9]{{{dlo},}}")
        alts.append(_same_length_range(str(lo), "9" * dlo))
    else:
        for d in range(len(str(hi)), dlo - 1, -1):
            a = max(lo, 10 ** (d - 1) if d > 1 else 0)
            b = min(hi, 10**d - 1)
            alts.append(_same_length_range(str(a), str(b)))
    return "|".join(alts)


def integer_range_regex(lo: int | None, hi: int | None) -> str:
    """Regex for the JSON integers n with lo <= n <= hi (``None``: unbounded on that side)."""
    parts = []
    if lo is None or lo < 0:
        m_lo = -hi if hi is not None and hi < 0 else 1
        m_hi = None if lo is None else -lo
        r = _nonneg_int_range(m_lo, m_hi)
        if r:
            parts.append("-" + _grp(r))
    if hi is None or hi >= 0:
        r = _nonneg_int_range(max(lo, 0) if lo is not None else 0, hi)
        if r:
            parts.append(r)
    if not parts:
        raise ValueError(f"empty integer range [{lo}, {hi}]")
    return "|".join(parts)


def _split_decimal(x: Decimal) -> tuple[int, str]:
    """(integer part, fraction digits without trailing zeros) of a non-negative decimal."""
    s = format(x, "f")
    if "." in s:
        i, f = s.split(".")
        return int(i), f.rstrip("0")
    return int(s), ""


def _frac_range(
    lo: str, lo_incl: bool, hi: str | None, hi_incl: bool
) -> tuple[str | None, bool]:
    """Digit strings s (the fraction 0.s) with 0.lo <=/< 0.s <=/< 0.hi (``hi=None``: below 1).

    Returns (regex for the non-empty such strings or None, whether the empty string -- the value
    0, i.e. no fraction at all -- is in range)."""
    if hi == "":
        if hi_incl and lo == "" and lo_incl:
            return "0+", True
        return None, False
    if lo == "" and lo_incl and hi is None:
        return "[0-9]+", True
    if lo == "" and not lo_incl and hi is None:
        return "0*[1-9][0-9]*", False
    empty_ok = lo == "" and lo_incl  # hi is non-empty here, so 0 < 0.hi
    l0, lrest = (int(lo[0]), lo[1:]) if lo else (0, "")
    h0, hrest = (int(hi[0]), hi[1:]) if hi else (9, "")
    alts = []
    free_lo = free_hi = None
    for d in range(l0, h0 + 1):
        lower_tight = d == l0 and not (lo == "" and lo_incl)
        upper_tight = hi is not None and d == h0
        if not lower_tight and not upper_tight:
            free_lo = d if free_lo is None else free_lo
            free_hi = d
            continue
        sub = _frac_range(
            lrest if lower_tight else "",
            lo_incl if lower_tight else True,
            hrest if upper_tight else None,
            hi_incl if upper_tight else False,
        )
        ne, e = sub
        if ne is None and not e:
            continue
        if ne is None:
            alts.append(str(d))
        else:
            alts.append(str(d) + f"({ne})" + ("?" if e else ""))
    if free_lo is not None:
        alts.append(_digit_class(free_lo, free_hi) + "[0-9]*")
    return ("|".join(alts) if alts else None), empty_ok


def _nonneg_number_range(
    lo: Decimal, lo_incl: bool, hi: Decimal | None, hi_incl: bool
) -> str | None:
    ia, fa = _split_decimal(lo)
    alts = []

    def add(int_re: str, frac: tuple[str | None, bool]) -> None:
        ne, empty_ok = frac
        if ne is None and not empty_ok:
            return
        if ne is None:
            alts.append(int_re)
        else:
            alts.append(int_re + rf"(\.({ne}))" + ("?" if empty_ok else ""))

    if hi is not None:
        ib, fb = _split_decimal(hi)
        if hi < lo or (hi == lo and not (lo_incl and hi_incl)):
            return None
        if ia == ib:
            add(str(ia), _frac_range(fa, lo_incl, fb, hi_incl))
            return "|".join(alts) or None
    # Longer integer parts first (see _nonneg_int_range).
    if hi is not None:
        add(str(ib), _frac_range("", True, fb, hi_incl))
    mid = _nonneg_int_range(ia + 1, (ib - 1) if hi is not None else None)
    if mid:
        add(_grp(mid), ("[0-9]+", True))
    add(str(ia), _frac_range(fa, lo_incl, None, False))
    return "|".join(alts) or None


def number_range_regex(
    lo: float | Decimal | None,
    hi: float | Decimal | None,
    *,
    lo_inclusive: bool = True,
    hi_inclusive: bool = True,
) -> str:
    """Regex for JSON numbers (no exponent) x with lo <=/< x <=/< hi (``None``: unbounded)."""
    dlo = None if lo is None else _to_decimal(lo)
    dhi = None if hi is None else _to_decimal(hi)
    parts = []
    zero = Decimal(0)
    if dlo is None or dlo < 0:
        if dhi is not None and dhi < 0:
            y_lo, y_lo_incl = -dhi, hi_inclusive
        else:
            y_lo, y_lo_incl = zero, False
        y_hi, y_hi_incl = (None, False) if dlo is None else (-dlo, lo_inclusive)
        r = _nonneg_number_range(y_lo, y_lo_incl, y_hi, y_hi_incl)
        if r:
            parts.append("-" + _grp(r))
    if dhi is None or dhi >= 0:
        x_lo, x_lo_incl = (dlo, lo_inclusive) if dlo is not None and dlo >= 0 else (zero, True)
        r = _nonneg_number_range(x_lo, x_lo_incl, dhi, hi_inclusive)
        if r:
            parts.append(r)
    if not parts:
        raise ValueError(f"empty number range ({lo}, {hi})")
    return "|".join(parts)


def _to_decimal(x: Any) -> Decimal:
    if isinstance(x, bool) or not isinstance(x, (int, float, Decimal)):
        raise ValueError(f"bound {x!r} is not a number")
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"bound {x!r} is not finite")
    try:
        return Decimal(repr(x)) if isinstance(x, float) else Decimal(x)
    except InvalidOperation:  # pragma: no cover
        raise ValueError(f"bound {x!r} is not a number") from None


# =============================================================================================
# JSON schema -> regex
# =============================================================================================

# JSON-safe (no '"', '\\' or control characters) regexes for string formats that outlines-core
# lacks or renders unsafely (its email/uri regexes can emit raw quotes inside the JSON string).
_IPV4_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_HOST_LABEL = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?"
FORMAT_REGEXES: dict[str, str] = {
    "email": r"[a-zA-Z0-9][a-zA-Z0-9._%+-]{0,39}@" + _HOST_LABEL + r"(\." + _HOST_LABEL
    + r"){0,3}\.[a-zA-Z]{2,10}",
    "uri": r"(https?|ftp)://" + _HOST_LABEL + r"(\." + _HOST_LABEL + r"){0,4}(:[1-9][0-9]{0,4})?"
    r"(/[a-zA-Z0-9._~%!$&'()*+,;=:@-]{0,40}){0,6}(\?[a-zA-Z0-9._~%!$&'()*+,;=:@/?-]{0,60})?",
    "ipv4": rf"{_IPV4_OCTET}(\.{_IPV4_OCTET}){{3}}",
    "hostname": _HOST_LABEL + r"(\." + _HOST_LABEL + r"){0,4}",
}
_YEAR = r"[1-9][0-9]{3}"
_LEAP_YEAR = r"([1-9][0-9](0[48]|[2468][048]|[13579][26])|([2468][048]|[13579][26])00)"
# Calendar-valid dates only (outlines-core's regex allows 2023-02-31, which validators reject).
FORMAT_REGEXES["date"] = (
    rf"({_YEAR}-(0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])"
    rf"|{_YEAR}-(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    rf"|{_YEAR}-02-(0[1-9]|1[0-9]|2[0-8])"
    rf"|{_LEAP_YEAR}-02-29)"
)
# RFC 3339 full-time: the UTC offset is required.
FORMAT_REGEXES["time"] = (
    r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
)
FORMAT_REGEXES["date-time"] = FORMAT_REGEXES["date"] + "T" + FORMAT_REGEXES["time"]
FORMAT_REGEXES["url"] = FORMAT_REGEXES["uri"]
_OUTLINES_FORMATS = {"uuid"}
_PLACEHOLDER = "FLASHMOEPLACEHOLDER{}Q"
_SCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_DICT_KEYS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_SINGLE_KEYS = ("items", "additionalProperties", "not", "contains", "additionalItems")
_NUMERIC_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _check_schema_meta(schema: dict) -> None:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover
        return
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ValueError(f"malformed JSON schema at {where}: {exc.message}") from None


class _SchemaRewriter:
    """Checks a schema for problems outlines-core would silently get wrong, and replaces the
    sub-schemas we render ourselves (numeric ranges, formats) by placeholders."""

    def __init__(self, root: dict) -> None:
        self.subst: dict[str, str] = {}
        self.root = root

    def check_ref(self, ref: Any, path: str) -> None:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ValueError(
                f"unsupported JSON schema at {path}: only local $refs ('#/...') are supported, "
                f"got {ref!r}"
            )
        node: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"malformed JSON schema at {path}: unresolvable $ref {ref!r}")
            node = node[part]

    def placeholder(self, regex: str) -> dict:
        name = _PLACEHOLDER.format(len(self.subst))
        self.subst[name] = regex
        return {"const": name}

    def rewrite(self, node: Any, path: str) -> Any:
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            raise ValueError(f"malformed JSON schema at {path}: expected an object, got {node!r}")
        node = dict(node)
        for k in _SCHEMA_LIST_KEYS:
            if k in node:
                if not isinstance(node[k], list) or (k != "prefixItems" and not node[k]):
                    raise ValueError(f"malformed JSON schema at {path}/{k}: expected a list")
                node[k] = [self.rewrite(s, f"{path}/{k}/{i}") for i, s in enumerate(node[k])]
        for k in _SCHEMA_DICT_KEYS:
            if k in node:
                if not isinstance(node[k], dict):
                    raise ValueError(f"malformed JSON schema at {path}/{k}: expected an object")
                node[k] = {n: self.rewrite(s, f"{path}/{k}/{n}") for n, s in node[k].items()}
        for k in _SCHEMA_SINGLE_KEYS:
            if k in node and not isinstance(node[k], list):
                node[k] = self.rewrite(node[k], f"{path}/{k}")
        self._check(node, path)
        if "$ref" in node:
            self.check_ref(node["$ref"], path)
        if "enum" in node or "const" in node or "$ref" in node:
            return node
        types = node.get("type")
        if isinstance(types, list):
            if len(types) > 1 and (
                any(k in node for k in _NUMERIC_KEYS)
                or ("string" in types and node.get("format") in FORMAT_REGEXES)
            ):
                rest = {k: v for k, v in node.items() if k != "type"}
                return {"anyOf": [self.rewrite({**rest, "type": t}, path) for t in types]}
            if len(types) == 1:
                types = types[0]
        if types == "integer" and any(k in node for k in _NUMERIC_KEYS):
            lo, lo_incl, hi, hi_incl = _bounds(node, path)
            lo_i = None if lo is None else _ceil_int(lo, lo_incl)
            hi_i = None if hi is None else _floor_int(hi, hi_incl)
            if lo_i is not None and hi_i is not None and lo_i > hi_i:
                raise ValueError(f"malformed JSON schema at {path}: no integer within the bounds")
            return self.placeholder(integer_range_regex(lo_i, hi_i))
        if types == "number" and any(k in node for k in _NUMERIC_KEYS):
            lo, lo_incl, hi, hi_incl = _bounds(node, path)
            try:
                r = number_range_regex(lo, hi, lo_inclusive=lo_incl, hi_inclusive=hi_incl)
            except ValueError as exc:
                raise ValueError(f"malformed JSON schema at {path}: {exc}") from None
            return self.placeholder(r)
        if types == "string" and "format" in node and "pattern" not in node:
            fmt = node["format"]
            if fmt in FORMAT_REGEXES:
                return self.placeholder('"' + FORMAT_REGEXES[fmt] + '"')
            if fmt not in _OUTLINES_FORMATS:
                warnings.warn(
                    f"flashmoe: string format {fmt!r} at {path} is not enforced by constrained "
                    "decoding (any string is allowed)",
                    stacklevel=4,
                )
                node.pop("format")
        return node

    @staticmethod
    def _check(node: dict, path: str) -> None:
        props = node.get("properties")
        req = node.get("required")
        if req is not None:
            if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
                raise ValueError(f"malformed JSON schema at {path}/required: expected names")
            missing = [r for r in req if not isinstance(props, dict) or r not in props]
            if missing:
                raise ValueError(
                    f"malformed JSON schema at {path}: required propert"
                    f"{'y' if len(missing) == 1 else 'ies'} {missing} not defined in 'properties'"
                )
        for a, b in (("minItems", "maxItems"), ("minLength", "maxLength"),
                     ("minProperties", "maxProperties")):
            if a in node and b in node and node[a] > node[b]:
                raise ValueError(
                    f"malformed JSON schema at {path}: {a}={node[a]} > {b}={node[b]}"
                )
        if "pattern" in node:
            try:
                re.compile(node["pattern"])
            except re.error as exc:
                raise ValueError(
                    f"malformed JSON schema at {path}/pattern: invalid regex: {exc}"
                ) from None


def _bounds(node: dict, path: str) -> tuple[Any, bool, Any, bool]:
    lo, lo_incl, hi, hi_incl = node.get("minimum"), True, node.get("maximum"), True
    emin, emax = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if isinstance(emin, bool):  # draft 4
        lo_incl = not emin
    elif emin is not None and (lo is None or _to_decimal(emin) >= _to_decimal(lo)):
        lo, lo_incl = emin, False
    if isinstance(emax, bool):
        hi_incl = not emax
    elif emax is not None and (hi is None or _to_decimal(emax) <= _to_decimal(hi)):
        hi, hi_incl = emax, False
    try:
        dlo = None if lo is None else _to_decimal(lo)
        dhi = None if hi is None else _to_decimal(hi)
    except ValueError as exc:
        raise ValueError(f"malformed JSON schema at {path}: {exc}") from None
    if dlo is not None and dhi is not None and (dlo > dhi or (dlo == dhi and not (lo_incl and hi_incl))):
        raise ValueError(f"malformed JSON schema at {path}: minimum {lo} > maximum {hi}")
    return dlo, lo_incl, dhi, hi_incl


def _ceil_int(x: Decimal, incl: bool) -> int:
    i = int(x.to_integral_value(rounding="ROUND_CEILING"))
    return i + 1 if (not incl and i == x) else i


def _floor_int(x: Decimal, incl: bool) -> int:
    i = int(x.to_integral_value(rounding="ROUND_FLOOR"))
    return i - 1 if (not incl and i == x) else i


def _load_schema(schema: Any) -> dict:
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
    return schema


def schema_to_regex(
    schema: dict | str, whitespace_pattern: str | None = DEFAULT_WHITESPACE
) -> str:
    """Regex for the JSON documents valid under ``schema`` (as far as a regex can say).

    Raises :class:`ValueError` naming the problem for malformed or unsupported schemas.
    Supported beyond outlines-core: integer/number ``minimum``/``maximum``/``exclusive*``,
    formats ``email``, ``uri``, ``ipv4``, ``hostname``; ignored (warned): other unknown formats.
    Not enforced: ``multipleOf``, ``uniqueItems``, ``not``, ``if``/``then``; ``oneOf`` is treated
    as ``anyOf``.
    """
    schema = _load_schema(schema)
    _check_schema_meta(schema)
    rw = _SchemaRewriter(schema)
    rewritten = rw.rewrite(copy.deepcopy(schema), "#")
    try:
        regex = build_regex_from_schema(json.dumps(rewritten), whitespace_pattern)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        msg = str(exc).split("\n")[0]
        raise ValueError(f"unsupported or malformed JSON schema: {msg}") from None
    for name, sub in rw.subst.items():
        regex = regex.replace(f'"{name}"', f"({sub})")
        if name in regex:  # pragma: no cover - defensive
            raise ValueError("internal error while rendering the JSON schema")
    return regex
