"""The official JSON Schema Test Suite (draft 2020-12) against constrained decoding, CPU, offline.

The fixture (``tests/fixtures/json_schema_suite/draft2020-12.json``, built by ``build.py`` beside
it) holds the suite's distinct schemas with their valid and invalid instances. For every one:

* it compiles against the demo model's tokenizer, or it is refused with a ``ValueError`` that
  names the problem (an unsupported keyword: the keyword and its JSON-pointer paths);
* the grammar accepts none of the suite's invalid instances;
* random walks through the grammar (model-free: uniformly random allowed tokens) and the demo
  model's own generations give outputs that validate; an output that stopped mid-structure is
  reported ``incomplete`` and never returned as parsed.

What "validates" means here -- the oracle, :func:`oracle`:

* ``jsonschema``'s Draft 2020-12 validator (the dialect ``$schema`` names);
* ``format`` as an annotation, as the suite does by default (and as 2020-12 defines it without the
  format-assertion vocabulary; ``optional/format/`` is the suite's opt-in to assertion). The grammar
  engine enforces the formats it knows, but with approximate grammars: it accepts 37 of the
  ``optional/format`` instances the suite calls invalid under assertion (leap days and seconds,
  punycode hostnames; bench/bench_schema_coverage.py measures it), so asserting formats would test
  jsonschema's partial format checkers, not the constraint;
* numbers as exact decimals (instance and schema parsed with ``parse_float=Decimal``): JSON Schema
  defines ``multipleOf`` and the bounds on the numbers the text denotes, and the grammar enforces
  them exactly, where float arithmetic says 0.7404 is not a multiple of 0.0001;
* regexes in their ECMA-262 meaning, by validating against the schema as the project loaded it
  (``Constraint.schema``: ``\\w \\d \\s \\W \\D \\S .`` spelled out as explicit classes, which
  Python's ``re`` reads as ECMA-262 does). :func:`test_the_oracle_reads_the_suite_as_the_suite_means`
  pins this: on every compiled schema the oracle classifies every suite instance as the suite does,
  which jsonschema on the original schema fails to do for the ECMA-262 regex tests.

Budget: about a minute on two shared CPU cores; the model part generates for a spread sample of the
compiled schemas (``FLASHMOE_SUITE_ALL=1``: all of them).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

from flashmoe_backend.constrained.constraint import Constraint
from flashmoe_backend.constrained.json_schema import UnsupportedSchemaError, ecma_regex
from flashmoe_backend.constrained.json_validation import exact_loads, exact_validator, exact_value
from flashmoe_backend.store.source import DEMO_STORE

FIXTURE = Path(__file__).parents[1] / "fixtures" / "json_schema_suite" / "draft2020-12.json"
DEMO = DEMO_STORE
SUITE = json.loads(FIXTURE.read_text(encoding="utf-8"))
SCHEMAS = SUITE["schemas"]

#: Schemas generated with the real model (spread over the compiled ones), and its token budget.
MODEL_SAMPLE = 32
MODEL_MAX_TOKENS = 32
#: Random walks per compiled schema, and their length before closing the structure.
WALKS = 3
WALK_TOKENS = 48

#: How a refusal that names no keyword must start: the problem, said plainly.
CLEAR_REFUSALS = ("a boolean JSON schema does not describe", "malformed JSON schema at #",
                  "unsatisfiable JSON schema")


# ---------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------


def exact(value):
    """A JSON value with its non-integer numbers as exact ``Decimal``s."""
    return exact_value(value)


def oracle(schema: dict):
    """The validator outputs must satisfy (see the module docstring); takes ``exact`` values."""
    return exact_validator(schema)


def validation_errors(constraint: Constraint, text: str) -> list[str]:
    try:
        value = exact_loads(text)
    except json.JSONDecodeError as exc:
        return [f"not JSON: {exc}"]
    return [e.message for e in oracle(constraint.schema).iter_errors(value)]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_lm.tokenizer_utils import load

    return load(DEMO)


_COMPILED: dict[int, Constraint | ValueError] = {}


@pytest.fixture(scope="module")
def compiled(tokenizer) -> dict[int, Constraint | ValueError]:
    """Each schema's ``Constraint``, or the ``ValueError`` that refused it (compiled once)."""
    for entry in SCHEMAS:
        if entry["id"] not in _COMPILED:
            try:
                _COMPILED[entry["id"]] = Constraint.from_response_format(entry["schema"], tokenizer)
            except ValueError as exc:
                _COMPILED[entry["id"]] = exc
    return _COMPILED


def json_constraints(compiled) -> list[tuple[dict, Constraint]]:
    return [(e, compiled[e["id"]]) for e in SCHEMAS
            if isinstance(compiled[e["id"]], Constraint) and compiled[e["id"]].kind == "json"]


@pytest.fixture(scope="module")
def engine():
    from flashmoe_backend import FlashMoE
    from flashmoe_backend.store.source import default_store

    return FlashMoE.load(default_store(), cache_gb=1)


# ---------------------------------------------------------------------------------------------
# The fixture itself
# ---------------------------------------------------------------------------------------------


def test_fixture_is_the_small_distinct_draft_2020_12_suite():
    assert FIXTURE.stat().st_size < 1_000_000
    assert SUITE["source"]["draft"] == "draft2020-12" and SUITE["source"]["license"] == "MIT"
    keys = [json.dumps(e["schema"], sort_keys=True) for e in SCHEMAS]
    assert len(set(keys)) == len(keys) == len(SCHEMAS) > 350
    assert [e["id"] for e in SCHEMAS] == list(range(len(SCHEMAS)))
    assert all(e["valid"] or e["invalid"] or e.get("invalid_if_format_asserted") for e in SCHEMAS)


# ---------------------------------------------------------------------------------------------
# 1. Every schema compiles or is refused clearly
# ---------------------------------------------------------------------------------------------


def _case(entry: dict):
    return pytest.param(entry["id"], id=f"{entry['id']}-{entry['file']}")


@pytest.mark.parametrize("sid", [_case(e) for e in SCHEMAS])
def test_schema_compiles_or_is_refused_clearly(sid, compiled):
    result = compiled[sid]
    if isinstance(result, Constraint):
        assert result.kind == "json", f"compiled as {result.kind!r}, not as a JSON schema"
        return
    message = str(result)
    keywords = getattr(result, "keywords", ())
    if keywords:
        assert isinstance(result, UnsupportedSchemaError)
        for k in keywords:
            assert re.search(rf"'{re.escape(k)}' at #", message), (k, message)
    else:
        assert message.startswith(CLEAR_REFUSALS), message


def test_boolean_schemas_are_refused(tokenizer):
    for schema in (True, False):  # as a JSON-schema response format, they are refused
        rf = {"type": "json_schema", "json_schema": {"name": "b", "schema": schema}}
        with pytest.raises(ValueError, match="boolean JSON schema does not describe"):
            Constraint.from_response_format(rf, tokenizer)


def test_most_of_the_suite_compiles(compiled):
    ok = sum(isinstance(compiled[e["id"]], Constraint) for e in SCHEMAS)
    assert ok / len(SCHEMAS) > 0.4, f"only {ok} of {len(SCHEMAS)} compile"


# ---------------------------------------------------------------------------------------------
# 2. The grammar accepts no invalid instance; the oracle reads the suite as the suite does
# ---------------------------------------------------------------------------------------------


def _texts(value) -> list[str]:
    return [json.dumps(value, ensure_ascii=False, separators=sep) for sep in ((", ", ": "), (",", ":"))]


def test_the_grammar_accepts_no_invalid_instance(compiled):
    accepted = []
    for entry, constraint in json_constraints(compiled):
        for value in entry["invalid"]:
            for text in _texts(value):
                if constraint.status(text) == "complete":
                    accepted.append((entry["id"], entry["file"], entry["description"], text))
    assert not accepted, accepted


def test_the_oracle_reads_the_suite_as_the_suite_means(compiled):
    wrong = []
    for entry, constraint in json_constraints(compiled):
        check = oracle(constraint.schema)
        for kind in ("valid", "invalid"):
            for value in entry[kind]:
                if check.is_valid(exact(value)) != (kind == "valid"):
                    wrong.append((entry["id"], entry["description"], kind, value))
    assert not wrong, wrong


# ---------------------------------------------------------------------------------------------
# 3. Outputs validate: random walks through the grammar, and the demo model
# ---------------------------------------------------------------------------------------------


def random_walk(constraint: Constraint, rng: random.Random, steps: int) -> str | None:
    """A random output: random allowed tokens (single bytes two times in three, so strings and
    numbers get long and odd), stopping when complete with probability 0.2 per step, then the
    shortest way the processor knows to close the structure. None if it cannot close."""
    proc = constraint.logits_processor()
    vocab = constraint.vocabulary
    eos = vocab.eos_token_ids
    single = set(vocab.byte_token_ids.values())
    for _ in range(steps):
        if proc.is_complete and rng.random() < 0.2:
            break
        allowed = [t for t in proc.allowed_token_ids() if t not in eos]
        if not allowed:
            break
        short = [t for t in allowed if t in single]
        proc.advance(rng.choice(short if short and rng.random() < 0.67 else allowed))
    if not proc.is_complete:
        path = proc.finishing_path(64)
        if path is None:
            return None
        proc.consume(path)
    return vocab.decode_bytes([t for t in proc.generated_ids if t not in eos]).decode("utf-8")


def test_random_walks_through_every_grammar_validate(compiled):
    bad, n = [], 0
    for entry, constraint in json_constraints(compiled):
        for walk in range(WALKS):
            text = random_walk(constraint, random.Random(entry["id"] * 100 + walk), WALK_TOKENS)
            if text is None:
                continue
            n += 1
            assert constraint.status(text) == "complete", text
            errors = validation_errors(constraint, text)
            if errors:
                bad.append((entry["id"], entry["description"], text, errors[0]))
    assert n > 2 * len(json_constraints(compiled))
    assert not bad, bad


def _model_sample(compiled) -> list[int]:
    ids = [e["id"] for e, _ in json_constraints(compiled)]
    if os.environ.get("FLASHMOE_SUITE_ALL") or len(ids) <= MODEL_SAMPLE:
        return ids
    step = len(ids) / MODEL_SAMPLE
    return [ids[int(i * step)] for i in range(MODEL_SAMPLE)]


def test_model_outputs_validate_and_incomplete_ones_are_never_parsed(compiled, engine):
    by_id = {e["id"]: e for e in SCHEMAS}
    bad, finishes = [], []
    for sid in _model_sample(compiled):
        entry, constraint = by_id[sid], compiled[sid]
        result = engine.generate(f"A JSON value: {entry['description']}.\n",
                                 response_format=entry["schema"], max_tokens=MODEL_MAX_TOKENS,
                                 temperature=1.0, seed=sid)
        finishes.append(result.finish_reason)
        if result.finish_reason == "incomplete":
            assert result.parsed is None, (sid, result.raw_text)
            assert constraint.status(result.raw_text) == "incomplete", (sid, result.raw_text)
            continue
        assert constraint.status(result.raw_text) == "complete", (sid, result.raw_text)
        assert result.parsed == json.loads(result.raw_text), (sid, result.raw_text)
        errors = validation_errors(constraint, result.raw_text)
        if errors:
            bad.append((sid, entry["description"], result.raw_text, errors[0]))
    assert not bad, bad
    assert finishes.count("incomplete") < len(finishes) / 2, finishes


# ---------------------------------------------------------------------------------------------
# 4. The departures found this way, each refused or spelled out
# ---------------------------------------------------------------------------------------------

ECMA_SPACE = set("\t\n\x0b\x0c\r \xa0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff") | {
    chr(c) for c in range(0x2000, 0x200B)}
PROBE = ["a", "Z", "5", "_", "é", "ﰷ", "٣", "߀", " ", "\t", "\n", "\r", "\x0b", "\x0c", "\xa0", "\ufeff",
         "\u2028", "\u2029", "\x1c", "\x85", "\u3000", "-", "😀"]
ECMA_MEANING = {  # ECMA-262 (with the u flag), section 22.2.2.9 CharacterClassEscape
    r"\w": lambda c: c.isascii() and (c.isalnum() or c == "_"),
    r"\d": lambda c: c in "0123456789",
    r"\s": lambda c: c in ECMA_SPACE,
    ".": lambda c: c not in "\n\r\u2028\u2029",
}


@pytest.mark.parametrize("escape", [r"\w", r"\W", r"\d", r"\D", r"\s", r"\S", ".", r"[\s\S]", r"[^\d]",
                                    r"[a\W]"])
def test_regex_escapes_mean_what_ecma_262_says(escape, tokenizer):
    def ecma(c: str) -> bool:
        if escape in ECMA_MEANING:
            return ECMA_MEANING[escape](c)
        if escape.lower() in ECMA_MEANING:
            return not ECMA_MEANING[escape.lower()](c)
        return {r"[\s\S]": True, r"[^\d]": not ECMA_MEANING[r"\d"](c),
                r"[a\W]": c == "a" or not ECMA_MEANING[r"\w"](c)}[escape]

    pattern = f"^{escape}$"
    constraint = Constraint.from_response_format({"type": "string", "pattern": pattern}, tokenizer)
    for c in PROBE:
        want = ecma(c)
        assert bool(re.search(ecma_regex(pattern), c)) == want, (escape, c)  # the validator
        text = json.dumps(c, ensure_ascii=False)
        assert (constraint.status(text) == "complete") == want, (escape, c)  # the grammar


def test_repeatable_keys_cannot_satisfy_min_properties(tokenizer):
    # llguidance counts keys, not distinct keys: {"x": 1, "x": 2} would pass minProperties 2.
    for schema in ({"type": "object", "minProperties": 2},
                   {"type": "object", "patternProperties": {"^x": {}}, "additionalProperties": False,
                    "minProperties": 2},
                   {"type": "object", "properties": {"a": {}}, "required": ["a"], "minProperties": 3}):
        with pytest.raises(UnsupportedSchemaError, match="'minProperties' at #: .* distinct keys"):
            Constraint.from_response_format(schema, tokenizer)
    # enforceable: every key named, or only one more than those named
    Constraint.from_response_format({"type": "object", "minProperties": 1}, tokenizer)
    Constraint.from_response_format({"type": "object", "properties": {"a": {}, "b": {}},
                                     "required": ["a", "b"], "minProperties": 2}, tokenizer)


def test_bounds_the_engine_cannot_read_exactly_are_refused(tokenizer):
    # serde_json reads 1.9999999999999998 as 2.0, so llguidance would allow "2"
    for key, value in (("maximum", 1.9999999999999998), ("exclusiveMinimum", 1e-30),
                       ("minimum", 2**53 + 1)):
        with pytest.raises(UnsupportedSchemaError, match=f"'{key}' at #: .*cannot read"):
            Constraint.from_response_format({"type": "number", key: value}, tokenizer)
    c = Constraint.from_response_format({"type": "number", "maximum": 1.5}, tokenizer)
    assert c.status("1.5") == "complete" and c.status("2") == "invalid"


def test_meta_schemas_other_than_the_drafts_are_refused(tokenizer):
    schema = {"$schema": "http://localhost:1234/draft2020-12/metaschema-no-validation.json",
              "type": "number"}
    with pytest.raises(UnsupportedSchemaError, match="'\\$schema' at #: unknown meta-schema"):
        Constraint.from_response_format(schema, tokenizer)


def test_exact_decimal_outputs_parse(tokenizer):
    for schema, text in (({"type": "number", "multipleOf": 0.0001}, "0.7404"),
                         ({"type": "number", "exclusiveMaximum": 2}, "1.99999999999999999999")):
        constraint = Constraint.from_response_format(schema, tokenizer)
        assert constraint.status(text) == "complete"
        assert not validation_errors(constraint, text)
        constraint.parse(text)
