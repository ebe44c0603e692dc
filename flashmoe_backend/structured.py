"""Constrained decoding on outlines-core, portable to every MLX backend (CPU, CUDA, Metal).

What this module does, in the order a request meets it:

1. :func:`response_format_to_regex` / :meth:`Constraint.from_response_format` turn what the user
   asked for (a Pydantic model, a JSON-schema dict, an OpenAI ``response_format`` dict, an
   ``outlines.types.Regex``, a list of choices, ``Literal``/``Enum`` and the other Python types
   outlines understands) into one regular expression; JSON schemas go through
   :func:`~flashmoe_backend.json_schema.schema_to_regex`.
2. The regex is compiled against the tokenizer's vocabulary
   (:func:`~flashmoe_backend.vocabulary.compile_index`, cached in memory and on disk).
3. :meth:`Constraint.logits_processor` hands out a fresh stateful mlx-lm logits processor
   (``processor(tokens, logits) -> logits``) per generation; it walks an ``outlines_core.Guide``
   over the generated tokens and masks the disallowed ones to ``-inf``.
4. :meth:`Constraint.parse` turns the generated text into the Pydantic instance / dict / str, and
   raises :class:`IncompleteOutputError` when generation stopped mid-structure.

:func:`~flashmoe_backend.outlines_model.from_mlxlm` gives an ``outlines`` model object that uses
this machinery (``outlines_model.py``).
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from outlines_core import Guide, Index

from .json_schema import DEFAULT_WHITESPACE, _load_schema, regex_escape, schema_to_regex
from .vocabulary import Vocabulary, compile_index

__all__ = [
    "Constraint",
    "ConstrainedLogitsProcessor",
    "IncompleteOutputError",
    "StructuredOutputError",
    "response_format_to_regex",
]


class StructuredOutputError(ValueError):
    """The generated text does not satisfy the requested structure."""


class IncompleteOutputError(StructuredOutputError):
    """The generated text is a valid prefix of the structure but stops before its end
    (typically: ``max_tokens`` was reached mid-structure)."""


# =============================================================================================
# response_format normalisation
# =============================================================================================


@dataclass
class _Spec:
    kind: str  # "json" | "regex" | "choice" | "type"
    regex: str
    schema: dict | None = None
    parser: Callable[[str], Any] | None = None
    description: str = ""


def _is_pydantic_model(obj: Any) -> bool:
    try:
        from pydantic import BaseModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _cfg_error() -> NotImplementedError:
    return NotImplementedError(
        "context-free grammars are not supported by flashmoe's constrained decoding: outlines "
        "1.3 compiles them only with llguidance/xgrammar, whose mask kernels are Metal-only or "
        "not installed here. Express the output as a JSON schema (Pydantic model or dict) or a "
        "regular expression (outlines.types.Regex / {'type': 'regex', 'pattern': ...}) instead."
    )


def _json_parser(schema: dict, model: Any = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if model is not None:
            try:
                return model.model_validate_json(text)
            except ValueError as exc:
                raise StructuredOutputError(f"output does not validate: {exc}") from exc
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StructuredOutputError(f"output is not valid JSON: {exc}") from None
        try:
            import jsonschema
        except ImportError:  # pragma: no cover
            return value
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            raise StructuredOutputError(f"output does not validate: {exc.message}") from None
        return value

    return parse


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

    # Longest first: with outlines-core's leftmost-first semantics "(ab|abc)" never gives "abc".
    ordered = sorted(dict.fromkeys(strs), key=len, reverse=True)
    return _Spec("choice", "(" + "|".join(regex_escape(s) for s in ordered) + ")", parser=parse,
                 description=f"one of {strs}")


def _normalize(response_format: Any, whitespace_pattern: str | None) -> _Spec:
    """Turn any supported response format into a regex plus a parser."""
    rf = response_format
    if rf is None:
        raise ValueError("no response format given")
    if _is_pydantic_model(rf):
        schema = rf.model_json_schema()
        return _Spec("json", schema_to_regex(schema, whitespace_pattern), schema,
                     _json_parser(schema, rf), rf.__name__)
    if isinstance(rf, dict):
        t = rf.get("type")
        if t == "regex" and "pattern" in rf:
            return _regex_spec(rf["pattern"])
        if t == "json_schema" and isinstance(rf.get("json_schema"), dict):  # OpenAI style
            inner = rf["json_schema"]
            schema = inner.get("schema")
            if schema is None:
                raise ValueError("response_format json_schema has no 'schema'")
            return _json_spec(schema, whitespace_pattern)
        if t == "json_object" and len(rf) == 1:
            return _json_spec({"type": "object"}, whitespace_pattern)
        if t in ("grammar", "cfg", "lark", "ebnf"):
            raise _cfg_error()
        if t == "choice" and isinstance(rf.get("choices"), (list, tuple)):
            return _choice_spec(list(rf["choices"]))
        return _json_spec(rf, whitespace_pattern)
    if isinstance(rf, (list, tuple)):
        return _choice_spec(list(rf))
    if isinstance(rf, enum.EnumMeta):
        members = list(rf)
        return _choice_spec([m.value for m in members], {str(m.value): m for m in members})
    try:
        from outlines.types import dsl
    except ImportError:  # pragma: no cover
        dsl = None
    if dsl is not None:
        if isinstance(rf, dsl.Regex):
            return _regex_spec(rf.pattern)
        if isinstance(rf, dsl.CFG):
            raise _cfg_error()
        if isinstance(rf, dsl.JsonSchema):
            ws = rf.whitespace_pattern if rf.whitespace_pattern is not None else whitespace_pattern
            return _json_spec(json.loads(rf.schema), ws)
        if isinstance(rf, dsl.Choice):
            return _choice_spec(list(rf.items))
    import typing

    if typing.get_origin(rf) is typing.Literal:
        args = typing.get_args(rf)
        return _choice_spec(list(args), {str(a): a for a in args})
    if isinstance(rf, str):
        raise ValueError(
            "a plain string is ambiguous as a response format: pass a JSON schema dict, "
            "{'type': 'regex', 'pattern': ...} or outlines.types.Regex(...)"
        )
    if dsl is not None:
        try:
            term = dsl.python_types_to_terms(rf)
        except (TypeError, RecursionError) as exc:
            raise ValueError(f"unsupported response format {rf!r}: {exc}") from None
        if isinstance(term, dsl.CFG):
            raise _cfg_error()
        if isinstance(term, dsl.JsonSchema):
            schema = json.loads(term.schema)
            spec = _json_spec(schema, whitespace_pattern)
            try:
                from pydantic import TypeAdapter

                adapter = TypeAdapter(rf)

                def parse(text: str) -> Any:
                    try:
                        return adapter.validate_json(text)
                    except ValueError as exc:
                        raise StructuredOutputError(f"output does not validate: {exc}") from exc

                spec.parser = parse
            except Exception:  # pragma: no cover
                pass
            return spec
        regex = dsl.to_regex(term)
        return _Spec("type", regex, parser=_python_type_parser(rf), description=repr(rf))
    raise ValueError(f"unsupported response format {rf!r}")  # pragma: no cover


def _regex_spec(pattern: Any) -> _Spec:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a regex response format needs a non-empty pattern string")
    return _Spec("regex", pattern, description=f"regex {pattern!r}")


def _json_spec(schema: Any, whitespace_pattern: str | None) -> _Spec:
    schema = _load_schema(schema)
    return _Spec("json", schema_to_regex(schema, whitespace_pattern), schema,
                 _json_parser(schema), schema.get("title", "JSON"))


def _python_type_parser(ptype: Any) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if ptype is bool:
            return text == "True"
        if ptype in (int, float):
            return ptype(text)
        return text

    return parse


def response_format_to_regex(
    response_format: Any, whitespace_pattern: str | None = DEFAULT_WHITESPACE
) -> str:
    """The regex a response format stands for (see :meth:`Constraint.from_response_format`)."""
    return _normalize(response_format, whitespace_pattern).regex


# =============================================================================================
# Constraint and its logits processor
# =============================================================================================


class Constraint:
    """A compiled output constraint: the regex, its index, a processor factory and a parser.

    Build with :meth:`from_response_format` (or :meth:`from_regex`); both compile the index
    eagerly, so every problem with the format surfaces before generation starts.
    """

    def __init__(
        self,
        regex: str,
        tokenizer: Any,
        *,
        kind: str = "regex",
        schema: dict | None = None,
        parser: Callable[[str], Any] | None = None,
        description: str = "",
        index: Index | None = None,
    ):
        self.regex = regex
        self.kind = kind
        self.schema = schema
        self.description = description or kind
        self.vocabulary = Vocabulary.from_tokenizer(tokenizer)
        self.index = index if index is not None else compile_index(regex, self.vocabulary)
        self._parser = parser

    @classmethod
    def from_response_format(
        cls,
        response_format: Any,
        tokenizer: Any,
        *,
        whitespace_pattern: str | None = DEFAULT_WHITESPACE,
    ) -> Constraint:
        """Accepts a Pydantic model class, a JSON-schema dict (or JSON string of one), an OpenAI
        ``{"type": "json_schema", "json_schema": {"schema": ...}}`` or ``{"type": "json_object"}``,
        ``{"type": "regex", "pattern": ...}`` or ``outlines.types.Regex``, a list/tuple of string
        choices, ``Literal[...]``, an ``Enum`` class, and other Python types outlines knows
        (``int``, ``list[int]``, dataclasses, TypedDicts). Context-free grammars raise
        :class:`NotImplementedError`; malformed schemas :class:`ValueError`."""
        if isinstance(response_format, Constraint):
            return response_format
        spec = _normalize(response_format, whitespace_pattern)
        return cls(spec.regex, tokenizer, kind=spec.kind, schema=spec.schema,
                   parser=spec.parser, description=spec.description)

    @classmethod
    def from_regex(cls, regex: str, tokenizer: Any) -> Constraint:
        return cls(regex, tokenizer, kind="regex")

    def logits_processor(self) -> ConstrainedLogitsProcessor:
        """A fresh, stateful mlx-lm logits processor for one generation."""
        return ConstrainedLogitsProcessor(self.index, self.vocabulary)

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
        (validated with ``jsonschema``); regexes give the string; choices the chosen option.
        Raises :class:`IncompleteOutputError` when the text stops mid-structure and
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
        return f"Constraint({self.description!r}, regex={_clip(self.regex, 80)!r})"


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class ConstrainedLogitsProcessor:
    """mlx-lm logits processor that walks an outlines-core ``Guide`` and masks the logits.

    Called as ``processor(tokens, logits)`` with ``tokens`` all ids so far (the first call sees
    only the prompt, which is skipped) and ``logits`` of shape ``[1, V]``; ``V`` may exceed the
    tokenizer's vocabulary (the extra ids are masked). Each call advances the guide by the tokens
    added since the previous call, then sets every token the guide does not allow to ``-inf``.
    Once the structure is complete and cannot continue, only the EOS token(s) are allowed.

    The mask is applied portably (no Metal kernel): the guide writes its bitmask into a numpy
    buffer (in Rust), which is expanded to a boolean mask -- in numpy when MLX runs on the CPU,
    on the device with MLX ops from the 32x smaller bitmask otherwise -- and applied with
    ``mx.where`` (so NaN/inf logits of disallowed tokens cannot leak through).

    ``is_complete`` / :meth:`is_finished`: the text generated so far is a full match, so a
    generation that stopped at ``max_tokens`` without this is incomplete.
    """

    def __init__(
        self,
        index: Index,
        vocabulary: Vocabulary,
        *,
        sentinel: bool = True,
        max_rollback: int = 32,
    ):
        """``index`` from :func:`~flashmoe_backend.vocabulary.compile_index` (``sentinel=True``),
        or any outlines-core index over the same token ids (``sentinel=False``: completeness is the
        index's final state)."""
        self.index = index
        self.vocabulary = vocabulary
        self._sentinel = vocabulary.sentinel_id if sentinel else None
        # With the sentinel the final states are the few after it: cheap to list.
        self._finals = frozenset(index.get_final_states()) if sentinel else frozenset()
        self.guide = Guide(index, max_rollback)
        self._n_seen: int | None = None
        self._generated: list[int] = []
        self.eos_generated = False
        self._words: np.ndarray | None = None
        self._width = 0
        self._device_path: bool | None = None
        self._eos = vocabulary.eos_token_ids
        self._primary_eos = vocabulary.eos_token_id
        self._extra_eos = [i for i in self._eos if i != self._primary_eos]

    # -- state ----------------------------------------------------------------------------------

    @property
    def is_complete(self) -> bool:
        """True when the text generated so far is a complete match of the constraint."""
        if self.eos_generated:
            return True
        if self._sentinel is None:
            return bool(self.guide.is_finished())
        # The sentinel character is also valid *inside* JSON strings: complete means the
        # sentinel leads to a final state, i.e. it ends the whole regex.
        nxt = self.index.get_next_state(self.guide.get_state(), self._sentinel)
        return nxt is not None and nxt in self._finals

    def is_finished(self) -> bool:
        """Same as :attr:`is_complete` (outlines-core's name)."""
        return self.is_complete

    @property
    def generated_ids(self) -> list[int]:
        return list(self._generated)

    def reset(self) -> None:
        self.guide.reset()
        self._n_seen = None
        self._generated = []
        self.eos_generated = False

    def allowed_token_ids(self) -> list[int]:
        if self.eos_generated:
            return list(self._eos)
        ids = [i for i in self.guide.get_tokens() if i != self._sentinel and i not in self._eos]
        if self.is_complete:
            ids += self._eos
        return ids

    # -- advancing ------------------------------------------------------------------------------

    def advance(self, token_id: int) -> None:
        """Advance by one generated token (raises :class:`StructuredOutputError` if disallowed)."""
        token_id = int(token_id)
        if token_id in self._eos:
            if not self.is_complete:
                raise StructuredOutputError(
                    f"EOS token {token_id} generated before the structure was complete"
                )
            self.eos_generated = True
            self._generated.append(token_id)
            return
        if self.eos_generated:
            raise StructuredOutputError("token generated after EOS")
        try:
            self.guide.advance(token_id, return_tokens=False)
        except ValueError:
            raise StructuredOutputError(
                f"token {token_id} ({self.vocabulary.token_bytes[token_id]!r}) is not allowed "
                "by the constraint here: was the mask bypassed?"
                if 0 <= token_id < self.vocabulary.size
                else f"token {token_id} is outside the vocabulary"
            ) from None
        self._generated.append(token_id)

    def consume(self, token_ids: Iterable[int]) -> None:
        for t in token_ids:
            self.advance(t)

    def advance_text(self, text: str | bytes) -> bool:
        """Walk the guide over ``text`` (byte by byte through single-byte tokens; falls back to
        whole tokens from the grammar's vocabulary). Returns False if the text leaves the
        language (the guide is then left where the text diverged)."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        bt = self.vocabulary.byte_token_ids
        if all(b in bt for b in data):
            for b in data:
                try:
                    self.guide.advance(bt[b], return_tokens=False)
                except ValueError:
                    return False
            return True
        return self._advance_text_greedy(data)  # pragma: no cover - non byte-complete vocabs

    def _advance_text_greedy(self, data: bytes) -> bool:  # pragma: no cover
        # Longest allowed token that is a prefix of the remaining text, with backtracking
        # limited to one step: good enough for vocabularies without all 256 byte tokens.
        tb = self.vocabulary.token_bytes
        pos = 0
        while pos < len(data):
            best = None
            for tid in self.guide.get_tokens():
                b = tb[tid] if tid < len(tb) else b""
                if b and data.startswith(b, pos) and (best is None or len(b) > len(tb[best])):
                    best = tid
            if best is None:
                return False
            self.guide.advance(best, return_tokens=False)
            pos += len(tb[best])
        return True

    def _sync(self, tokens: mx.array) -> None:
        if tokens.ndim == 2:
            tokens = tokens.reshape(-1)
        n = int(tokens.shape[0])
        if self._n_seen is None:
            self._n_seen = n  # the prompt (or whatever came before the first decode step)
            return
        if n < self._n_seen:  # speculative decoding rejected tokens: roll back
            k = self._n_seen - n
            if k > len(self._generated) or k > self.guide.get_allowed_rollback():
                raise StructuredOutputError(f"cannot roll the constraint back by {k} tokens")
            if self.eos_generated:
                self.eos_generated = False
                self._generated.pop()
                k -= 1
            if k:
                self.guide.rollback_state(k)
                del self._generated[-k:]
            self._n_seen = n
            return
        if n > self._n_seen:
            new = _read_new_tokens(tokens, self._n_seen)
            self._n_seen = n
            self.consume(new)

    # -- masking --------------------------------------------------------------------------------

    def _fill_words(self, width: int) -> np.ndarray:
        nwords = (max(width, self.vocabulary.size + 1) + 31) // 32
        if self._words is None or self._words.shape[0] != nwords:
            self._words = np.zeros(nwords, dtype=np.int32)
        words = self._words
        if self.eos_generated:
            words[:] = 0
            complete = True
        else:
            self.guide.write_mask_into(words.ctypes.data, words.size, 4)
            s = self._sentinel
            if s is not None:
                complete = bool((words[s >> 5] >> (s & 31)) & 1) and self.is_complete
                self._clear_bit(words, s)
            else:
                p = self._primary_eos
                complete = bool((words[p >> 5] >> (p & 31)) & 1)
        if complete or not words.any():  # (an empty mask is a dead end: let the model stop)
            for e in self._eos:
                self._set_bit(words, e)
        return words

    @staticmethod
    def _set_bit(words: np.ndarray, tid: int) -> None:
        if 0 <= tid < words.size * 32:
            words[tid >> 5] |= np.uint32(1 << (tid & 31)).view(np.int32)

    @staticmethod
    def _clear_bit(words: np.ndarray, tid: int) -> None:
        if 0 <= tid < words.size * 32:
            words[tid >> 5] &= np.uint32(~(1 << (tid & 31)) & 0xFFFFFFFF).view(np.int32)

    def allowed_mask(self, width: int) -> mx.array:
        """Boolean ``[width]`` array of the tokens allowed in the current state."""
        words = self._fill_words(width)
        if self._device_path is None:
            self._device_path = mx.default_device() != mx.cpu
        if self._device_path:  # ship the 32x smaller bitmask, expand it on the device
            return _expand_bits(mx.array(words), width)
        bits = np.unpackbits(words.view(np.uint8), count=width, bitorder="little")
        return mx.array(bits.view(np.bool_))

    def bias(self, width: int, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The current mask as an additive bias: ``0`` allowed, ``-inf`` not (shape
        ``[width]``)."""
        zero = mx.array(0, dtype=dtype)
        return mx.where(self.allowed_mask(width), zero, mx.array(-math.inf, dtype=dtype))

    def mask_logits(self, logits: mx.array) -> mx.array:
        """``logits`` with every disallowed token set to ``-inf``.

        A select, not an addition, so NaN/+inf logits of disallowed tokens cannot survive; NaN
        logits of allowed tokens become the dtype's lowest finite value, so that a model emitting
        NaNs (seen with a tiny random model on mlx-cuda) still samples an allowed token instead
        of whatever index the sampler's argmax over NaNs lands on."""
        width = int(logits.shape[-1])
        neg = mx.array(-math.inf, dtype=logits.dtype)
        low = float(mx.finfo(logits.dtype).min)
        safe = mx.nan_to_num(logits, nan=low, posinf=None, neginf=low)
        return mx.where(self.allowed_mask(width), safe, neg)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self._sync(tokens)
        return self.mask_logits(logits)


def _read_new_tokens(tokens: mx.array, start: int) -> list[int]:
    """``tokens[start:]`` as Python ints. Waits for the stream first: the newest token comes from
    the previous step's ``async_eval``, and reading it must not race that work (costs nothing
    extra: reading the token has to wait for the same work anyway)."""
    mx.synchronize()
    return tokens[start:].tolist()


_BIT_INDEX: dict[int, tuple[mx.array, mx.array]] = {}


def _expand_bits(words: mx.array, width: int) -> mx.array:
    """int32 bitmask words -> bool[width] (bit i of word w is token 32*w + i), with MLX ops.

    Written as a gather + shift per token (no reshape/slice of a broadcast result, which
    produced wrong trailing bits on mlx-cuda 0.32.4 when ``width`` is not a multiple of 32)."""
    idx = _BIT_INDEX.get(width)
    if idx is None:
        ar = mx.arange(width, dtype=mx.int32)
        idx = _BIT_INDEX[width] = (ar >> 5, ar & 31)
        mx.eval(*idx)
    word_of, bit_of = idx
    return ((mx.take(words, word_of) >> bit_of) & 1).astype(mx.bool_)
