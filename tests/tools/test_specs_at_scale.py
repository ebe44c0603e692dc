"""Tool calling at scale: 280+ real-world-style function specs (``tests/fixtures/tool_specs.json``,
built by ``tests/fixtures/build_tool_specs.py``).

1. Every spec normalizes and its forced-call grammar compiles, in both formats (``xml``: Qwen3.5,
   ``hermes``), with the demo tokenizer, and so does a 20-tool union; every compile within a very
   generous bound (speed targets live in ``bench/``). Every string parameter's XML value (the raw
   text terminals the XML format builds itself: length bounds, patterns, formats) can be entered
   and masked.
2. The demo model, at 4 bits (the shipped store) and 2 bits (the shipped store dequantized and
   re-packed, ``train/dequantize_store.py``; built once per session), makes forced calls for a
   sample of the specs: each returned call parses and validates against its parameter schema
   (``jsonschema`` with format checking, ``tests/fixtures/tool_spec_checks.py``), nothing is
   invalid and the finish reason is ``tool_calls``; a call that does not fit in ``max_tokens``
   must end ``incomplete`` with no parsed call, and is counted apart. So is a call the engine
   returns as invalid because it breaks *only* a keyword the engine declares it leaves out of the
   grammar (``uniqueItems``: ``ToolSpec.unenforced``, checked after generation): that is the
   engine's documented contract, not a grammar failure (how often it happens: the benchmark).

``tool_choice="required"`` with the one tool, rather than naming it: with a single tool the two
are the same grammar (checked below), the prompt renders the same tool list, and ``"required"``
is the mode agents use when any of their tools will do. ``parallel_tool_calls=False``: one call
is what is asked for, and the demo model likes to add a second one that would cost tokens.

All 286 at both widths take ~35 minutes here (mostly prefill of the ~400-800-token prompts):
``bench/bench_tool_specs.py`` runs them (results: ``bench/results/tool_specs.md``); this file
samples 5 per width (~3-8 s a call) to stay within ~90 s.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fixtures import build_tool_specs
from tests.fixtures import tool_spec_checks as checks

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

SPECS = checks.load_specs()
FORMATS = ("xml", "hermes")
# Generous: a compile takes milliseconds; this only catches a pathological blow-up.
COMPILE_BOUND_S = 2.0
UNION_BOUND_S = 10.0
# Model calls: an evenly spread sample per bit width (different specs at each width).
SAMPLE_PER_WIDTH = 5
MAX_TOKENS = 160  # most calls fit (bench: p50 64 tokens); ramblers are closed at the limit
MAX_INCOMPLETE_SHARE = 0.4


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_lm.utils import load_tokenizer

    from flashmoe_backend.store.source import default_store

    return load_tokenizer(default_store())


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "'uniqueItems' ... is not enforced" notes
        yield


# -- 1. the specs and their grammars --------------------------------------------------------------


def test_fixture_is_built_by_its_generator_and_is_varied():
    assert (FIXTURES / "tool_specs.json").read_text() == build_tool_specs.render(), (
        "tool_specs.json is stale: run python tests/fixtures/build_tool_specs.py")
    names = [checks.tool_name(t) for t in SPECS]
    assert len(names) >= 220 and len(set(names)) == len(names)
    text = json.dumps(SPECS)
    for needle in ('"enum"', '"format": "date"', '"format": "date-time"', '"format": "email"',
                   '"format": "uri"', '"pattern"', '"minLength"', '"maxLength"', '"minimum"',
                   '"multipleOf"', '"uniqueItems"', '"anyOf"', '"null"]', '"$ref"', '"$defs"',
                   '"minItems"', '"maxItems"', '"type": "boolean"', '"type": "number"'):
        assert needle in text, needle


def test_every_spec_normalizes_and_compiles_in_both_formats(tokenizer):
    from flashmoe_backend.tools.calls import normalize_tools, tool_call_constraint

    with _quiet():
        specs = normalize_tools(SPECS)
        slow = []
        for fmt in FORMATS:
            for spec in specs:
                tic = time.perf_counter()
                c = tool_call_constraint([spec], "required", fmt, tokenizer)
                took = time.perf_counter() - tic
                assert c.kind == "tool_calls"
                if took > COMPILE_BOUND_S:
                    slow.append(f"{fmt} {spec.name}: {took:.2f}s")
    assert not slow, slow
    assert len(specs) == len(SPECS)


def test_required_with_one_tool_is_the_named_tool_grammar():
    from flashmoe_backend.tools.grammar import tool_call_grammar

    with _quiet():
        for tool in checks.sample(SPECS, 12):
            for fmt in FORMATS:
                assert (tool_call_grammar([tool], "required", fmt)
                        == tool_call_grammar([tool], checks.tool_name(tool), fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_20_tool_union_compiles(tokenizer, fmt):
    from flashmoe_backend.tools.calls import tool_call_constraint

    with _quiet():
        for tools in (SPECS[:20], checks.sample(SPECS, 20)):
            tic = time.perf_counter()
            tool_call_constraint(tools, "required", fmt, tokenizer)
            assert time.perf_counter() - tic < UNION_BOUND_S


def _strip_descriptions(node):
    if isinstance(node, dict):
        return {k: _strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip_descriptions(v) for v in node]
    return node


def _xml_string_schemas() -> dict[str, tuple[dict, dict | None, str]]:
    """Distinct string(-or-null) parameter schemas (descriptions aside), with the $defs of their
    tool and one tool/parameter that uses them."""
    from flashmoe_backend.tools.xml import string_branches

    out: dict[str, tuple[dict, dict | None, str]] = {}
    for tool in SPECS:
        params = tool["function"]["parameters"]
        for pname, schema in params.get("properties", {}).items():
            if string_branches(schema, params) is None:
                continue
            key = json.dumps(_strip_descriptions(schema), sort_keys=True)
            out.setdefault(key, (schema, params.get("$defs"), f"{checks.tool_name(tool)}.{pname}"))
    return out


def test_every_xml_string_value_can_be_entered_and_masked(tokenizer):
    """The XML format writes string values as raw text with terminals of its own (length bounds,
    patterns, formats intersected with 'no closing tag'); llguidance builds their lexer states
    lazily, so a terminal that compiles can still fail at the first mask inside the value."""
    from flashmoe_backend.tools.calls import tool_call_constraint

    failed = []
    for key, (schema, defs, where) in _xml_string_schemas().items():
        params = {"type": "object", "properties": {"v": schema}, "required": ["v"]}
        if defs:
            params["$defs"] = defs
        c = tool_call_constraint([{"name": "t", "parameters": params}], "required", "xml", tokenizer)
        proc = c.logits_processor()
        assert proc.advance_text("<tool_call>\n<function=t>\n<parameter=v>\n"), where
        try:
            assert proc.allowed_token_ids(), f"{where}: no token allowed"
        except Exception as exc:  # every failure is listed below
            failed.append(f"{where} {key}: {str(exc).splitlines()[0][:120]}")
    assert not failed, f"{len(failed)} string schemas fail at their first mask:\n" + "\n".join(failed)


# -- 2. the demo model's forced calls -------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_store_2bit(tmp_path_factory) -> Path:
    """The shipped 4-bit demo store dequantized and re-packed at 2 bits (a few seconds)."""
    from flashmoe_backend.store.source import default_store
    from train.dequantize_store import requantize_store

    return requantize_store(default_store(), tmp_path_factory.mktemp("demo-2bit") / "store",
                            bits=2, group_size=32, dtype="float32")


def test_dequantized_demo_checkpoint_is_the_4bit_model(tmp_path):
    """The premise of the 2-bit store: the float checkpoint rebuilt from the shipped store is
    the 4-bit model exactly (same logits), so re-packing it quantizes the shipped weights."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from flashmoe_backend import FlashMoE
    from flashmoe_backend.store.source import default_store
    from train.dequantize_store import dequantize_store

    ckpt = dequantize_store(default_store(), tmp_path / "float")
    assert "quantization" not in json.loads((ckpt / "config.json").read_text())
    model, _ = load_model(ckpt)
    engine = FlashMoE.load(default_store(), cache_gb=0.05)
    try:
        ids = mx.array([[5, 100, 200, 300, 400, 500, 600, 700, 42, 17]])
        assert mx.abs(model(ids) - engine.model(ids)).max().item() < 1e-4
    finally:
        engine.close()


def _store(bits: int, request) -> Path:
    from flashmoe_backend.store.source import default_store

    return default_store() if bits == 4 else request.getfixturevalue("demo_store_2bit")


def _sample_for(bits: int) -> list[dict]:
    """Evenly spread over the specs, shifted by half a step at 2 bits (so 2x the coverage)."""
    step = len(SPECS) / SAMPLE_PER_WIDTH
    shift = 0 if bits == 4 else step / 2
    return [SPECS[int(i * step + shift)] for i in range(SAMPLE_PER_WIDTH)]


def test_demo_model_samples_are_distinct():
    names4 = {checks.tool_name(t) for t in _sample_for(4)}
    names2 = {checks.tool_name(t) for t in _sample_for(2)}
    assert len(names4) == len(names2) == SAMPLE_PER_WIDTH and not names4 & names2


@pytest.mark.parametrize("bits", [4, 2])
def test_demo_model_forced_calls_validate(bits, request):
    from flashmoe_backend import FlashMoE
    from flashmoe_backend.tools.specs import normalize_tools

    engine = FlashMoE.load(_store(bits, request), cache_gb=0.05)
    outcomes = []
    try:
        for tool in _sample_for(bits):
            with _quiet():
                unenforced = checks.unenforced_keywords(normalize_tools([tool])[0])
                tic = time.perf_counter()
                try:
                    r = engine.generate(checks.prompt_for(tool), tools=[tool], tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=MAX_TOKENS,
                                        enable_thinking=False)
                    outcomes.append(checks.classify(tool, r, time.perf_counter() - tic, unenforced))
                except Exception as exc:  # reported with the others below
                    outcomes.append(checks.error_outcome(tool, exc, time.perf_counter() - tic, unenforced))
    finally:
        engine.close()
    counts = Counter(o.kind for o in outcomes)
    report = "\n".join(f"  {o.name}: {o.kind} ({o.tokens} tokens, {o.seconds:.1f}s) {o.reason}"
                       f"{' raw=' + repr(o.raw_text[-200:]) if o.kind == 'invalid' else ''}"
                       for o in outcomes)
    print(f"{bits}-bit: {dict(counts)}\n{report}")
    bad = [o for o in outcomes if o.kind not in ("valid", "incomplete", "unenforced")]
    assert not bad, f"{bits}-bit: {len(bad)} of {len(outcomes)} forced calls failed:\n{report}"
    assert counts["incomplete"] <= MAX_INCOMPLETE_SHARE * len(outcomes), report
    for o in outcomes:
        if o.kind == "incomplete":
            assert o.finish_reason == "incomplete" and not o.arguments
