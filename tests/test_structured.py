"""Constrained decoding (flashmoe_backend.structured, .json_schema, .vocabulary) on tiny random
models, CPU."""

from __future__ import annotations

import enum
import json
import re
import time
from decimal import Decimal
from typing import Literal

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from pydantic import BaseModel, Field

from flashmoe_backend import vocabulary as voc
from flashmoe_backend.json_schema import integer_range_regex, number_range_regex, schema_to_regex
from flashmoe_backend.outlines_model import from_mlxlm
from flashmoe_backend.structured import (
    Constraint,
    IncompleteOutputError,
    StructuredOutputError,
    response_format_to_regex,
)
from flashmoe_backend.vocabulary import Vocabulary, compile_index


@pytest.fixture(autouse=True)
def _index_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Never write the index cache into the user's home from tests."""
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fm-cache"))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir("xml"))


_MODELS: dict = {}


@pytest.fixture(scope="module")
def quantized(tiny_quantized_dir):
    """``quantized(bits) -> (model, tokenizer)`` of the tiny Qwen3.5-MoE, loaded once."""
    import mlx_lm

    def get(bits: int = 4):
        if bits not in _MODELS:
            _MODELS[bits] = mlx_lm.load(str(tiny_quantized_dir("qwen3_5_moe", bits=bits)))
        return _MODELS[bits]

    return get


def generate(model, tokenizer, constraint, *, seed=0, max_tokens=200, prompt="Data:", temp=1.0):
    """Generate with the constraint; returns (text, finish_reason, processor)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    proc = constraint.logits_processor()
    mx.random.seed(seed)
    text, finish = "", None
    for r in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens,
        logits_processors=[proc], sampler=make_sampler(temp=temp),
    ):
        text += r.text
        finish = r.finish_reason
    return text, finish, proc


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def test_vocabulary_from_token_bytes(tok):
    vocab = Vocabulary.from_tokenizer(tok)
    hf = tok._tokenizer
    assert vocab.kind == "byte_level"
    assert Vocabulary.from_tokenizer(tok) is vocab  # cached
    assert Vocabulary.from_tokenizer(hf) is vocab  # same HF tokenizer inside
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    assert vocab.eos_token_id == im_end and im_end in vocab.eos_token_ids
    # Special tokens are out of the grammar's vocabulary, EOS too (outlines adds it itself) ...
    for t in ("<|im_start|>", "<|endoftext|>", "<|im_end|>"):
        assert hf.convert_tokens_to_ids(t) not in vocab.allowed_ids
    # ... but non-special added tokens are text the grammar may use.
    tc = hf.convert_tokens_to_ids("<tool_call>")
    assert tc in vocab.allowed_ids and vocab.token_bytes[tc] == b"<tool_call>"
    # Every byte but 0xF4 (kept for the sentinel) has a single-byte token, and token bytes
    # round-trip through the tokenizer.
    assert len(vocab.byte_token_ids) == 255 and 0xF4 not in vocab.byte_token_ids
    text = "héllo wörld 日本 {\"a\": [1, 2]} 🙂"
    ids = hf.encode(text, add_special_tokens=False)
    assert vocab.decode_bytes(ids).decode("utf-8") == text
    # A token that is part of a multi-byte character maps to raw (non-UTF-8) bytes.
    partial = [b for b in vocab.token_bytes if b and not _is_utf8(b)]
    assert partial, "expected byte tokens that are not valid UTF-8 on their own"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---------------------------------------------------------------------------------------------
# Regex building blocks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lo,hi", [(0, 120), (-50, 50), (1, None), (None, -3), (-1000, -7), (17, 17), (5, 1234), (None, None)]
)
def test_integer_range_regex(lo, hi, tok):
    regex = integer_range_regex(lo, hi)
    rx = re.compile(regex)
    # The compiled index is what generation uses: outlines-core's leftmost-first semantics
    # must not hide longer numbers at the end of the regex.
    c = Constraint.from_regex(regex, tok)
    for n in range(-1500, 1500):
        ok = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(rx.fullmatch(str(n))) == ok, (lo, hi, n)
        assert (c.status(str(n)) == "complete") == ok, (lo, hi, n)
    for s in ("-0", "01", "", "-", "1.0"):
        assert not rx.fullmatch(s)


@pytest.mark.parametrize(
    "lo,hi,li,hi_incl",
    [("0", "1", True, True), ("-2.5", "2.5", False, False), ("0.05", "0.5", True, False),
     ("-10", "0", True, False), ("3.14", None, True, True), (None, "-0.5", True, True),
     ("1.5", "1.75", True, True)],
)
def test_number_range_regex(lo, hi, li, hi_incl, tok):
    dlo = None if lo is None else Decimal(lo)
    dhi = None if hi is None else Decimal(hi)
    regex = number_range_regex(dlo, dhi, lo_inclusive=li, hi_inclusive=hi_incl)
    rx = re.compile(regex)
    c = Constraint.from_regex(regex, tok)
    for i in range(-1200, 1200):
        cands = {format(Decimal(i) / 100, "f"), format(Decimal(i) / 1000, "f"), str(i)}
        cands |= {c + "0" for c in cands if "." in c}
        for s in sorted(cands):
            v = Decimal(s)
            ok = (dlo is None or v > dlo or (li and v == dlo)) and (
                dhi is None or v < dhi or (hi_incl and v == dhi)
            )
            if s.startswith("-") and v == 0:
                continue  # "-0..." is never generated; either answer is fine
            assert bool(rx.fullmatch(s)) == ok, (lo, hi, s)
            assert (c.status(s) == "complete") == ok, (lo, hi, s)
    for s in ("1.", ".5", "01", "1e3", "-"):
        assert not rx.fullmatch(s)


# ---------------------------------------------------------------------------------------------
# Normalisation and errors before generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema,needle",
    [
        ({"type": "strin"}, "type"),
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]}, "'b'"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
        ({"type": "string", "pattern": "(unclosed"}, "pattern"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}, "Missing"),
        ({"not": {"type": "integer"}}, "unsupported"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be an object"),
        ({"type": "object", "properties": {"a": {"minLength": -1, "type": "string"}}}, "minLength"),
    ],
)
def test_malformed_schema_raises_before_generation(schema, needle, tok):
    with pytest.raises(ValueError) as err:
        if isinstance(schema, dict):
            Constraint.from_response_format(schema, tok)
        else:
            schema_to_regex(schema)
    assert needle.lower() in str(err.value).lower(), str(err.value)


class Color(enum.Enum):
    red = "red"
    green = "green"


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=130)


def test_response_formats_normalise(tok):
    from outlines.types import CFG, Regex

    assert response_format_to_regex({"type": "regex", "pattern": "[a-z]+"}) == "[a-z]+"
    assert response_format_to_regex(Regex(r"\d{3}")) == r"\d{3}"
    assert re.fullmatch(response_format_to_regex(["yes", "no", "a.b"]), "a.b")
    assert not re.fullmatch(response_format_to_regex(["yes", "no", "a.b"]), "axb")
    # Choices that are prefixes of each other all stay reachable.
    pre = Constraint.from_response_format(["ab", "abc", "a"], tok)
    assert [pre.status(x) for x in ("a", "ab", "abc", "abcd")] == ["complete"] * 3 + ["invalid"]
    top = Constraint.from_response_format({"type": "integer", "minimum": 0, "maximum": 120}, tok)
    assert top.status("120") == "complete" and top.status("121") == "invalid"
    assert re.fullmatch(response_format_to_regex(Literal["x", "y"]), "y")
    rx = response_format_to_regex(Person)
    assert re.fullmatch(rx, '{"name": "Al", "age": 130}')
    assert not re.fullmatch(rx, '{"name": "Al", "age": 131}')
    openai = {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}}
    assert response_format_to_regex(openai) == rx
    assert Constraint.from_response_format(Color, tok).parse("green") is Color.green
    assert Constraint.from_response_format(Literal["x", "y"], tok).parse("x") == "x"
    assert Constraint.from_response_format(Person, tok).parse('{"name":"Al","age":3}') == Person(
        name="Al", age=3
    )
    # Whitespace is tight: at most one space, no newlines.
    assert not re.fullmatch(rx, '{\n  "name": "Al",\n  "age": 3\n}')
    with pytest.raises(NotImplementedError, match="JSON schema"):
        Constraint.from_response_format(CFG('start: "a"'), tok)
    with pytest.raises(NotImplementedError):
        Constraint.from_response_format({"type": "grammar", "grammar": "x"}, tok)
    with pytest.raises(ValueError, match="ambiguous"):
        Constraint.from_response_format("just a string", tok)


def test_parse_reports_incomplete_and_invalid(tok):
    c = Constraint.from_response_format(Person, tok)
    assert c.status('{"name": "Al", "age": 3}') == "complete"
    assert c.status('{"name": "Al", "ag') == "incomplete"
    assert c.status('{"name": 3}') == "invalid"
    # Inside a string the structure is never complete (the end-of-structure sentinel is a
    # valid string character, so completeness must mean "the sentinel ends the regex").
    assert c.status('{"name": "Al') == "incomplete"
    proc = c.logits_processor()
    assert proc.advance_text('{"name": "Al') and not proc.is_complete
    vocab = c.vocabulary
    bias = np.array(proc.bias(vocab.size + 8))
    assert np.isinf(bias[list(vocab.eos_token_ids)]).all()
    assert np.isinf(bias[vocab.sentinel_id])
    with pytest.raises(IncompleteOutputError):
        c.parse('{"name": "Al"')
    with pytest.raises(StructuredOutputError):
        c.parse("hello")


# ---------------------------------------------------------------------------------------------
# Index cache
# ---------------------------------------------------------------------------------------------


def test_index_cache_memory_and_disk(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path))
    regex = r"cache-test-[0-9]{2}"
    voc.clear_index_cache(memory=True)
    s0 = voc.index_cache_stats()
    idx = compile_index(regex, tok)
    s1 = voc.index_cache_stats()
    assert s1["compiles"] == s0["compiles"] + 1
    assert list((tmp_path / "index").glob("*.idx"))
    assert compile_index(regex, tok) is idx  # memory
    assert voc.index_cache_stats()["memory_hits"] == s1["memory_hits"] + 1
    voc.clear_index_cache(memory=True)
    idx2 = compile_index(regex, tok)  # disk
    s2 = voc.index_cache_stats()
    assert s2["disk_hits"] == s1["disk_hits"] + 1 and s2["compiles"] == s1["compiles"]
    assert idx2.get_transitions() == idx.get_transitions()
    # A corrupt file is ignored and rewritten.
    for f in (tmp_path / "index").glob("*.idx"):
        f.write_bytes(b"garbage")
    voc.clear_index_cache(memory=True)
    assert compile_index(regex, tok).get_transitions() == idx.get_transitions()
    with pytest.raises(ValueError):
        compile_index("(unclosed", tok)


# ---------------------------------------------------------------------------------------------
# The logits processor
# ---------------------------------------------------------------------------------------------


def test_processor_masks_and_tracks_state(tok):
    vocab = Vocabulary.from_tokenizer(tok)
    c = Constraint.from_response_format(["abc", "ab"], tok)
    proc = c.logits_processor()
    width = vocab.size + 40  # logits can be wider than the tokenizer
    prompt = mx.array(tok.encode("xyz"))
    out = proc(prompt, mx.zeros((1, width)))  # first call: prompt only, nothing consumed
    assert out.shape == (1, width)
    allowed = set(np.nonzero(np.isfinite(np.array(out[0])))[0].tolist())
    assert allowed == set(proc.allowed_token_ids())
    assert all(vocab.token_bytes[i] and "abc".startswith(vocab.token_bytes[i].decode())
               for i in allowed)
    assert not any(i >= vocab.size for i in allowed)
    assert not proc.is_complete
    a, b, cc = (vocab.byte_token_ids[ord(x)] for x in "abc")
    seq = mx.concatenate([prompt, mx.array([a, b])])
    out = proc(seq, mx.zeros((1, width)))
    assert proc.is_complete and proc.is_finished()  # "ab" is complete, "abc" still possible
    allowed = set(np.nonzero(np.isfinite(np.array(out[0])))[0].tolist())
    assert vocab.eos_token_id in allowed and cc in allowed
    out = proc(mx.concatenate([seq, mx.array([cc])]), mx.zeros((1, width)))
    allowed = set(np.nonzero(np.isfinite(np.array(out[0])))[0].tolist())
    assert allowed == set(vocab.eos_token_ids)  # finished: only EOS
    # Masked logits keep dtype; the on-device path gives the same mask as the numpy one.
    p2 = c.logits_processor()
    p2(prompt, mx.zeros((1, width)))
    x = mx.random.normal((1, width)).astype(mx.bfloat16)
    ref = p2(prompt, x)
    p2._device_path = True
    dev = p2(prompt, x)
    assert ref.dtype == mx.bfloat16 and dev.dtype == mx.bfloat16
    assert np.array_equal(np.array(ref.astype(mx.float32)), np.array(dev.astype(mx.float32)))
    with pytest.raises(StructuredOutputError):
        p2.advance(vocab.byte_token_ids[ord("z")])


def test_nan_logits_cannot_break_the_constraint(tok):
    """A model emitting NaN/inf logits still samples only allowed tokens."""
    from mlx_lm.sample_utils import make_sampler

    c = Constraint.from_response_format(["yes", "no"], tok)
    vocab = c.vocabulary
    width = vocab.size
    sampler = make_sampler(temp=1.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        proc = c.logits_processor()
        logits = mx.full((1, width), bad)
        out = proc(mx.array([1, 2]), logits)
        arr = np.array(out[0])
        allowed = set(proc.allowed_token_ids())
        assert np.isfinite(arr[sorted(allowed)]).all()
        assert np.isneginf(np.delete(arr, sorted(allowed))).all()
        logprobs = out - mx.logsumexp(out, keepdims=True)
        for _ in range(5):
            assert int(sampler(logprobs).item()) in allowed


def test_processor_overhead_is_small(tok):
    """Per-token mask cost at the real Qwen3.5 logits width (248,320) stays in the
    sub-millisecond range on CPU (generous bound for slow CI machines)."""
    c = Constraint.from_response_format(Person, tok)
    proc = c.logits_processor()
    width = 248_320
    logits = mx.random.normal((1, width))
    prompt = mx.array([1, 2, 3])
    mx.eval(proc(prompt, logits))
    t0 = time.perf_counter()
    for _ in range(20):
        mx.eval(proc(prompt, logits))
    per_call = (time.perf_counter() - t0) / 20
    assert per_call < 0.02, per_call


# ---------------------------------------------------------------------------------------------
# Generation: every output parses and validates, at 2, 4 and 8 bits
# ---------------------------------------------------------------------------------------------

S = {"type": "string", "maxLength": 8}
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0,
     "maximum": 120}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 1000},
        "email": {"type": "string", "format": "email"}}, "required": ["id", "email"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
     "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["p"]},
    {"type": "number", "exclusiveMinimum": -2.5, "exclusiveMaximum": 2.5},
    {"type": "object", "properties": {"a": S, "b": {"type": "integer", "minimum": 0,
     "maximum": 9}, "c": {"type": "boolean"}}, "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 9}, S]}}, "required": ["v"]},
    {"type": "object", "properties": {"nick": {"type": ["string", "null"], "maxLength": 6},
     "score": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "null"}]}},
     "required": ["nick", "score"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
     "required": ["day"]},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}},
     "required": ["id"]},
    {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}},
     "required": ["at"]},
    {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
        "kind": {"enum": ["a", "b"]}, "ok": {"type": "boolean"}}, "required": ["kind", "ok"]}},
    {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 3,
     "items": {"type": "integer", "minimum": 0, "maximum": 9}}},
    {"type": "object", "properties": {"version": {"const": "1.0"}, "n": {"type": "integer",
     "minimum": 1, "maximum": 3}}, "required": ["version", "n"]},
    {"$defs": {"Pt": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9},
        "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"]}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/Pt"}, "b": {"$ref": "#/$defs/Pt"}},
     "required": ["a", "b"]},
    {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"type": {"const": "circle"}, "r": {"type": "integer",
         "minimum": 1, "maximum": 9}}, "required": ["type", "r"]},
        {"type": "object", "properties": {"type": {"const": "square"}, "side": {"type": "integer",
         "minimum": 1, "maximum": 9}}, "required": ["type", "side"]}]}}, "required": ["shape"]},
    {"type": "object", "properties": {"flag": {"type": "boolean"}, "nothing": {"type": "null"}},
     "required": ["flag", "nothing"]},
    {"type": "object", "properties": {"big": {"type": "integer", "exclusiveMinimum": 0,
     "maximum": 1000000}}, "required": ["big"]},
    {"type": "object", "properties": {"w": {"type": "string", "minLength": 2, "maxLength": 4}},
     "required": ["w"]},
    {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 5}, S],
     "items": False},
    {"type": "object", "properties": {"m": {"enum": [1, "two", None, True]}}, "required": ["m"]},
    {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"},
     "t": {"type": "number", "minimum": -1.5, "maximum": 1.5}}, "required": ["ip", "t"]},
]


class Address(BaseModel):
    city: str = Field(max_length=8)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Order(BaseModel):
    kind: Literal["buy", "sell"]
    qty: int = Field(ge=1, le=100)
    price: float = Field(gt=0, le=10)
    note: str | None = Field(default=None, max_length=6)
    tags: list[Literal["x", "y", "z"]] = Field(max_length=2)
    ship_to: Address


def _validator(schema):
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.mark.parametrize("bits", [4, 2, 8])
def test_json_schema_outputs_always_valid(bits, quantized):
    model, tokenizer = quantized(bits)
    assert len(SCHEMAS) >= 20
    failures = []
    for i, schema in enumerate(SCHEMAS):
        c = Constraint.from_response_format(schema, tokenizer)
        text, finish, proc = generate(model, tokenizer, c, seed=100 * bits + i)
        if not proc.is_complete or finish != "stop":
            failures.append((i, "incomplete", finish, text))
            continue
        value = c.parse(text)
        errors = list(_validator(schema).iter_errors(value))
        if errors:
            failures.append((i, errors[0].message, text))
    assert not failures, failures


@pytest.mark.parametrize("bits", [4, 2, 8])
def test_pydantic_outputs_always_valid(bits, quantized):
    model, tokenizer = quantized(bits)
    c = Constraint.from_response_format(Order, tokenizer)
    for seed in range(3):
        text, finish, proc = generate(model, tokenizer, c, seed=seed)
        assert finish == "stop" and proc.is_complete, text
        order = c.parse(text)
        assert isinstance(order, Order)
        Order.model_validate_json(text)


def test_max_tokens_mid_structure_is_reported_incomplete(quantized):
    model, tokenizer = quantized(4)
    c = Constraint.from_response_format(Order, tokenizer)
    text, finish, proc = generate(model, tokenizer, c, max_tokens=5)
    assert finish == "length"
    assert not proc.is_complete
    assert c.status(text) == "incomplete"
    with pytest.raises(IncompleteOutputError):
        c.parse(text)


def test_greedy_generation_and_regex(quantized):
    from mlx_lm import generate as mlx_generate

    model, tokenizer = quantized(4)
    c = Constraint.from_response_format({"type": "regex", "pattern": r"[0-9]{3}-[a-z]{2,3}"},
                                        tokenizer)
    text = mlx_generate(model, tokenizer, "Code:", max_tokens=20,
                        logits_processors=[c.logits_processor()])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,3}", text), text


# ---------------------------------------------------------------------------------------------
# outlines integration
# ---------------------------------------------------------------------------------------------


def test_outlines_model_on_cpu(quantized):
    import outlines
    from mlx_lm.sample_utils import make_sampler
    from outlines.types import Regex

    model, tokenizer = quantized(4)
    om = from_mlxlm(model, tokenizer)
    assert isinstance(om, outlines.models.MLXLM)
    mx.random.seed(0)
    out = om("Give a person.", Person, max_tokens=100, sampler=make_sampler(temp=1.0))
    Person.model_validate_json(out)
    assert re.fullmatch(r"[0-9]{3}", om("n?", Regex(r"[0-9]{3}"), max_tokens=10))
    assert om("yes?", ["yes", "no"], max_tokens=10) in ("yes", "no")
    assert om("c?", Color, max_tokens=10) in ("red", "green")
    chunks = list(om.stream("s", Person, max_tokens=100))
    Person.model_validate_json("".join(chunks))
    # Processors made by stock outlines (outlines.Generator) get the portable mask too.
    gen = outlines.Generator(om, Literal["alpha", "beta"])
    assert gen("x", max_tokens=10) in ("alpha", "beta")
    json.dumps(out)
