"""Coverage of the JSON Schema Test Suite (draft 2020-12) by constrained decoding.

For every distinct schema of the fixture (``tests/fixtures/json_schema_suite/draft2020-12.json``,
the suite's ``tests/draft2020-12/`` with ``optional/``), with the demo model's tokenizer:

* whether it compiles (``Constraint.from_response_format``), or is refused with a clear error (a
  ``ValueError`` naming the keyword and its paths, or saying plainly what is wrong), and which
  keywords are refused most;
* the compile time per schema (median, max; after one warm-up compile that builds the tokenizer's
  grammar-engine vocabulary);
* how the grammar treats the suite's own instances: invalid ones accepted (must be none), valid
  ones accepted (the grammar may be stricter than the schema: property order, closed objects),
  and instances that are invalid only where ``format`` asserts;
* the share of generated outputs that validate (the oracle of ``tests/constrained/test_schema_suite.py``:
  jsonschema 2020-12, format as annotation, exact decimals, ECMA-262 regexes): random walks
  through each grammar (``--walks``), and the demo model (``--n-samples`` per compiled schema,
  temperature 1, ``--max-tokens``); incomplete model outputs are counted apart and must never
  come back parsed.

Prints markdown tables; ``--json PATH`` saves the numbers.

Usage: ``python -m bench.bench_schema_coverage [--n-samples 1] [--walks 10] [--max-tokens 64]
[--json out.json]``
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import statistics
import time
from pathlib import Path

from flashmoe_backend.constrained.constraint import Constraint
from tests.constrained.test_schema_suite import (
    CLEAR_REFUSALS,
    SCHEMAS,
    SUITE,
    exact,
    oracle,
    random_walk,
    validation_errors,
)

ROOT = Path(__file__).resolve().parents[1]


def refusal_kind(exc: ValueError) -> tuple[bool, list[str]]:
    """(clear?, what it refuses: keywords, or a short reason)."""
    message = str(exc)
    keywords = list(getattr(exc, "keywords", ()) or ())
    if keywords:
        return all(f"'{k}' at #" in message for k in keywords), keywords
    for prefix, label in ((CLEAR_REFUSALS[0], "(boolean schema)"),
                          (CLEAR_REFUSALS[1], "(regex Python's re cannot read)"),
                          (CLEAR_REFUSALS[2], "(unsatisfiable schema)")):
        if message.startswith(prefix):
            return True, [label]
    return False, ["(unclear: " + message[:60] + ")"]


def pct(a: int, b: int) -> str:
    return f"{a} / {b} ({100 * a / b:.1f}%)" if b else "0 / 0"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-samples", type=int, default=1,
                    help="demo-model generations per compiled schema (0: none)")
    ap.add_argument("--walks", type=int, default=10, help="random walks per compiled schema")
    ap.add_argument("--walk-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each generation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="save the numbers here")
    args = ap.parse_args(argv)

    from flashmoe_backend import FlashMoE
    from flashmoe_backend.store.source import default_store

    engine = FlashMoE.load(default_store(), cache_gb=1)
    tokenizer = engine.tokenizer
    Constraint.from_response_format({"type": "object"}, tokenizer)  # warm-up: the vocabulary

    # -- compile -------------------------------------------------------------------------------
    compiled: dict[int, Constraint] = {}
    times: list[float] = []
    refused = collections.Counter()
    clear = unclear = 0
    subsets = {"all": SCHEMAS,
               "tests/draft2020-12/*.json": [e for e in SCHEMAS if not e["file"].startswith("optional/")],
               "optional/": [e for e in SCHEMAS if e["file"].startswith("optional/")]}
    unclear_examples = []
    remote_refs = 0
    for entry in SCHEMAS:
        tic = time.perf_counter()
        try:
            compiled[entry["id"]] = Constraint.from_response_format(entry["schema"], tokenizer)
        except ValueError as exc:
            ok, what = refusal_kind(exc)
            clear += ok
            unclear += not ok
            if not ok:
                unclear_examples.append((entry["id"], str(exc)[:200]))
            refused.update(what)
            remote_refs += "got 'http://localhost:1234/" in str(exc)
        times.append(time.perf_counter() - tic)
    json_ids = [i for i, c in compiled.items() if c.kind == "json"]
    not_json = sorted(set(compiled) - set(json_ids))  # a bare True/False: see the test's xfail

    # -- the suite's instances -----------------------------------------------------------------
    counts = collections.Counter()
    by_id = {e["id"]: e for e in SCHEMAS}
    for sid in json_ids:
        entry, constraint = by_id[sid], compiled[sid]
        check = oracle(constraint.schema)
        for kind in ("valid", "invalid", "invalid_if_format_asserted"):
            for value in entry.get(kind, []):
                texts = [json.dumps(value, ensure_ascii=False, separators=s)
                         for s in ((", ", ": "), (",", ":"))]
                accepted = any(constraint.status(t) == "complete" for t in texts)
                counts[kind, "n"] += 1
                counts[kind, "accepted"] += accepted
                if kind != "invalid_if_format_asserted":
                    counts["oracle", "n"] += 1
                    counts["oracle", "agrees"] += check.is_valid(exact(value)) == (kind == "valid")

    # -- random walks --------------------------------------------------------------------------
    walk = collections.Counter()
    walk_bad = []
    for sid in json_ids:
        for w in range(args.walks):
            text = random_walk(compiled[sid], random.Random(args.seed * 10**6 + sid * 1000 + w),
                               args.walk_tokens)
            if text is None:
                walk["unclosed"] += 1
                continue
            walk["complete"] += 1
            errors = validation_errors(compiled[sid], text)
            walk["valid"] += not errors
            if errors:
                walk_bad.append((sid, text[:120], errors[0][:120]))

    # -- the demo model ------------------------------------------------------------------------
    gen = collections.Counter()
    gen_bad = []
    tic = time.perf_counter()
    for k in range(args.n_samples):
        for sid in json_ids:
            entry = by_id[sid]
            result = engine.generate(f"A JSON value: {entry['description']}.\n",
                                     response_format=entry["schema"], max_tokens=args.max_tokens,
                                     temperature=1.0, seed=args.seed * 10**6 + k * 1000 + sid)
            gen["n"] += 1
            if result.finish_reason == "incomplete":
                gen["incomplete"] += 1
                gen["incomplete_parsed"] += result.parsed is not None
                continue
            gen["complete"] += 1
            errors = validation_errors(compiled[sid], result.raw_text)
            gen["valid"] += not errors
            if errors:
                gen_bad.append((sid, result.raw_text[:120], errors[0][:120]))
    gen_seconds = time.perf_counter() - tic

    # -- report --------------------------------------------------------------------------------
    ms = [t * 1000 for t in times]
    ms_ok = [t * 1000 for t, e in zip(times, SCHEMAS, strict=True) if e["id"] in compiled]
    src = SUITE["source"]
    results = {
        "suite": src,
        "machine": f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}",
        "schemas": len(SCHEMAS),
        "compiled": {name: sum(e["id"] in json_ids for e in sub) for name, sub in subsets.items()},
        "subset_sizes": {name: len(sub) for name, sub in subsets.items()},
        "compiled_not_as_json": not_json,
        "refused_clear": clear,
        "refused_unclear": unclear,
        "unclear_examples": unclear_examples,
        "refused_by": refused.most_common(),
        "refused_remote_refs": remote_refs,
        "compile_ms": {"median": statistics.median(ms), "max": max(ms),
                       "median_compiled": statistics.median(ms_ok), "max_compiled": max(ms_ok)},
        "instances": {f"{k}_{m}": v for (k, m), v in counts.items()},
        "walks": dict(walk), "walk_failures": walk_bad,
        "generations": dict(gen), "generation_failures": gen_bad,
        "generation_seconds": gen_seconds,
        "args": vars(args) | {"json": str(args.json) if args.json else None},
    }
    n = len(SCHEMAS)
    rows = [
        ("suite", f"JSON-Schema-Test-Suite {src['draft']} @ {str(src['commit'])[:12]}: {n} distinct "
                  f"schemas from {src['groups']} test groups (with optional/)"),
    ]
    for name, sub in subsets.items():
        rows.append((f"compiled (as a JSON schema): {name}", pct(results["compiled"][name], len(sub))))
    rows += [
        ("refused with a clear error (keyword + path, or the problem named)", pct(clear, n)),
        ("... of which a `$ref` to the suite's remote server (cannot work offline)",
         pct(remote_refs, n)),
        ("refused with an unclear error", pct(unclear, n)),
        ("compiled as something else: the boolean schemas `true`/`false` (a structured.py bug: "
         "they should be refused)", pct(len(not_json), n)),
        ("compile time per schema, median / max (all)",
         f"{results['compile_ms']['median']:.1f} ms / {results['compile_ms']['max']:.1f} ms"),
        ("compile time per compiled schema, median / max",
         f"{results['compile_ms']['median_compiled']:.1f} ms / "
         f"{results['compile_ms']['max_compiled']:.1f} ms"),
        ("suite-invalid instances the grammar accepts (must be 0)",
         pct(counts["invalid", "accepted"], counts["invalid", "n"])),
        ("suite-valid instances the grammar accepts (stricter grammar: key order, closed objects)",
         pct(counts["valid", "accepted"], counts["valid", "n"])),
        ("instances invalid only under format assertion, accepted (formats are approximate)",
         pct(counts["invalid_if_format_asserted", "accepted"], counts["invalid_if_format_asserted", "n"])),
        ("suite instances the oracle classifies as the suite does",
         pct(counts["oracle", "agrees"], counts["oracle", "n"])),
        (f"random walks ({args.walks}/schema, {args.walk_tokens} tokens): complete outputs that validate",
         pct(walk["valid"], walk["complete"]) + f"; {walk['unclosed']} could not close"),
    ]
    if gen["n"]:
        rows += [
            (f"demo model ({args.n_samples}/schema, max_tokens {args.max_tokens}, T=1): "
             "complete outputs that validate", pct(gen["valid"], gen["complete"])),
            ("demo model: incomplete (max_tokens hit mid-structure)", pct(gen["incomplete"], gen["n"])),
            ("demo model: incomplete outputs returned parsed (must be 0)", str(gen["incomplete_parsed"])),
            ("demo model: seconds for all generations", f"{gen_seconds:.1f}"),
        ]
    lines = ["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), "",
             "Refusals by keyword (a schema counts once per keyword it is refused for):", "",
             "| keyword | schemas |", "|---|---|",
             *(f"| `{k}` | {v} |" if not k.startswith("(") else f"| {k} | {v} |"
               for k, v in refused.most_common(20))]
    print("\n".join(lines))
    if walk_bad or gen_bad:
        print("\nFailures:", json.dumps(walk_bad + gen_bad, ensure_ascii=False, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return results


if __name__ == "__main__":
    main()
