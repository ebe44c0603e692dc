"""Evaluate a trained demo checkpoint through the flashmoe engine, at several expert bit widths.

    python train/evaluate.py --hf CHECKPOINT [--bits 8,4,2] [--n 30] [--out report.md]
    python train/evaluate.py --store STORE [--store STORE2 ...] [--n 30] [--out report.md]

For each bit width the Hugging Face checkpoint is packed into a store
(``flashmoe_backend.pack(hf, store, PackOptions(bits=b, group_size=...))``); ``--store`` instead
evaluates existing stores as they are (each row is labelled with its experts' bit width from the
manifest), so that two engines can be compared on the very same stores. ``--hf`` also takes a
float checkpoint rebuilt from a store by ``train/dequantize_store.py``. Each store is loaded with
``FlashMoE.load(store, cache_gb=...)`` and run greedily (``enable_thinking=False``) on held-out
conversations of :mod:`train.data` (a seed no training run uses):

* QA: exact match of the reply with the answer span (and whether the reply contains it);
* tool calls, three ways: ``free`` (the prompt rendered with the tools and decoded with no
  constraint; the XML ``<tool_call>`` parsed from the raw text), ``auto`` (``tools=``, the engine's
  default ``tool_choice="auto"``: free text, grammar once a call opens) and ``required``
  (``tool_choice="required"``: the call forced by a grammar); name accuracy and name + arguments
  accuracy (all calls of the turn right), and for the final turn (after the tool result) exact
  match of the answer;
* JSON extraction, ``free`` and constrained (``response_format=schema``): valid JSON, exact object
  match, field accuracy;
* chat: exact match of short replies;

each with the mean decode speed (``result.stats.generation_tps``) beside it. Writes a markdown table
(``--out``) and the raw numbers as JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from train import data

HELD_OUT_SEED = 1_000_003  # the same as train.train.HELD_OUT_SEED (not imported: needs torch)


class Cell:
    """Accumulates scores and decode speeds of one (bits, task) cell."""

    def __init__(self) -> None:
        self.scores: dict[str, list[float]] = {}
        self.tps: list[float] = []
        self.examples: list[dict] = []

    def add(self, tps: float, example: dict | None = None, **scores: float) -> None:
        for k, v in scores.items():
            self.scores.setdefault(k, []).append(float(v))
        if tps:
            self.tps.append(tps)
        failed = not all(scores.values())
        if example is not None and (len(self.examples) < 3 or failed):  # the failures, for diagnosis
            self.examples.append({**example, "failed": failed})

    def summary(self) -> dict:
        out = {k: sum(v) / len(v) for k, v in self.scores.items() if v}
        out["n"] = max((len(v) for v in self.scores.values()), default=0)
        out["tok_s"] = sum(self.tps) / len(self.tps) if self.tps else 0.0
        return out


def _calls_from_result(result) -> list[dict]:
    calls = getattr(result, "tool_calls", None) or []
    out = []
    for c in calls:
        if hasattr(c, "name"):
            out.append({"name": c.name, "arguments": dict(c.arguments)})
        elif isinstance(c, dict):
            fn = c.get("function", c)
            args = fn.get("arguments", {})
            args = json.loads(args) if isinstance(args, str) else args
            out.append({"name": fn.get("name"), "arguments": args})
    return out


def _score_calls(got: list[dict], want: list[dict]) -> tuple[float, float]:
    if len(got) != len(want):
        return 0.0, 0.0
    names = all(g["name"] == w["name"] for g, w in zip(got, want, strict=True))
    full = names and all(data.args_match(g["arguments"], w["arguments"])
                         for g, w in zip(got, want, strict=True))
    return float(names), float(full)


def evaluate_store(engine, tokenizer, n: int, kinds: list[str], max_tokens: int, log) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}

    def cell(name: str) -> Cell:
        return cells.setdefault(name, Cell())

    has_tools = "tool_choice" in engine.stream.__code__.co_varnames
    if "qa" in kinds:
        for ex in data.examples(HELD_OUT_SEED, n, kind="qa"):
            r = engine.generate(ex.prompt_messages(), max_tokens=48, enable_thinking=False)
            got, want = r.text.strip(), ex.meta["answer"]
            cell("qa").add(r.stats.generation_tps, {"q": ex.meta["question"], "got": got, "want": want},
                           exact=got == want, contains=want in got)
    if "tool" in kinds:
        i = 0
        tool_examples = []
        while len(tool_examples) < n:  # only requests that need a tool
            ex = data.example(HELD_OUT_SEED, i, kind="tool")
            i += 1
            if ex.meta["calls"]:
                tool_examples.append(ex)
        for ex in tool_examples:
            msgs, want = ex.prompt_messages(), ex.meta["calls"]
            prompt = tokenizer.apply_chat_template(msgs, tools=ex.tools, add_generation_prompt=True,
                                                   enable_thinking=False, tokenize=False)
            r = engine.generate(prompt, max_tokens=max_tokens, enable_thinking=False)
            got = data.parse_xml_tool_calls(r.raw_text or r.text)
            name, full = _score_calls(got, want)
            cell("tool_free").add(r.stats.generation_tps, {"request": ex.meta["request"], "got": got,
                                                           "want": want}, name=name, args=full)
            if has_tools:
                for mode in ("auto", "required"):
                    r = engine.generate(msgs, tools=ex.tools, tool_choice=mode, max_tokens=max_tokens,
                                        enable_thinking=False)
                    got = _calls_from_result(r)
                    name, full = _score_calls(got, want)
                    cell(f"tool_{mode}").add(r.stats.generation_tps, {"got": got, "want": want},
                                             name=name, args=full)
            final_turn = ex.train_turns[-1] if len(ex.train_turns) > 1 else len(ex.messages) - 1
            fmsgs = ex.messages[:final_turn]
            prompt = tokenizer.apply_chat_template(fmsgs, tools=ex.tools, add_generation_prompt=True,
                                                   enable_thinking=False, tokenize=False)
            r = engine.generate(prompt, max_tokens=max_tokens, enable_thinking=False)
            got, want_final = r.text.strip(), ex.messages[final_turn]["content"]
            cell("tool_final").add(r.stats.generation_tps, {"got": got, "want": want_final},
                                   exact=got == want_final)
    if "json" in kinds:
        for ex in data.examples(HELD_OUT_SEED, n, kind="json"):
            msgs, want, schema = ex.prompt_messages(), ex.meta["object"], ex.meta["schema"]
            modes = [("json_free", None)] + ([("json_constrained", schema)] if has_tools else [])
            for name, rf in modes:
                kwargs = {"response_format": rf} if rf is not None else {}
                r = engine.generate(msgs, max_tokens=max_tokens, enable_thinking=False, **kwargs)
                text = r.text.strip()
                try:
                    obj = json.loads(text)
                    valid = isinstance(obj, dict)
                except (json.JSONDecodeError, ValueError):
                    obj, valid = None, False
                fields = (sum(1 for k, v in want.items() if isinstance(obj, dict) and obj.get(k) == v)
                          / max(len(want), 1))
                cell(name).add(r.stats.generation_tps, {"got": text, "want": want},
                               valid=valid, exact=obj == want, fields=fields)
    if "chat" in kinds:
        for ex in data.examples(HELD_OUT_SEED, n, kind="chat"):
            r = engine.generate(ex.prompt_messages(), max_tokens=48, enable_thinking=False)
            got, want = r.text.strip(), ex.meta["reply"]
            cell("chat").add(r.stats.generation_tps, {"got": got, "want": want}, exact=got == want)
    for name, c in cells.items():
        log(f"  {name}: {json.dumps({k: round(v, 3) for k, v in c.summary().items()})}")
    return cells


COLUMNS = [
    ("qa", "exact", "QA exact match"),
    ("tool_free", "name", "tool name (free)"),
    ("tool_free", "args", "tool name+args (free)"),
    ("tool_auto", "args", "tool name+args (auto)"),
    ("tool_required", "args", "tool name+args (required)"),
    ("tool_final", "exact", "answer after tool result"),
    ("json_free", "valid", "JSON valid (free)"),
    ("json_free", "exact", "JSON exact (free)"),
    ("json_constrained", "valid", "JSON valid (constrained)"),
    ("json_constrained", "exact", "JSON exact (constrained)"),
    ("chat", "exact", "chat exact"),
]


def markdown(results: dict[int, dict[str, dict]], meta: dict) -> str:
    title = meta["hf"] or ", ".join(str(s) for s in meta.get("stores", {}).values())
    lines = [f"# Demo model evaluation: {title}", "",
             f"Held-out seed {HELD_OUT_SEED}, {meta['n']} conversations per task, greedy decoding, "
             f"enable_thinking=False, "
             + (f"group size {meta['group_size']}" if meta.get("group_size") else "stores as packed")
             + f", cache {meta['cache_gb']} GiB, engine {meta.get('engine', 'flashmoe_backend')}. "
             "Each cell: score (mean decode tok/s).", ""]
    present = [(t, k, title) for t, k, title in COLUMNS
               if any(t in r and k in r[t] for r in results.values())]
    lines.append("| bits | " + " | ".join(title for _, _, title in present) + " |")
    lines.append("|---|" + "---|" * len(present))
    for bits, r in results.items():
        cells = []
        for t, k, _ in present:
            s = r.get(t)
            cells.append(f"{s[k]:.0%} ({s['tok_s']:.0f})" if s and k in s else "-")
        lines.append(f"| {bits} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", type=Path, default=None, help="the trained Hugging Face checkpoint")
    p.add_argument("--store", type=Path, action="append", default=None,
                   help="evaluate this existing store as it is (repeatable; replaces --hf/--bits)")
    p.add_argument("--bits", default="8,4,2")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--dtype", default=None, help="float dtype of the packed resident weights")
    p.add_argument("--n", type=int, default=30, help="conversations per task")
    p.add_argument("--kinds", default="qa,tool,json,chat")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--cache-gb", type=float, default=1.0)
    p.add_argument("--stores", type=Path, default=None, help="keep the packed stores here")
    p.add_argument("--out", type=Path, default=Path("demo_eval.md"))
    args = p.parse_args(argv)
    if (args.hf is None) == (args.store is None):
        p.error("give either --hf CHECKPOINT or --store STORE")

    import flashmoe_backend
    from flashmoe_backend import FlashMoE, PackOptions, pack

    root = args.stores or Path(tempfile.mkdtemp(prefix="flashmoe-eval-"))
    if args.store is not None:
        targets = [(_store_label(s), s) for s in args.store]
    else:
        text_config = json.loads((args.hf / "config.json").read_text()).get("text_config", {})
        for key in ("hidden_size", "moe_intermediate_size"):
            if text_config.get(key, 0) % args.group_size:
                print(f"warning: --group-size {args.group_size} does not divide {key}={text_config[key]}: "
                      "mlx-lm leaves those expert matrices unquantized", flush=True)
        targets = [(int(b), root / f"store-{int(b)}bit") for b in args.bits.split(",")]
    kinds = args.kinds.split(",")
    results: dict[int | str, dict[str, dict]] = {}
    samples: dict[int | str, dict[str, list]] = {}
    for bits, store in targets:
        if args.store is None and not (store / "manifest.json").is_file():
            shutil.rmtree(store, ignore_errors=True)
            pack(args.hf, store, PackOptions(bits=bits, group_size=args.group_size, dtype=args.dtype,
                                             progress=False))
        engine = FlashMoE.load(store, cache_gb=args.cache_gb)
        tic = time.time()
        print(f"{bits}-bit experts ({store}):", flush=True)
        cells = evaluate_store(engine, engine.tokenizer, args.n, kinds, args.max_tokens,
                               lambda s: print(s, flush=True))
        engine.close()
        results[bits] = {k: c.summary() for k, c in cells.items()}
        samples[bits] = {k: c.examples for k, c in cells.items()}
        print(f"  ({time.time() - tic:.0f}s)", flush=True)
    meta = {"hf": str(args.hf) if args.hf else None, "n": args.n,
            "group_size": args.group_size if args.hf else None, "cache_gb": args.cache_gb,
            "dtype": args.dtype, "engine": str(Path(flashmoe_backend.__file__).parent),
            "stores": {str(b): str(s) for b, s in targets}}
    text = markdown(results, meta)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results,
                                                         "samples": samples}, indent=1, default=str))
    print(text)
    if args.stores is None:
        shutil.rmtree(root, ignore_errors=True)
    return results


def _store_label(store: Path) -> int | str:
    """The experts' bit width of a store (its manifest), the row label of ``--store``."""
    manifest = json.loads((store / "manifest.json").read_text())
    bits = {(layer.get("quantization") or {}).get("bits", 16) for layer in manifest["layers"]}
    return bits.pop() if len(bits) == 1 else store.name


if __name__ == "__main__":
    main()
