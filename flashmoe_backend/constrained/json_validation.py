"""Validating generated JSON against its schema, with numbers read as the decimals they are.

The grammar enforces ``multipleOf`` and numeric bounds on the number the text denotes; float
arithmetic would call 0.7404 no multiple of 0.0001 and read 1.99999999999999999999 as 2, so the
engine would reject outputs its own grammar produced.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

import jsonschema

__all__ = ["exact_loads", "exact_validator", "exact_value"]



def _exact_number(text: str) -> Decimal | float:
    try:
        return Decimal(text)
    except InvalidOperation:  # an exponent beyond Decimal's range: a float's inf or 0
        return float(text)


def exact_loads(text: str) -> Any:
    """JSON text as a value with its non-integer numbers as exact ``Decimal``s."""
    return json.loads(text, parse_float=_exact_number)


def exact_value(value: Any) -> Any:
    """A JSON value with its non-integer numbers as exact ``Decimal``s (floats read as the
    shortest decimal that round-trips, which is what their JSON text says)."""
    return exact_loads(json.dumps(value))


def _is_integer(checker: Any, instance: Any) -> bool:
    if isinstance(instance, Decimal):  # 1.0 and 1e308 are integers in JSON Schema
        return instance.is_finite() and instance == instance.to_integral_value()
    return jsonschema.Draft202012Validator.TYPE_CHECKER.is_type(instance, "integer")


def _multiple_of(validator: Any, divisor: Any, instance: Any, schema: dict) -> Iterator[Any]:
    if validator.is_type(instance, "number") and (
            Fraction(instance) / Fraction(divisor)).denominator != 1:
        yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {divisor}")


def exact_validator(schema: dict, *, formats: bool = False) -> Any:
    """A ``jsonschema`` validator for ``schema`` that reads numbers as the decimals the text
    denotes (validate :func:`exact_value` instances): the grammar enforces ``multipleOf`` and
    bounds exactly, and float arithmetic would call 0.7404 no multiple of 0.0001. ``formats``
    asserts ``format`` too."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    exact_cls = jsonschema.validators.extend(
        cls, validators={"multipleOf": _multiple_of},
        type_checker=cls.TYPE_CHECKER.redefine("integer", _is_integer))
    checker = cls.FORMAT_CHECKER if formats else None
    return exact_cls(exact_value(schema), format_checker=checker)
