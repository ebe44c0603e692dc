"""Benchmark of constrained decoding (flashmoe_backend.structured): compile and per-token cost.

What it measures (prints one markdown table per part; ``--json PATH`` also saves the numbers):

1. **Index compilation** for a Pydantic schema and the XML / Hermes tool-call grammars, against
   (a) the tiny fixture tokenizer (~512 tokens) and (b) a synthetic byte-level vocabulary of
   248,320 tokens (Qwen3.5's size; random substrings of a fixed text corpus, so the cost scales
   like a real vocabulary's without needing the real tokenizer). For each: the first compile
   (no cache), a memory-cache hit, and a disk-cache hit (memory cache cleared).
2. **Decode overhead on the tiny model**: seconds per decoded token (after the first token, so
   prefill is excluded) with no processor, and with the constraint processor for a dense mask
   (free text: almost every token allowed) and a sparse one (digits only). This includes the
   host sync the processor needs each step to read the sampled token.
3. **The processor alone at a realistic logits width** (248,320): one call = read the new
   token, advance the guide, write its bitmask, expand it to a ``0``/``-inf`` bias, add it to
   random logits and evaluate. Run on the tiny tokenizer's index (the mask work depends on the
   logits width, not on the index) for the numpy bias path (used on CPU) and the on-device MLX
   path (used on GPUs), plus the same with the synthetic 248k-token index (dense mask).

Decode steps of the target model (Qwen3.5-397B streaming experts) take hundreds of ms, so part 3
divided by that step time is the real share of constrained decoding.

Usage: ``python bench/bench_structured.py [--bits 4] [--tokens 64] [--json out.json]``
(needs torch to build the tiny checkpoint unless ``--model DIR`` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashmoe_backend import structured as st  # noqa: E402
from flashmoe_backend import vocabulary as voc  # noqa: E402
from flashmoe_backend.json_schema import schema_to_regex  # noqa: E402
from flashmoe_backend.tool_calls import tool_call_regex  # noqa: E402

QWEN35_VOCAB = 248_320

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["buy", "sell"]},
        "qty": {"type": "integer", "minimum": 1, "maximum": 100},
        "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        "note": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
        "ship_to": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"]},
    },
    "required": ["kind", "qty", "price", "tags", "ship_to"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {
            "query": {"type": "string"},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 50},
            "filters": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
        "required": ["query"]}}},
]


def _table(title: str, header: list[str], rows: list[list]) -> str:
    out = [f"\n### {title}\n", "| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(x) for x in r) + " |")
    return "\n".join(out)


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def synthetic_vocabulary(size: int = QWEN35_VOCAB, seed: int = 0) -> voc.Vocabulary:
    """A byte-level vocabulary of ``size`` tokens: the 256 bytes plus distinct random substrings
    (1-12 bytes, word-aligned half of the time) of Python sources from the standard library."""
    import email
    import json as _json
    import logging

    corpus = b""
    for mod in (email, _json, logging):
        for f in sorted(Path(mod.__file__).parent.glob("*.py")):
            corpus += f.read_bytes()
    rng = random.Random(seed)
    tokens: dict[bytes, None] = {bytes([b]): None for b in range(256)}
    n = len(corpus)
    while len(tokens) < size - 1:
        i = rng.randrange(n - 16)
        if rng.random() < 0.5:
            while i > 0 and corpus[i - 1 : i] not in (b" ", b"\n"):
                i -= 1
            if rng.random() < 0.7:
                tokens[b" " + corpus[i : i + rng.randint(1, 10)].split(b" ")[0]] = None
                continue
        tokens[corpus[i : i + rng.randint(2, 12)]] = None
    token_bytes = list(tokens)[: size - 1] + [b"<eos>"]
    return voc.Vocabulary(token_bytes, [size - 1], kind="synthetic")


def bench_compile(vocabs: dict, cache_dir: Path) -> list[list]:
    grammars = {
        "Pydantic-like JSON schema": schema_to_regex(ORDER_SCHEMA),
        "XML tool calls (2 tools)": tool_call_regex(TOOLS, "required", "xml"),
        "Hermes tool calls (2 tools)": tool_call_regex(TOOLS, "required", "hermes"),
    }
    rows = []
    for vname, vocab in vocabs.items():
        for gname, regex in grammars.items():
            os.environ["FLASHMOE_CACHE_DIR"] = str(cache_dir / vname.replace(" ", "_"))
            voc.clear_index_cache(memory=True, disk=True)
            t0 = time.perf_counter()
            idx = voc.compile_index(regex, vocab)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            voc.compile_index(regex, vocab)
            mem = time.perf_counter() - t0
            voc.clear_index_cache(memory=True)
            t0 = time.perf_counter()
            voc.compile_index(regex, vocab)
            disk = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in (voc.index_cache_dir()).glob("*.idx"))
            states = len(idx.get_transitions())
            rows.append([vname, gname, f"{first:.3f}", f"{mem * 1e6:.1f} us", f"{disk:.3f}",
                         states, f"{size / 1e6:.2f}"])
    return rows


def _decode_time(model, tok, prompt, procs, n):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(0)
    t_first = None
    k = 0
    for _ in stream_generate(model, tok, prompt, max_tokens=n, logits_processors=procs,
                             sampler=make_sampler(temp=1.0)):
        k += 1
        if k == 1:
            t_first = time.perf_counter()
    return (time.perf_counter() - t_first) / max(k - 1, 1), k


def bench_decode(model, tok, n: int, repeats: int) -> list[list]:
    dense = st.Constraint.from_regex(rf"[^\x00]{{{n + 8},}}", tok)
    sparse = st.Constraint.from_regex(rf"[0-9]{{{n + 8},}}", tok)
    prompt = "Numbers and text:"
    _decode_time(model, tok, prompt, [], 8)  # warm up
    res: dict[str, list[float]] = {"none": [], "dense": [], "sparse": []}
    errors = {k: 0 for k in res}
    makers = {"none": lambda: [], "dense": lambda: [dense.logits_processor()],
              "sparse": lambda: [sparse.logits_processor()]}
    for _ in range(repeats):  # interleaved, to spread machine noise evenly
        for name, make in makers.items():
            try:
                res[name].append(_decode_time(model, tok, prompt, make(), n)[0])
            except st.StructuredOutputError as exc:
                errors[name] += 1
                print(f"  ({name} run failed: {exc})")
    base = statistics.median(res["none"])
    rows = []
    for name, label in (("none", "no processor"), ("dense", "constraint, dense mask"),
                        ("sparse", "constraint, sparse mask (digits)")):
        med = statistics.median(res[name]) if res[name] else float("nan")
        rel = f"{(med - base) / base * 100:+.0f}%" if name != "none" else "-"
        rows.append([label + (f" ({errors[name]} failed)" if errors[name] else ""), _ms(med), rel])
    return rows


def bench_processor(index, vocab, width: int, calls: int, device_path: bool) -> float:
    """Median seconds per processor call (sync + advance + mask + add + eval)."""
    proc = st.ConstrainedLogitsProcessor(index, vocab)
    proc._device_path = device_path
    logits = mx.random.normal((1, width))
    mx.eval(logits)
    allowed = set(proc.allowed_token_ids())
    bt = vocab.byte_token_ids
    step_tok = next((bt[c] for c in b"a7" if bt.get(c) in allowed), None)
    if step_tok is None:
        step_tok = next(t for t in allowed if t not in vocab.eos_token_ids)
    seq = [1, 2, 3]
    mx.eval(proc(mx.array(seq), logits))
    times = []
    for _ in range(calls):
        seq.append(step_tok)
        tokens = mx.array(seq)
        t0 = time.perf_counter()
        out = proc(tokens, logits)
        mx.eval(out)
        times.append(time.perf_counter() - t0)
        if step_tok not in proc.allowed_token_ids():
            step_tok = next(t for t in proc.allowed_token_ids() if t not in vocab.eos_token_ids)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an mlx-lm model dir (default: build the tiny fixture)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200, help="processor calls to time")
    ap.add_argument("--width", type=int, default=QWEN35_VOCAB)
    ap.add_argument("--no-synthetic", action="store_true", help="skip the 248k vocabulary")
    ap.add_argument("--json", help="also write the results as JSON here")
    args = ap.parse_args()

    import mlx_lm

    tmp = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    if args.model:
        model_dir = Path(args.model)
    else:
        from flashmoe_backend.tiny import build_quantized_checkpoint, build_tiny_checkpoint

        hf = build_tiny_checkpoint(tmp / "hf", "qwen3_5_moe")
        model_dir = build_quantized_checkpoint(hf, tmp / "q", bits=args.bits)
    model, tok = mlx_lm.load(str(model_dir))
    device = str(mx.default_device())
    print(f"# Constrained decoding benchmark\n\nMLX {mx.__version__} on {device}; "
          f"model {'tiny qwen3_5_moe ' + str(args.bits) + '-bit' if not args.model else model_dir}")

    t0 = time.perf_counter()
    tiny_vocab = voc.Vocabulary.from_tokenizer(tok)
    t_tiny_vocab = time.perf_counter() - t0
    vocabs = {f"tiny ({tiny_vocab.size} tokens)": tiny_vocab}
    t_syn = None
    if not args.no_synthetic:
        t0 = time.perf_counter()
        syn = synthetic_vocabulary(QWEN35_VOCAB)
        t_syn = time.perf_counter() - t0
        vocabs[f"synthetic ({syn.size:,} tokens)"] = syn
    results: dict = {"device": device, "mlx": mx.__version__}

    rows = bench_compile(vocabs, tmp / "cache")
    results["compile"] = rows
    print(_table("Index compilation (seconds unless noted)",
                 ["vocabulary", "grammar", "first compile s", "memory hit", "disk hit s",
                  "states", "disk MB"], rows))
    print(f"\nVocabulary build: tiny {t_tiny_vocab * 1e3:.1f} ms"
          + (f"; synthetic 248k (incl. generating it) {t_syn:.2f} s" if t_syn else ""))

    rows = bench_decode(model, tok, args.tokens, args.repeats)
    results["decode"] = rows
    print(_table(f"Decode on the tiny model ({args.tokens} tokens, median of {args.repeats}; "
                 "ms per token, prefill excluded)",
                 ["run", "ms / token", "vs no processor"], rows))

    rows = []
    dense_tiny = voc.compile_index(r"[^\x00]*", tiny_vocab)
    sparse_tiny = voc.compile_index(r"[0-9]*", tiny_vocab)
    for label, index, vocab in (("tiny index, dense mask", dense_tiny, tiny_vocab),
                                ("tiny index, sparse mask", sparse_tiny, tiny_vocab)):
        for path in (False, True):
            sec = bench_processor(index, vocab, args.width, args.calls, path)
            rows.append([label, "MLX ops on device" if path else "numpy bias + upload",
                         f"{sec * 1e6:.0f}"])
    if not args.no_synthetic:
        syn_vocab = vocabs[f"synthetic ({syn.size:,} tokens)"]
        dense_syn = voc.compile_index(r"[^\x00]*", syn_vocab)
        for path in (False, True):
            sec = bench_processor(dense_syn, syn_vocab, args.width, args.calls, path)
            rows.append(["synthetic 248k index, dense mask",
                         "MLX ops on device" if path else "numpy bias + upload",
                         f"{sec * 1e6:.0f}"])
    results["processor"] = rows
    print(_table(f"Processor alone at logits width {args.width:,} (median us per call)",
                 ["index", "bias path", "us / call"], rows))
    default_path = "MLX ops on device" if mx.default_device() != mx.cpu else "numpy bias + upload"
    print(f"\n(The processor picks '{default_path}' on {device}.)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
