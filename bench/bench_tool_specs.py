"""Forced tool calls for every spec of ``tests/fixtures/tool_specs.json`` on the demo model.

    python -m bench.bench_tool_specs [--bits 4,2] [--max-tokens 256] [--limit N] [--walk]
                                     [--json PATH] [--out bench/results/tool_specs.md]

For each bit width: the store (4 bits: the shipped demo store; any other width: the shipped store
dequantized and re-packed at that width by ``train/dequantize_store.py``, since the trained float
checkpoint is not in the repository) is loaded with ``FlashMoE.load``, and every tool is called
alone, ``tool_choice="required"`` (with one tool that is the same grammar as naming it),
``parallel_tool_calls=False``, greedy, ``enable_thinking=False``, with a prompt that asks for it.
Each call is classified by ``tests/fixtures/tool_spec_checks.py``: *valid* (calls returned,
nothing invalid, finish reason ``tool_calls``, every call valid against its parameter schema
with format checking, checked again independently of the engine), *incomplete* (finish reason
``incomplete``, no call returned: it did not fit in ``--max-tokens``), *invalid* (anything else
returned) or *error* (the generation raised).

``--walk`` adds a model-free pass over both formats (``xml``, ``hermes``): each tool's grammar
walked with seeded random logits through the engine's logits processor up to ``--max-tokens``
(the processor's steering closes the call before the limit where it can), and the text parsed
and validated the same way. It reaches values a tiny model never writes (long strings, big
numbers).

The markdown goes to ``--out`` (and stdout); ``--json`` saves every outcome.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from tests.fixtures import tool_spec_checks as checks

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("valid", "incomplete", "unenforced", "invalid", "error")


def store_for(bits: int, work: Path) -> Path:
    from flashmoe_backend.store.source import default_store
    from train.dequantize_store import requantize_store

    if bits == 4:
        return default_store()
    dst = work / f"store-{bits}bit"
    if not (dst / "manifest.json").is_file():
        requantize_store(default_store(), dst, bits=bits, group_size=32, dtype="float32")
    return dst


def run_model(specs: list[dict], bits: int, store: Path, max_tokens: int, log) -> list[dict]:
    from flashmoe_backend import FlashMoE
    from flashmoe_backend.tools.specs import normalize_tools

    engine = FlashMoE.load(store, cache_gb=0.05)
    outcomes = []
    try:
        for i, tool in enumerate(specs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                unenforced = checks.unenforced_keywords(normalize_tools([tool])[0])
                tic = time.perf_counter()
                try:
                    r = engine.generate(checks.prompt_for(tool), tools=[tool], tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=max_tokens, temperature=0.0,
                                        enable_thinking=False)
                    out = checks.classify(tool, r, time.perf_counter() - tic, unenforced)
                except Exception as exc:  # the engine raised: recorded, the run goes on
                    out = checks.error_outcome(tool, exc, time.perf_counter() - tic, unenforced)
            outcomes.append({"bits": bits, **out.to_dict()})
            if out.kind != "valid":
                log(f"  [{bits}-bit {i + 1}/{len(specs)}] {out.name}: {out.kind} {out.reason[:160]}")
    finally:
        engine.close()
    return outcomes


def walk(specs: list[dict], fmt: str, max_tokens: int, log) -> list[dict]:
    """Each tool's grammar walked with seeded random logits (no model)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_tokenizer

    from flashmoe_backend.store.source import default_store
    from flashmoe_backend.tools.calls import normalize_tools, parse_tool_calls, tool_call_constraint

    tokenizer = load_tokenizer(default_store())
    outcomes = []
    for i, tool in enumerate(specs):
        name = checks.tool_name(tool)
        tic = time.perf_counter()
        ids: list[int] = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = tool_call_constraint([tool], "required", fmt, tokenizer, parallel=False)
            proc = c.logits_processor(max_tokens)
            vocab = c.vocabulary
            rng = np.random.default_rng(i)
            context = [vocab.eos_token_id]  # stands for the prompt: the first call skips it
            for _ in range(max_tokens):
                logits = mx.array(rng.standard_normal((1, vocab.size)).astype(np.float32) * 3)
                t = int(mx.argmax(proc(mx.array(context + ids), logits), axis=-1).item())
                ids.append(t)
                if t in vocab.eos_token_ids:
                    break
            if ids and ids[-1] not in vocab.eos_token_ids:
                proc(mx.array(context + ids), mx.zeros((1, vocab.size)))  # consume the last token
            text = vocab.decode_bytes([t for t in ids if t not in vocab.eos_token_ids]).decode("utf-8")
            if not proc.is_complete:
                kind, reason = "incomplete", ""
            else:
                params = tool["function"]["parameters"]
                _, calls, invalid = parse_tool_calls(text, fmt, [tool])
                problems = [e for c_ in calls for e in checks.schema_errors(c_.arguments, params)]
                problems += [c_.error for c_ in invalid]
                kind = "valid" if calls and not problems else "invalid"
                reason = "; ".join(problems) if problems else ("" if calls else "no call parsed")
                unenforced = checks.unenforced_keywords(normalize_tools([tool])[0])
                if invalid and not problems[:-len(invalid)] and all(
                        checks.only_unenforced(c_, params, unenforced) for c_ in invalid):
                    kind = "unenforced"
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            kind, reason, text = "error", f"{type(exc).__name__}: {first}", ""
        out = {"format": fmt, "name": name, "kind": kind, "reason": reason, "tokens": len(ids),
               "seconds": time.perf_counter() - tic, "raw_text": text}
        outcomes.append(out)
        if kind not in ("valid", "incomplete", "unenforced"):
            log(f"  [walk {fmt} {i + 1}/{len(specs)}] {name}: {kind} {reason[:160]}")
    return outcomes


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary_rows(outcomes: list[dict], key: str) -> list[str]:
    rows = ["| " + key + " | tools | valid | incomplete | unenforced | invalid | error | valid of complete | "
            "tokens mean / p95 | s per call |", "|---|---|---|---|---|---|---|---|---|---|"]
    for group in sorted({o[key] for o in outcomes}, key=str):
        sel = [o for o in outcomes if o[key] == group]
        n = Counter(o["kind"] for o in sel)
        complete = len(sel) - n["incomplete"]
        toks = [o["tokens"] for o in sel]
        rows.append(f"| {group} | {len(sel)} | " + " | ".join(str(n[k]) for k in KINDS)
                    + f" | {n['valid'] / complete:.1%} | {statistics.mean(toks):.0f} / {_pct(toks, .95):.0f}"
                    f" | {statistics.mean(o['seconds'] for o in sel):.2f} |")
    return rows


def _signature(reason: str) -> str:
    """A failure reason without what varies from call to call (token ids, values, tool names)."""
    reason = re.sub(r"token \d+ \(b?'.*?'\)", "token T", reason)
    reason = re.sub(r"schema of '[^']+'", "schema of TOOL", reason)
    head, sep, tail = reason.partition(" at ")
    if not sep:
        return reason[:200]
    m = re.search(r"(has non-unique elements|is not of type '[^']+'|is too (long|short)|is not a '[^']+'"
                  r"|is a required property|does not match .*|is (greater|less) than.*|is not one of.*)$",
                  tail)
    return (head + " at PATH: VALUE " + (m.group(1) if m else "..." + tail[-32:]))[:200]


def failures(outcomes: list[dict], key: str, kinds: tuple[str, ...] = ("invalid", "error")) -> list[str]:
    """Failures grouped by reason (with the tools that hit it)."""
    bad = [o for o in outcomes if o["kind"] in kinds]
    if not bad:
        return ["None."]
    groups: dict[tuple, list[dict]] = {}
    for o in bad:
        groups.setdefault((o[key], o["kind"], _signature(o["reason"])), []).append(o)
    lines = [f"| {key} | kind | calls | reason | tools |", "|---|---|---|---|---|"]
    for (group, kind, sig), sel in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), -len(kv[1]))):
        names = ", ".join(f"`{o['name']}`" for o in sel[:12])
        names += f" and {len(sel) - 12} more" if len(sel) > 12 else ""
        lines.append(f"| {group} | {kind} | {len(sel)} | {sig.replace('|', '/')} | {names} |")
    return lines


def examples(outcomes: list[dict], key: str, kinds: tuple[str, ...], n: int = 3) -> list[str]:
    """The raw text of a few failures of each kind that is not a grammar error."""
    out = []
    for o in [o for o in outcomes if o["kind"] in kinds][:n]:
        out += [f"* {o[key]} `{o['name']}` ({o['kind']}): {o['reason'][:300]}", "",
                "  ```", "  " + o["raw_text"][-400:].replace("\n", "\n  "), "  ```", ""]
    return out


def markdown(model: list[dict], walked: list[dict], meta: dict) -> str:
    lines = ["# Forced tool calls for 200+ real-world-style specs (demo model)", "",
             f"`{meta['command']}`", "",
             f"{meta['tools']} tools from `tests/fixtures/tool_specs.json`, each called alone with "
             f"`tool_choice=\"required\"`, `parallel_tool_calls=False`, greedy, max_tokens "
             f"{meta['max_tokens']}; each call validated again with jsonschema + format checks "
             "(`tests/fixtures/tool_spec_checks.py`). *valid of complete*: valid / (tools - "
             "incomplete). 4 bits: the shipped store; other widths: the shipped store dequantized "
             "and re-packed (`train/dequantize_store.py`). llguidance "
             f"{meta.get('llguidance', '?')}, {meta['date']}.", ""]
    if model:
        lines += ["## Demo model (XML tool calls)", ""] + summary_rows(model, "bits") + [""]
        lines += ["Failures (invalid / error), grouped by reason:", ""] + failures(model, "bits") + [""]
        lines += examples(model, "bits", ("invalid",))
        lines += ["Calls the engine returned as invalid for a keyword it declares unenforced "
                  "(`uniqueItems`):", ""] + failures(model, "bits", kinds=("unenforced",)) + [""]
        inc = [o for o in model if o["kind"] == "incomplete"]
        if inc:
            lines += ["Incomplete (did not fit): " + ", ".join(
                f"`{o['name']}` ({o['bits']}-bit)" for o in inc), ""]
    if walked:
        lines += ["## Grammar walk with random logits (no model)", ""] + summary_rows(walked, "format")
        lines += ["", "Failures (invalid / error), grouped by reason:", ""]
        lines += failures(walked, "format") + [""]
        lines += examples(walked, "format", ("invalid",))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="4,2", help="bit widths of the demo store (comma-separated)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="only this many specs (spread evenly)")
    p.add_argument("--only", default=None, help="only these tools (comma-separated names)")
    p.add_argument("--walk", action="store_true", help="also walk every grammar with random logits")
    p.add_argument("--walk-only", action="store_true", help="only the grammar walk")
    p.add_argument("--stores", type=Path, default=None, help="keep re-packed stores here")
    p.add_argument("--json", type=Path, default=None, help="save every outcome as JSON")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tool_specs.md")
    p.add_argument("--from-json", type=Path, default=None, help="only re-render a saved --json run")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        text = markdown(saved["model"], saved["walk"], saved["meta"])
        args.out.write_text(text)
        print(text)
        return saved

    import llguidance

    specs = checks.load_specs()
    if args.limit:
        specs = checks.sample(specs, args.limit)
    if args.only:
        names = set(args.only.split(","))
        specs = [s for s in specs if checks.tool_name(s) in names]
        if missing := names - {checks.tool_name(s) for s in specs}:
            p.error(f"--only: no such tool(s) in the fixture: {', '.join(sorted(missing))}")

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    model: list[dict] = []
    walked: list[dict] = []
    work = args.stores or Path(tempfile.mkdtemp(prefix="flashmoe-tool-specs-"))
    if not args.walk_only:
        for bits in (int(b) for b in args.bits.split(",")):
            tic = time.time()
            model += run_model(specs, bits, store_for(bits, work), args.max_tokens, log)
            log(f"{bits}-bit: {time.time() - tic:.0f}s")
    if args.walk or args.walk_only:
        for fmt in ("xml", "hermes"):
            tic = time.time()
            walked += walk(specs, fmt, args.max_tokens, log)
            log(f"walk {fmt}: {time.time() - tic:.0f}s")
    meta = {"command": " ".join(["python -m bench.bench_tool_specs", *(argv or sys.argv[1:])]),
            "tools": len(specs), "max_tokens": args.max_tokens, "date": time.strftime("%Y-%m-%d"),
            "llguidance": getattr(llguidance, "__version__", None) or llguidance.get_version()}
    text = markdown(model, walked, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "model": model, "walk": walked}, indent=1))
    return {"model": model, "walk": walked}


if __name__ == "__main__":
    main()
