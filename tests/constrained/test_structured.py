"""Constrained decoding (flashmoe_backend.structured, .json_schema, .vocabulary) on llguidance,
tiny random models, CPU."""

from __future__ import annotations

import enum
import json
import re
from typing import Literal

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from pydantic import BaseModel, Field

from flashmoe_backend.constrained.constraint import (
    Constraint,
    IncompleteOutputError,
    StructuredOutputError,
    check_response_format,
)
from flashmoe_backend.constrained.json_schema import UnsupportedSchemaError
from flashmoe_backend.constrained.outlines_model import from_mlxlm
from flashmoe_backend.constrained.vocabulary import Vocabulary


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


def generate(model, tokenizer, constraint, *, seed=0, max_tokens=200, prompt="Data:", temp=1.0,
             steer=True):
    """Generate with the constraint; returns (text, finish_reason, processor). ``steer``: the
    processor knows ``max_tokens`` and closes the structure in time."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    proc = constraint.logits_processor(max_tokens if steer else None)
    mx.random.seed(seed)
    text, finish = "", None
    for r in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens,
        logits_processors=[proc], sampler=make_sampler(temp=temp),
    ):
        text += r.text
        finish = r.finish_reason
    return text, finish, proc


def _allowed(out: mx.array) -> set[int]:
    return set(np.nonzero(np.isfinite(np.array(out[0].astype(mx.float32))))[0].tolist())


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
    llg = vocab.llg
    assert vocab.llg is llg and llg.vocab_size == vocab.size
    # Special tokens are special to the grammar engine too (a grammar cannot write them) ...
    for t in ("<|im_start|>", "<|endoftext|>", "<|im_end|>"):
        assert llg.is_special_token(hf.convert_tokens_to_ids(t))
    # ... but non-special added tokens are the text they stand for.
    tc = hf.convert_tokens_to_ids("<tool_call>")
    assert not llg.is_special_token(tc) and vocab.token_bytes[tc] == b"<tool_call>"
    assert llg.decode_bytes([tc]) == b"<tool_call>"
    # Every byte has a single-byte token, and token bytes round-trip through the tokenizer.
    assert len(vocab.byte_token_ids) == 256
    text = "héllo wörld 日本 {\"a\": [1, 2]} 🙂"
    ids = hf.encode(text, add_special_tokens=False)
    assert vocab.decode_bytes(ids).decode("utf-8") == text
    assert llg.decode_bytes(ids).decode("utf-8") == text
    # A token that is part of a multi-byte character maps to raw (non-UTF-8) bytes.
    partial = [b for b in vocab.token_bytes if b and not _is_utf8(b)]
    assert partial, "expected byte tokens that are not valid UTF-8 on their own"


def test_bare_vocabulary_encodes_greedily():
    vocab = Vocabulary([bytes([b]) for b in range(256)] + [b"ab", b"abc", b"<eos>"], [258])
    assert vocab.encode("abcab") == [257, 256]
    assert vocab.llg.vocab_size == 259
    c = Constraint.from_response_format(["abc", "x"], vocab)
    assert c.status("abc") == "complete" and c.status("ab") == "incomplete"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---------------------------------------------------------------------------------------------
# Normalisation and errors before generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema,needle",
    [
        ({"type": "strin"}, "type"),
        ({"type": "array", "minItems": -1}, "minItems"),
        ({"type": "string", "pattern": "(unclosed"}, "pattern"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}, "Missing"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}, "$ref"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be an object"),
        (True, "boolean JSON schema"),
        ({"type": "object", "properties": {"a": {"minLength": -1, "type": "string"}}}, "minLength"),
    ],
)
def test_malformed_schema_raises_before_generation(schema, needle, tok):
    with pytest.raises(ValueError) as err:
        if isinstance(schema, dict):
            Constraint.from_response_format(schema, tok)
        else:
            Constraint.from_response_format({"type": "json_schema", "json_schema": {"schema": schema}},
                                            tok)
    assert needle.lower() in str(err.value).lower(), str(err.value)


@pytest.mark.parametrize(
    "schema,keyword,path",
    [
        ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}},
         "uniqueItems", "#/properties/tags"),
        ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "not", "#/properties/a"),
        ({"$defs": {"X": {"type": "object", "dependentRequired": {"a": ["b"]}}},
          "$ref": "#/$defs/X"}, "dependentRequired", "#/$defs/X"),
        ({"type": "array", "items": {"type": "string"}, "contains": {"const": "x"}}, "contains", "#"),
    ],
)
def test_unsupported_keyword_is_named_with_its_path(schema, keyword, path, tok):
    """A keyword the engine cannot enforce is refused, never silently dropped."""
    for check in (lambda: Constraint.from_response_format(schema, tok),
                  lambda: check_response_format(schema)):
        with pytest.raises(UnsupportedSchemaError) as err:
            check()
        assert keyword in err.value.keywords
        assert f"'{keyword}' at {path}" in str(err.value), str(err.value)


def test_valid_schemas_earlier_refused_are_accepted(tok):
    """Schemas the outlines-core path refused or called malformed, though JSON Schema allows them."""
    cases = [
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"],
          "additionalProperties": {"type": "integer"}}, '{"a": 1, "b": 2}', '{"a": 1}'),
        ({"pattern": "^[a-z]+$"}, '"abc"', '"ab1"'),
        ({"format": "email"}, '"al@example.com"', '"not an email"'),
        ({"type": "number", "minimum": 0, "exclusiveMinimum": True}, "0.5", "0"),  # draft 4
        ({"type": "integer", "multipleOf": 5}, "15", "16"),
        ({"properties": {"x": {}}, "required": ["x"]}, '{"x": [1, {"y": null}]}', "{}"),
    ]
    for schema, good, bad in cases:
        c = Constraint.from_response_format(schema, tok)
        assert c.status(good) == "complete", (schema, good)
        assert c.status(bad) != "complete", (schema, bad)
        jsonschema.validate(json.loads(good), {k: v for k, v in schema.items()
                                               if k != "exclusiveMinimum"})


class Color(enum.Enum):
    red = "red"
    green = "green"


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=130)


def test_response_formats_normalise(tok):
    from outlines.types import CFG, Regex

    def ok(rf, text):
        return Constraint.from_response_format(rf, tok).status(text) == "complete"

    assert ok({"type": "regex", "pattern": "[a-z]+"}, "abc")
    assert not ok({"type": "regex", "pattern": "[a-z]+"}, "ab1")
    assert ok(Regex(r"\d{3}"), "123") and not ok(Regex(r"\d{3}"), "12")
    assert ok(Regex(r"a/b"), "a/b")  # '/' is the Lark regex delimiter
    assert ok(["yes", "no", "a.b"], "a.b") and not ok(["yes", "no", "a.b"], "axb")
    # Choices that are prefixes of each other all stay reachable.
    pre = Constraint.from_response_format(["ab", "abc", "a"], tok)
    assert [pre.status(x) for x in ("a", "ab", "abc", "abcd")] == ["complete"] * 3 + ["invalid"]
    top = Constraint.from_response_format({"type": "integer", "minimum": 0, "maximum": 120}, tok)
    assert top.status("120") == "complete" and top.status("121") == "invalid"
    assert ok(Literal["x", "y"], "y")
    assert ok(Person, '{"name": "Al", "age": 130}') and not ok(Person, '{"name": "Al", "age": 131}')
    openai = {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}}
    assert ok(openai, '{"name": "Al", "age": 130}') and not ok(openai, '{"name": "Al", "age": 131}')
    assert ok({"type": "json_object"}, '{"k": [1, "x"]}') and not ok({"type": "json_object"}, "[1]")
    assert Constraint.from_response_format(Color, tok).parse("green") is Color.green
    assert Constraint.from_response_format(Literal["x", "y"], tok).parse("x") == "x"
    assert Constraint.from_response_format(Person, tok).parse('{"name":"Al","age":3}') == Person(
        name="Al", age=3
    )
    # Whitespace is tight: at most one space, no newlines.
    assert not ok(Person, '{\n  "name": "Al",\n  "age": 3\n}')
    # Context-free grammars (Lark) are an output type.
    arith = 'start: expr\nexpr: NUM | expr "+" expr | "(" expr ")"\nNUM: /[0-9]+/'
    for rf in (CFG(arith), {"type": "grammar", "grammar": arith}):
        c = Constraint.from_response_format(rf, tok)
        assert c.parse("(1+22)+3") == "(1+22)+3"
        assert c.status("(1+") == "incomplete" and c.status("1++") == "invalid"
    with pytest.raises(ValueError, match="grammar"):
        Constraint.from_response_format({"type": "grammar", "grammar": "start: undefined_rule"}, tok)
    with pytest.raises(ValueError, match="ambiguous"):
        Constraint.from_response_format("just a string", tok)
    for value in (42, 3.5, object()):  # a value, not a type: never generated as its own text
        with pytest.raises(ValueError, match=rf"\(an? {type(value).__name__} value\)"):
            Constraint.from_response_format(value, tok)
    assert ok(int, "-12") and not ok(int, "1.5") and ok(list[int], "[1, 2]")


def test_parse_reports_incomplete_and_invalid(tok):
    c = Constraint.from_response_format(Person, tok)
    assert c.status('{"name": "Al", "age": 3}') == "complete"
    assert c.status('{"name": "Al", "ag') == "incomplete"
    assert c.status('{"name": 3}') == "invalid"
    assert c.status('{"name": "Al') == "incomplete"
    proc = c.logits_processor()
    assert proc.advance_text('{"name": "Al') and not proc.is_complete
    vocab = c.vocabulary
    bias = np.array(proc.bias(vocab.size + 8))
    assert np.isinf(bias[list(vocab.eos_token_ids)]).all()
    assert np.isinf(bias[vocab.size:]).all()
    with pytest.raises(IncompleteOutputError):
        c.parse('{"name": "Al"')
    with pytest.raises(StructuredOutputError):
        c.parse("hello")


def test_compiling_writes_nothing_to_disk(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    c = Constraint.from_response_format(Person, tok)
    c.parse('{"name": "Al", "age": 3}')
    assert list(tmp_path.rglob("*")) == []


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
    allowed = _allowed(out)
    assert allowed == set(proc.allowed_token_ids())
    assert all(vocab.token_bytes[i] and "abc".startswith(vocab.token_bytes[i].decode())
               for i in allowed)
    assert not any(i >= vocab.size for i in allowed)
    assert not proc.is_complete
    a, b, cc = (vocab.byte_token_ids[ord(x)] for x in "abc")
    seq = mx.concatenate([prompt, mx.array([a, b])])
    out = proc(seq, mx.zeros((1, width)))
    assert proc.is_complete and proc.is_finished()  # "ab" is complete, "abc" still possible
    allowed = _allowed(out)
    assert vocab.eos_token_id in allowed and cc in allowed
    out = proc(mx.concatenate([seq, mx.array([cc])]), mx.zeros((1, width)))
    assert _allowed(out) <= set(vocab.eos_token_ids)  # finished: only EOS
    # Speculative decoding may take tokens back: the matcher rolls back with them.
    out = proc(seq, mx.zeros((1, width)))
    assert cc in _allowed(out) and proc.generated_ids == [a, b]
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
    width = c.vocabulary.size
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


def test_finishing_path_completes_the_structure(tok):
    c = Constraint.from_response_format(Person, tok)
    proc = c.logits_processor()
    assert proc.advance_text('{"name": "Alberto", "a')
    path = proc.finishing_path(40)
    text = '{"name": "Alberto", "a' + c.vocabulary.decode_bytes(path).decode()
    assert c.status(text) == "complete", text
    assert proc.finishing_path(2) is None  # cannot finish in 2 tokens
    assert not proc.is_complete  # the processor itself did not move


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
        if not proc.is_complete:  # closed by EOS, or steered closed at max_tokens
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
        assert proc.is_complete, (finish, text)
        order = c.parse(text)
        assert isinstance(order, Order)
        Order.model_validate_json(text)


def test_max_tokens_mid_structure_is_reported_incomplete(quantized):
    model, tokenizer = quantized(4)
    c = Constraint.from_response_format(Order, tokenizer)
    text, finish, proc = generate(model, tokenizer, c, max_tokens=5, steer=False)
    assert finish == "length"
    assert not proc.is_complete
    assert c.status(text) == "incomplete"
    with pytest.raises(IncompleteOutputError):
        c.parse(text)


def test_structures_close_within_max_tokens(quantized):
    """With max_tokens known, the processor steers the last tokens to a complete structure
    where the free model runs out of tokens mid-structure."""
    model, tokenizer = quantized(4)
    c = Constraint.from_response_format(Person, tokenizer)
    free, steered = [], []
    for seed in range(6):
        for steer, out in ((False, free), (True, steered)):
            text, finish, proc = generate(model, tokenizer, c, seed=seed, max_tokens=16, steer=steer)
            out.append(proc.is_complete)
            if proc.is_complete:
                assert isinstance(c.parse(text), Person)
            else:
                assert c.status(text) == "incomplete"
    assert all(steered), steered
    assert not all(free), "the free model closed every time: the test proves nothing"


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
    from outlines.types import CFG, Regex

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
    # Processors made by stock outlines' llguidance backend get the portable mask too.
    gen = outlines.Generator(om, Literal["alpha", "beta"], backend="llguidance")
    assert gen("x", max_tokens=10) in ("alpha", "beta")
    assert om("sum?", CFG('start: /[0-9]/ "+" /[0-9]/'), max_tokens=10)[1] == "+"
    with pytest.raises(NotImplementedError, match="llguidance"):
        om("x", Person, backend="xgrammar")
    json.dumps(out)


def test_listed_properties_close_the_object_unless_others_are_needed(tok):
    """An object that lists its properties gets no others (as OpenAI strict mode generates), but
    stays open where other keys are required or allowed explicitly."""
    listed = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    c = Constraint.from_response_format(listed, tok)
    assert c.status('{"x": 1}') == "complete" and c.status('{"x": 1, "y": 2}') != "complete"
    for open_ in ({**listed, "required": ["x", "y"]}, {**listed, "additionalProperties": True}):
        assert Constraint.from_response_format(open_, tok).status('{"x": 1, "y": 2}') == "complete"


@pytest.mark.parametrize("reasoning_prefix", [False, True])
def test_unique_items_in_a_response_format_hold_against_a_model_that_repeats(reasoning_prefix, tok):
    """A response schema whose only keyword llguidance cannot enforce is uniqueItems over scalars
    compiles (no longer refused); the guard keeps a model that repeats itself unique."""

    class Tags(BaseModel):
        tags: list[Literal["a", "b", "c"]] = Field(min_length=2, json_schema_extra={"uniqueItems": True})
        names: list[str] = Field(min_length=3, max_length=4, json_schema_extra={"uniqueItems": True})

    c = Constraint.from_response_format(Tags, tok, reasoning_prefix=reasoning_prefix)
    assert c.guard is not None
    vocab = c.vocabulary
    bias = np.zeros((1, vocab.size), np.float32)
    # (a reasoning block is closed first: steering does not end open-ended reasoning)
    for rank, piece in enumerate([b"</think>", b'"a"', b'"a', b"a", b'"', b","]):
        bias[0, [i for i, b in enumerate(vocab.token_bytes) if b == piece]] = 20.0 - rank
    proc = c.logits_processor(max_tokens=120)
    ids = [vocab.eos_token_id]
    for _ in range(120):
        ids.append(int(mx.argmax(proc(mx.array(ids), mx.array(bias)), axis=-1).item()))
        if ids[-1] in vocab.eos_token_ids:
            break
    else:
        proc(mx.array(ids), mx.array(bias))  # take in the last token
    text = vocab.decode_bytes([t for t in ids[1:] if t not in vocab.eos_token_ids]).decode()
    assert proc.is_complete, text
    if reasoning_prefix:
        text = text.split("</think>", 1)[1]
    value = Tags.model_validate_json(text)
    assert len(set(value.tags)) == len(value.tags) >= 2
    assert len(set(value.names)) == len(value.names) >= 3
    jsonschema.validate(json.loads(text), Tags.model_json_schema())


def test_unique_items_over_objects_stay_refused_in_a_response_format(tok):
    schema = {"type": "array", "uniqueItems": True, "items": {"type": "object"}}
    with pytest.raises(UnsupportedSchemaError, match="uniqueItems"):
        Constraint.from_response_format(schema, tok)
