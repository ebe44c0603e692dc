"""Constrained decoding on llguidance, portable to every MLX backend (CPU, CUDA, Metal).

What this module does, in the order a request meets it:

1. :meth:`Constraint.from_response_format` turns what the user asked for (a Pydantic model, a
   JSON-schema dict, an OpenAI ``response_format`` dict, an ``outlines.types`` Regex / CFG /
   JsonSchema / Choice, a list of choices, ``Literal``/``Enum`` and the other Python types
   outlines understands, or a Lark grammar) into one Lark grammar; JSON schemas are embedded as
   ``%json{...}`` (``json_schema.py``).
2. The grammar is compiled once against the tokenizer's llguidance tokenizer (milliseconds, even
   for a 248k-token vocabulary and 20 tools); a keyword the engine cannot enforce is an error
   that names it, never a silently looser grammar.
3. :meth:`Constraint.logits_processor` hands out a fresh mlx-lm logits processor
   (``processor(tokens, logits) -> logits``) per generation: a copy of the compiled matcher,
   advanced by the generated tokens; it writes llguidance's bitmask and applies it with MLX ops,
   and in the last tokens before ``max_tokens`` it steers towards a complete structure.
4. :meth:`Constraint.parse` turns the generated text into the Pydantic instance / dict / str, and
   raises :class:`IncompleteOutputError` when generation stopped mid-structure.

:func:`~flashmoe_backend.constrained.outlines_model.from_mlxlm` gives an ``outlines`` model object driven by
this machinery (``outlines_model.py``).
"""

from __future__ import annotations

import enum
import json
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flashmoe_backend.constrained.json_schema import (
    DEFAULT_WHITESPACE,
    UnsupportedSchemaError,
    check_schema,
    json_grammar,
    load_schema,
    schema_error,
)
from flashmoe_backend.constrained.json_validation import exact_loads, exact_validator
from flashmoe_backend.constrained.lark import THINK_BLOCK_RULES, grammar_document, lark_literal, lark_regex
from flashmoe_backend.constrained.processor import (
    ConstrainedLogitsProcessor,
    IncompleteOutputError,
    StructuredOutputError,
)
from flashmoe_backend.constrained.unique_items import enforced_while_decoding, response_guard
from flashmoe_backend.constrained.vocabulary import Vocabulary
from flashmoe_backend.errors import ResponseFormatError
from flashmoe_backend.validation import a_type

__all__ = [
    "Constraint",
    "ConstrainedLogitsProcessor",
    "IncompleteOutputError",
    "StructuredOutputError",
    "check_response_format",
]


# =============================================================================================
# response_format normalisation
# =============================================================================================


@dataclass
class _Spec:
    kind: str  # "json" | "regex" | "choice" | "type" | "cfg"
    lark: str  # a Lark grammar with a ``start`` rule
    schema: dict | None = None
    parser: Callable[[str], Any] | None = None
    description: str = ""
    unique_items: bool = False  # uniqueItems left to the guard (unique_items.py)


def _is_pydantic_model(obj: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _json_parser(schema: dict, model: Any = None) -> Callable[[str], Any]:
    validator = exact_validator(schema)

    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StructuredOutputError(f"output is not valid JSON: {exc}") from None
        error = next(iter(validator.iter_errors(exact_loads(text))), None)
        if error is not None:
            raise StructuredOutputError(f"output does not validate: {error.message}")
        if model is None:
            return value
        try:
            return model.model_validate_json(text)
        except ValueError as exc:
            raise StructuredOutputError(f"output does not validate: {exc}") from exc

    return parse


def _json_spec(schema: Any, whitespace: str | None, model: Any = None) -> _Spec:
    schema = load_schema(schema)
    check_schema(schema)
    unique = enforced_while_decoding(schema)
    lark = "start: " + json_grammar(schema, whitespace=whitespace, lenient=unique)
    return _Spec("json", lark, schema, _json_parser(schema, model),
                 getattr(model, "__name__", None) or schema.get("title", "JSON"), unique)


def _choice_spec(values: Sequence[Any], mapping: dict[str, Any] | None = None) -> _Spec:
    if not values:
        raise ValueError("a choice needs at least one option")
    strs = []
    for v in values:
        if isinstance(v, enum.Enum):
            v = v.value
        if isinstance(v, bool) or v is None or not isinstance(v, (str, int, float)):
            raise ValueError(f"choice options must be strings or numbers, got {v!r}")
        strs.append(str(v))
    mapping = mapping or {}

    def parse(text: str) -> Any:
        if text not in strs:
            raise StructuredOutputError(f"output {text!r} is not one of the choices {strs}")
        return mapping.get(text, text)

    lark = "start: " + " | ".join(lark_literal(s) for s in dict.fromkeys(strs))
    return _Spec("choice", lark, parser=parse, description=f"one of {strs}")


def _regex_spec(pattern: Any) -> _Spec:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a regex response format needs a non-empty pattern string")
    return _Spec("regex", "start: " + lark_regex(pattern), description=f"regex {pattern!r}")


def _cfg_spec(grammar: Any) -> _Spec:
    if not isinstance(grammar, str) or not grammar.strip():
        raise ValueError("a grammar response format needs the Lark grammar as a non-empty string")
    return _Spec("cfg", grammar, description="grammar")


def _normalize(rf: Any, whitespace: str | None) -> _Spec:
    """Turn any supported response format into a Lark grammar plus a parser."""
    if rf is None:
        raise ValueError("no response format given")
    if _is_pydantic_model(rf):
        return _json_spec(rf.model_json_schema(), whitespace, rf)
    if isinstance(rf, bool):
        raise ValueError("a boolean JSON schema does not describe a structure to generate")
    if isinstance(rf, dict):
        return _dict_spec(rf, whitespace)
    if isinstance(rf, (list, tuple)):
        return _choice_spec(list(rf))
    if isinstance(rf, enum.EnumMeta):
        members = list(rf)
        return _choice_spec([m.value for m in members], {str(m.value): m for m in members})
    from outlines.types import dsl

    if isinstance(rf, dsl.Regex):
        return _regex_spec(rf.pattern)
    if isinstance(rf, dsl.CFG):
        return _cfg_spec(rf.definition)
    if isinstance(rf, dsl.JsonSchema):
        ws = rf.whitespace_pattern if rf.whitespace_pattern is not None else whitespace
        return _json_spec(json.loads(rf.schema), ws)
    if isinstance(rf, dsl.Choice):
        return _choice_spec(list(rf.items))
    if typing.get_origin(rf) is typing.Literal:
        args = typing.get_args(rf)
        return _choice_spec(list(args), {str(a): a for a in args})
    if isinstance(rf, str):
        raise ValueError(
            "a plain string is ambiguous as a response format: pass a JSON schema dict, "
            "{'type': 'regex', 'pattern': ...}, {'type': 'grammar', 'grammar': ...} or "
            "outlines.types.Regex(...)"
        )
    if not (isinstance(rf, type) or typing.get_origin(rf) is not None):
        raise ValueError(
            f"unsupported response format {rf!r} ({a_type(rf)} value): pass a Pydantic "
            "model or other Python type, a JSON schema dict, a list of choices, "
            "{'type': 'regex', 'pattern': ...} or {'type': 'grammar', 'grammar': ...}")
    return _python_type_spec(rf, whitespace, dsl)


def _dict_spec(rf: dict, whitespace: str | None) -> _Spec:
    t = rf.get("type")
    if t == "regex" and "pattern" in rf:
        return _regex_spec(rf["pattern"])
    if t == "json_schema" and isinstance(rf.get("json_schema"), dict):  # OpenAI style
        schema = rf["json_schema"].get("schema")
        if schema is None:
            raise ValueError("response_format json_schema has no 'schema'")
        return _json_spec(schema, whitespace)
    if t == "json_object" and len(rf) == 1:
        return _json_spec({"type": "object"}, whitespace)
    if t in ("grammar", "cfg", "lark"):
        return _cfg_spec(rf.get("grammar", rf.get("definition")))
    if t == "choice" and isinstance(rf.get("choices"), (list, tuple)):
        return _choice_spec(list(rf["choices"]))
    return _json_spec(rf, whitespace)


def _python_type_spec(rf: Any, whitespace: str | None, dsl: Any) -> _Spec:
    try:
        term = dsl.python_types_to_terms(rf)
    except (TypeError, RecursionError):
        raise ValueError(f"unsupported response format {rf!r}: outlines cannot turn this type into "
                         "a grammar") from None
    if isinstance(term, dsl.CFG):
        return _cfg_spec(term.definition)
    if isinstance(term, dsl.JsonSchema):
        from pydantic import TypeAdapter

        spec = _json_spec(json.loads(term.schema), whitespace)
        adapter = TypeAdapter(rf)

        def parse(text: str) -> Any:
            try:
                return adapter.validate_json(text)
            except ValueError as exc:
                raise StructuredOutputError(f"output does not validate: {exc}") from exc

        spec.parser = parse
        return spec
    spec = _regex_spec(dsl.to_regex(term))
    spec.kind, spec.parser, spec.description = "type", _python_type_parser(rf), repr(rf)
    return spec


def _python_type_parser(ptype: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if ptype is bool:
            return text == "True"
        if ptype in (int, float):
            return ptype(text)
        return text

    return parse


class UnsupportedResponseFormatError(ResponseFormatError, UnsupportedSchemaError):
    """A response format whose schema has a keyword the grammar cannot enforce: both the
    engine's error type and the schema module's (with its ``keywords``)."""


def check_response_format(response_format: Any, whitespace_pattern: str | None = DEFAULT_WHITESPACE) -> None:
    """Refuse a bad response format now, without a tokenizer: raises
    :class:`~flashmoe_backend.errors.ResponseFormatError` (a ``ValueError``) with the message
    :meth:`Constraint.from_response_format` would give."""
    from llguidance import LLMatcher

    try:
        spec = _normalize(response_format, whitespace_pattern)
        failed, messages = LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_lark(spec.lark))
        if failed:
            raise _grammar_error(spec.schema, spec.description, messages[0])
    except ResponseFormatError:
        raise
    except UnsupportedSchemaError as e:
        raise UnsupportedResponseFormatError(str(e), e.keywords) from e
    except ValueError as e:
        raise ResponseFormatError(str(e)) from e


def _grammar_error(schema: dict | None, description: str, message: str) -> ValueError:
    if schema is not None:
        return schema_error(schema, message)
    return ValueError(f"cannot compile the {description} grammar: {message}")


# =============================================================================================
# Constraint
# =============================================================================================


class Constraint:
    """A compiled output constraint: its grammar, a processor factory and a parser.

    Build with :meth:`from_response_format` (or from a Lark grammar directly); each
    compiles the grammar eagerly, so every problem with the format surfaces before generation.
    """

    def __init__(
        self,
        grammar: str,
        tokenizer: Any,
        *,
        kind: str = "cfg",
        schema: dict | None = None,
        parser: Callable[[str], Any] | None = None,
        description: str = "",
        guard: Any = None,
    ):
        """``grammar``: a Lark grammar, or a document from :func:`grammar_document`;
        ``guard``: see :class:`ConstrainedLogitsProcessor`."""
        from llguidance import LLMatcher

        self.grammar = grammar
        self.kind = kind
        self.schema = schema
        self.description = description or kind
        self.vocabulary = Vocabulary.from_tokenizer(tokenizer)
        if not grammar.lstrip().startswith("{"):
            grammar = LLMatcher.grammar_from_lark(grammar)
        # Compiled once, here; each generation gets a copy. (A matcher never raises: a bad
        # grammar leaves it in an error state that says why.)
        self._matcher = LLMatcher(self.vocabulary.llg, grammar, log_level=0)
        if self._matcher.is_error():
            raise _grammar_error(schema, self.description, self._matcher.get_error())
        #: warnings of a grammar that compiled, e.g. keywords a lenient schema left unenforced.
        self.warnings = self._matcher.get_grammar_warnings()
        self._parser = parser
        self.guard = guard

    @classmethod
    def from_response_format(
        cls,
        response_format: Any,
        tokenizer: Any,
        *,
        whitespace_pattern: str | None = DEFAULT_WHITESPACE,
        reasoning_prefix: bool = False,
    ) -> Constraint:
        """Accepts a Pydantic model class, a JSON-schema dict (or JSON string of one), an OpenAI
        ``{"type": "json_schema", "json_schema": {"schema": ...}}`` or ``{"type": "json_object"}``,
        ``{"type": "regex", "pattern": ...}`` or ``outlines.types.Regex``,
        ``{"type": "grammar", "grammar": LARK}`` or ``outlines.types.CFG`` (Lark syntax), a
        list/tuple of string choices, ``Literal[...]``, an ``Enum`` class, and other Python types
        outlines knows (``int``, ``list[int]``, dataclasses, TypedDicts).

        ``reasoning_prefix``: the text may start with a reasoning block ending in ``</think>``
        (for prompts that end inside ``<think>``); :meth:`parse` expects it stripped.
        Malformed formats raise :class:`ValueError`; a JSON-schema keyword the engine cannot
        enforce raises :class:`~flashmoe_backend.json_schema.UnsupportedSchemaError` naming it.
        """
        if isinstance(response_format, Constraint):
            return response_format
        spec = _normalize(response_format, whitespace_pattern)
        grammar = spec.lark
        if reasoning_prefix:
            grammar = grammar_document(f'start: think_block "\\n"? @format\n{THINK_BLOCK_RULES}',
                                       format=spec.lark)
        guard = response_guard(spec.schema, reasoning_prefix) if spec.unique_items else None
        return cls(grammar, tokenizer, kind=spec.kind, schema=spec.schema,
                   parser=spec.parser, description=spec.description, guard=guard)

    def logits_processor(self, max_tokens: int | None = None) -> ConstrainedLogitsProcessor:
        """A fresh, stateful mlx-lm logits processor for one generation; with ``max_tokens`` it
        steers the last tokens so the structure closes in time."""
        return ConstrainedLogitsProcessor(self._matcher.deep_copy(), self.vocabulary,
                                          max_tokens=max_tokens, guard=self.guard)

    # -- checking and parsing -------------------------------------------------------------------

    def status(self, text: str) -> str:
        """``"complete"``, ``"incomplete"`` (a proper prefix of a match) or ``"invalid"``."""
        proc = self.logits_processor()
        if not proc.advance_text(text):
            return "invalid"
        return "complete" if proc.is_complete else "incomplete"

    def parse(self, text: str) -> Any:
        """The generated text as the requested type.

        JSON formats give the Pydantic instance (for a model class) or the decoded value
        (validated with ``jsonschema``); regexes and grammars give the string; choices the chosen
        option. Raises :class:`IncompleteOutputError` when the text stops mid-structure and
        :class:`StructuredOutputError` when it does not match.
        """
        st = self.status(text)
        if st == "incomplete":
            raise IncompleteOutputError(
                f"output stops before the end of the {self.description} structure "
                f"(max_tokens reached?): {_clip(text)}"
            )
        if st == "invalid":
            raise StructuredOutputError(
                f"output does not match the {self.description} constraint: {_clip(text)}"
            )
        if self._parser is not None:
            return self._parser(text)
        return text

    def __repr__(self) -> str:
        return f"Constraint({self.description!r}, grammar={_clip(self.grammar, 80)!r})"


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


