"""Constrained decoding at agent scale: llguidance (the engine now) vs the old outlines-core path.

Over a synthetic 248,320-token vocabulary (Qwen3.5's size), for tool calls with 1-20 varied tools
(XML and Hermes format, required and auto mode), a Pydantic model and a regex: the first compile in
a fresh process (time, memory, anything written), compiles in this process, the mask per decode step
(the mlx-lm ``processor(tokens, logits)`` and llguidance alone) along a valid output, and the old
outlines-core ``Index`` with a time limit per compile. Tables in markdown; ``--json`` keeps the numbers.

Usage: ``python -m bench.bench_structured [--runs 2] [--json out.json] [--old-timeout 120] [--no-old]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import mlx.core as mx
import numpy as np
from pydantic import BaseModel, Field

from flashmoe_backend.constrained.constraint import Constraint
from flashmoe_backend.constrained.vocabulary import Vocabulary
from flashmoe_backend.tools.calls import tool_call_constraint
from flashmoe_backend.tools.xml import string_branches

VOCAB_SIZE = 248_320
MIN_STEPS = 200  # tokens per walk (and of free text before the calls in auto mode)
TARGET_COMPILE_MS, TARGET_MEMORY_MB, TARGET_MASK_MS = 100.0, 50.0, 0.5
MB = 2**20  # bytes

# --- The 20 tools, in the style of real APIs, each with valid example arguments -----------------

BOOL, NULL = {"type": "boolean"}, {"type": "null"}


def string(**kw) -> dict:
    return {"type": "string", **kw}


def integer(lo: int | None = None, hi: int | None = None) -> dict:
    return {"type": "integer", **{k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None}}


def number(**kw) -> dict:
    return {"type": "number", **kw}


def enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


def array(items: dict, **kw) -> dict:
    return {"type": "array", "items": items, **kw}


def obj(required: list[str], **props: dict) -> dict:
    return {"type": "object", "properties": props, "required": required}


def nullable(schema: dict) -> dict:
    return {**schema, "type": [schema["type"], "null"]}


def tool(name: str, description: str, parameters: dict, *examples: dict) -> tuple[dict, list[dict]]:
    fn = {"name": name, "description": description, "parameters": parameters}
    return {"type": "function", "function": fn}, list(examples)


EMAIL, DATE, STAMP = string(format="email"), string(format="date"), string(format="date-time")
CODE3 = string(pattern="^[A-Z]{3}$")
TOOLS = [
    tool("get_weather", "Current conditions and forecast for a place.", obj(
        ["location"], location=string(description="City, region or 'lat,lon'"),
        unit=enum("celsius", "fahrenheit"), days=integer(1, 14), include_hourly=BOOL),
        {"location": "Paris, France", "unit": "celsius", "days": 3},
        {"location": "Austin, TX", "unit": "fahrenheit", "days": 7, "include_hourly": True}),
    tool("search_web", "Search the web.", obj(
        ["query"], query=string(minLength=1, maxLength=200), max_results=integer(1, 20),
        recency=enum("day", "week", "month", "year", "any"), site=nullable(string()), safe=BOOL),
        {"query": "llguidance token mask performance", "max_results": 5, "site": None}),
    tool("send_email", "Send an email on the user's behalf.", obj(
        ["to", "subject", "body"], to=array(EMAIL, minItems=1, maxItems=10), cc=array(EMAIL, maxItems=10),
        subject=string(maxLength=120), body=string(), priority=enum("low", "normal", "high")),
        {"to": ["alice@example.com", "bob.smith@corp.example.org"], "subject": "Quarterly report",
         "body": "Hi both,\nthe draft is attached; comments by Friday please.\nSam", "priority": "high"}),
    tool("create_calendar_event", "Create a calendar event.", obj(
        ["title", "start", "end"], title=string(minLength=1, maxLength=100), start=STAMP, end=STAMP,
        attendees=array(obj(["email"], email=EMAIL, optional=BOOL), maxItems=20),
        location={"anyOf": [string(), NULL]}, reminder_minutes=integer(0, 10080)),
        {"title": "Design review", "start": "2026-06-02T14:00:00Z", "end": "2026-06-02T15:00:00Z",
         "attendees": [{"email": "kim@example.com"}, {"email": "lee@example.com", "optional": True}]}),
    tool("tag_documents", "Tag documents.", obj(  # uniqueItems: checked after generation, not by the grammar
        ["document_ids", "tags"], replace_existing=BOOL,
        document_ids=array(string(pattern="^doc_[0-9]{4,8}$"), minItems=1, uniqueItems=True),
        tags=array(enum("finance", "legal", "hr", "urgent", "review"), maxItems=5, uniqueItems=True)),
        {"document_ids": ["doc_1042", "doc_20931"], "tags": ["legal", "review"], "replace_existing": False}),
    tool("book_flight", "Search and book a flight.", obj(
        ["origin", "destination", "depart_date", "passengers"], origin=CODE3, destination=CODE3,
        depart_date=DATE, return_date=nullable(DATE), max_stops=integer(0, 3),
        passengers=obj(["adults"], adults=integer(1, 9), children=integer(0, 8)),
        cabin=enum("economy", "premium_economy", "business", "first")),
        {"origin": "SFO", "destination": "NRT", "depart_date": "2026-07-14", "return_date": "2026-07-28",
         "passengers": {"adults": 2, "children": 1}, "cabin": "economy", "max_stops": 1}),
    tool("get_stock_quote", "Price history of a security.", obj(
        ["symbol"], symbol=string(pattern="^[A-Z]{1,5}$"), exchange=enum("NASDAQ", "NYSE", "LSE"),
        interval=enum("1m", "5m", "1h", "1d", "1wk"), start_date=DATE, adjusted=BOOL),
        {"symbol": "NVDA", "exchange": "NASDAQ", "interval": "1d", "start_date": "2026-01-02"}),
    tool("create_issue", "Open an issue in a repository.", obj(
        ["repo", "title"], repo=string(pattern="^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$"), body=string(),
        title=string(minLength=3, maxLength=256), milestone=nullable(integer(1)),
        labels=array(string(maxLength=50), maxItems=10), assignees=array(string(), maxItems=5)),
        {"repo": "acme/flashmoe", "title": "Mask time regresses with 20 tools", "milestone": None,
         "body": "Steps:\n1. run the bench\n2. compare p90", "labels": ["bug", "perf"]}),
    tool("query_database", "Run a parameterised SQL query.", obj(
        ["sql"], sql=string(maxLength=4000), timeout_ms=integer(100, 60000), read_only=BOOL,
        params=array({"anyOf": [string(), number(), BOOL, NULL]}, maxItems=20)),
        {"sql": "SELECT id FROM orders WHERE customer_id = $1 AND total > $2", "params": ["c_9921", 250.5]}),
    tool("run_shell_command", "Run a command in the sandbox.", obj(
        ["command"], command=string(minLength=1), cwd=string(), timeout_s=number(exclusiveMinimum=0),
        env={"type": "object", "additionalProperties": string()}),
        {"command": "pytest -q tests/test_structured.py", "timeout_s": 300, "env": {"SEED": "0"}}),
    tool("place_order", "Place a retail order.", {**obj(  # $defs and $ref, as Pydantic writes them
        ["customer_id", "items", "shipping"], customer_id=string(format="uuid"),
        items=array({"$ref": "#/$defs/LineItem"}, minItems=1), shipping={"$ref": "#/$defs/Address"},
        coupon={"anyOf": [string(maxLength=20), NULL], "default": None}), "$defs": {
            "LineItem": obj(["sku", "quantity", "unit_price"], sku=string(pattern="^[A-Z]{3}-[0-9]{4}$"),
                            quantity=integer(1, 100), unit_price=number(minimum=0)),
            "Address": obj(["street", "city", "country"], street=string(), city=string(),
                           postal_code=string(maxLength=10), country=enum("US", "GB", "DE", "JP"))}},
        {"customer_id": "3f2b8c1e-9d4a-4e7b-8c2d-1a2b3c4d5e6f", "coupon": "SUMMER10",
         "items": [{"sku": "ABC-1234", "quantity": 2, "unit_price": 19.99}],
         "shipping": {"street": "1 Market St", "city": "San Francisco", "country": "US"}}),
    tool("convert_currency", "Convert an amount between currencies.", obj(
        ["amount", "from_currency", "to_currency"], amount=number(exclusiveMinimum=0),
        from_currency=CODE3, to_currency=CODE3, date=DATE),
        {"amount": 1250.75, "from_currency": "EUR", "to_currency": "JPY", "date": "2026-03-31"}),
    tool("translate_text", "Translate text.", obj(
        ["text", "target_lang"], text=string(maxLength=5000), source_lang=enum("auto", "en", "de", "ja"),
        target_lang=enum("en", "de", "ja"), glossary_id=nullable(string())),
        {"text": "The meeting moved to Thursday at 10am.", "target_lang": "de", "glossary_id": None}),
    tool("set_thermostat", "Program a smart thermostat.", obj(
        ["device_id", "mode"], device_id=string(), mode=enum("heat", "cool", "auto", "off"),
        target_celsius=number(minimum=5, maximum=35), schedule=array(obj(
            ["day", "time", "celsius"], day=enum("mon", "tue", "wed", "sat", "sun"),
            time=string(pattern="^([01][0-9]|2[0-3]):[0-5][0-9]$"), celsius=number(minimum=5, maximum=35)))),
        {"device_id": "living-room", "mode": "heat", "target_celsius": 21.5, "schedule": [
            {"day": "mon", "time": "06:30", "celsius": 20}, {"day": "sun", "time": "22:00", "celsius": 17}]}),
    tool("get_directions", "Route between places.", obj(
        ["origin", "destination"], origin=string(), destination=string(), departure_time=STAMP,
        mode=enum("driving", "walking", "transit"), avoid=array({"enum": ["tolls", "highways", "ferries"]})),
        {"origin": "Berlin Hbf", "destination": "Potsdam", "mode": "transit", "avoid": ["ferries"],
         "departure_time": "2026-05-20T08:15:00+02:00"}),
    tool("read_file", "Read part of a text file.", obj(
        ["path"], path=string(), offset=integer(0), limit=integer(1, 10000), encoding=enum("utf-8", "ascii")),
        {"path": "flashmoe_backend/constrained/constraint.py", "offset": 120, "limit": 80}),
    tool("write_file", "Write a text file.", obj(
        ["path", "content"], path=string(), content=string(), mode=enum("overwrite", "append")),
        {"path": "notes/todo.md", "content": "- bench llguidance\n- compare outlines-core\n"}),
    tool("update_user_profile", "Update a user's profile settings.", obj(
        ["user_id"], user_id=integer(1), display_name=string(minLength=1, maxLength=64), email=EMAIL,
        birthday=nullable(DATE), preferences=obj(
            [], theme=enum("light", "dark", "system"), language=string(pattern="^[a-z]{2}(-[A-Z]{2})?$"),
            notifications=obj([], email=BOOL, sms=BOOL, push=BOOL))),
        {"user_id": 48213, "display_name": "Dana K.", "email": "dana.k@example.com", "birthday": None,
         "preferences": {"theme": "dark", "language": "en-GB", "notifications": {"email": True}}}),
    tool("create_invoice", "Create and send an invoice.", obj(
        ["customer", "line_items", "currency"], currency=enum("USD", "EUR", "GBP"), due_date=DATE,
        customer=obj(["name", "email"], name=string(), email=EMAIL, tax_id=nullable(string())),
        line_items=array(obj(["description", "quantity"], description=string(maxLength=200),
                             quantity=number(exclusiveMinimum=0), tax_rate=number(minimum=0, maximum=1))),
        notes=nullable(string(maxLength=500))),
        {"currency": "GBP", "notes": None, "customer": {"name": "Globex Ltd", "email": "ap@globex.example"},
         "line_items": [{"description": "Consulting, May", "quantity": 12.5, "tax_rate": 0.2}]}),
    tool("summarize_url", "Fetch a page and summarise it.", obj(
        ["url"], url=string(format="uri"), max_words=integer(50, 1000), style=enum("bullets", "tldr")),
        {"url": "https://example.com/blog/2026/05/structured-decoding", "max_words": 150}),
]

FREE_TEXT = ("Sure, I can help with that. Before I change anything, let me summarise what I understood "
             "from your message: you want the quarterly numbers checked against last year's figures, "
             "the outliers flagged, and a short note sent to the finance team once everything adds up. ")


class LineItem(BaseModel):  # the JSON-schema cell: nested models, Literal, bounds, datetime, Optional
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{4}$")
    quantity: int = Field(ge=1, le=100)
    unit_price: float = Field(gt=0)


class Order(BaseModel):
    order_id: int = Field(ge=1)
    status: Literal["pending", "paid", "shipped", "cancelled"]
    created_at: datetime
    customer_email: str = Field(json_schema_extra={"format": "email"})
    items: list[LineItem] = Field(min_length=1, max_length=50)
    country: Literal["US", "CA", "GB", "DE", "FR", "JP"]
    notes: str | None = None


INVOICE_REGEX = (r"(INV-[0-9]{6},(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01]),"
                 r"(USD|EUR|GBP|JPY),[0-9]{1,7}\.[0-9]{2},(paid|open|void)\n)+")


def example_text(kind: str, n: int) -> str:
    """A valid output of the JSON-schema (``kind="json"``) or regex cell, ``n`` items/lines."""
    if kind == "regex":
        return "".join(f"INV-{100000 + 17 * i:06d},20{10 + i % 19}-{1 + i % 12:02d}-{1 + i % 28:02d},"
                       f"{('USD', 'EUR', 'JPY')[i % 3]},{977 * i + 5}.{i % 100:02d},{('paid', 'void')[i % 2]}"
                       "\n" for i in range(n))
    items = [{"sku": f"{'ABCDEFGH'[i % 8] * 3}-{1000 + 37 * i:04d}", "quantity": 1 + i % 9,
              "unit_price": round(4.99 + 3.5 * i, 2)} for i in range(n)]
    return json.dumps({"order_id": 100234, "status": "paid", "created_at": "2026-05-14T09:30:00Z",
                       "customer_email": "jo@example.com", "items": items, "country": "GB", "notes": "Door"})


# --- Vocabulary, cells, valid outputs ------------------------------------------------------------
def synthetic_token_bytes(size: int, seed: int = 0) -> list[bytes]:
    """The 256 bytes plus distinct random substrings (1-12 bytes, word-aligned half of the time)
    of stdlib Python sources; EOS last."""
    import email
    import logging

    corpus = b"".join(f.read_bytes() for mod in (email, json, logging)
                      for f in sorted(Path(mod.__file__).parent.glob("*.py")))
    rng = random.Random(seed)
    tokens: dict[bytes, None] = {bytes([b]): None for b in range(256)}
    while len(tokens) < size - 1:
        i = rng.randrange(len(corpus) - 16)
        if rng.random() < 0.5:
            while i > 0 and corpus[i - 1 : i] not in (b" ", b"\n"):
                i -= 1
            if rng.random() < 0.7:
                tokens[b" " + corpus[i : i + rng.randint(1, 10)].split(b" ")[0]] = None
                continue
        tokens[corpus[i : i + rng.randint(2, 12)]] = None
    return list(tokens)[: size - 1] + [b"<eos>"]


def label(cell: dict) -> str:
    if cell["kind"] != "tools":
        return {"json": "JSON schema (Pydantic Order)", "regex": "regex (CSV invoice lines)"}[cell["kind"]]
    fmt = "XML (Qwen3.5)" if cell["fmt"] == "xml" else "Hermes"
    mode = "required" if cell["mode"] == "forced" else "auto"
    return f"{fmt}, {mode}, {cell['n']} tool{'s' * (cell['n'] > 1)}"


def build(cell: dict, vocab: Vocabulary) -> Constraint:
    """The cell's compiled constraint, from the raw inputs a request brings."""
    if cell["kind"] == "json":
        return Constraint.from_response_format(Order, vocab)
    if cell["kind"] == "regex":
        return Constraint.from_response_format({"type": "regex", "pattern": INVOICE_REGEX}, vocab)
    tools = [t for t, _ in TOOLS[: cell["n"]]]
    return tool_call_constraint(tools, "required", cell["fmt"], vocab, mode=cell["mode"])


def render_call(fmt: str, name: str, args: dict, params: dict) -> str:
    args = {k: args[k] for k in params["properties"] if k in args}  # the grammar's property order
    if fmt == "hermes":
        return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'
    lines = ["<tool_call>", f"<function={name}>"]
    for pname, v in args.items():
        raw = isinstance(v, str) and string_branches(params["properties"][pname], params) is not None
        lines += [f"<parameter={pname}>", v if raw else json.dumps(v), "</parameter>"]
    return "\n".join(lines + ["</function>", "</tool_call>"])


def walk_ids(cell: dict, vocab: Vocabulary) -> tuple[list[int], list[int]]:
    """(free text, structured) token ids of a valid output: >= MIN_STEPS structured tokens (tools:
    parallel calls, each tool of the set at least once), in auto mode >= MIN_STEPS of prose first."""
    if cell["kind"] != "tools":
        n = 4
        while len(ids := vocab.encode(example_text(cell["kind"], n))) < MIN_STEPS:
            n += 2
        return [], ids
    lib, calls = TOOLS[: cell["n"]], []
    while len(calls) < len(lib) or len(vocab.encode("\n".join(calls))) < MIN_STEPS:
        t, examples = lib[len(calls) % len(lib)]
        fn = t["function"]
        args = examples[len(calls) // len(lib) % len(examples)]
        calls.append(render_call(cell["fmt"], fn["name"], args, fn["parameters"]))
    prose = FREE_TEXT * (cell["mode"] == "auto")
    while prose and len(vocab.encode(prose)) < MIN_STEPS:
        prose += FREE_TEXT
    return (vocab.encode(prose + "\n\n") if prose else []), vocab.encode("\n".join(calls))


# --- Child processes: the first compile (new engine) and the old outlines-core path ------------
def proc_stats() -> tuple[int, int, int]:
    """This process's RSS, peak RSS (VmHWM) and bytes passed to write() so far."""
    status = dict(x.split(":", 1) for x in Path("/proc/self/status").read_text().splitlines())
    io = dict(x.split(": ") for x in Path("/proc/self/io").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024, int(io["wchar"])


def files_under(roots: list[str]) -> set[str]:
    return {os.path.join(d, f) for r in roots for d, _, fs in os.walk(r) for f in fs}


def child_new(cell: dict, token_bytes: list[bytes], _timeout: float) -> dict:
    vocab = Vocabulary(token_bytes, [len(token_bytes) - 1])
    vocab.llg  # noqa: B018 - the one-off llguidance tokenizer, before the compile
    roots = [os.environ["HOME"], os.environ["XDG_CACHE_HOME"], os.environ["TMPDIR"], os.getcwd()]
    files = files_under(roots)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := RSS (before wchar is read)
    rss0, _, wchar0 = proc_stats()
    t0 = time.perf_counter()
    build(cell, vocab)
    dt = time.perf_counter() - t0
    rss1, peak, wchar1 = proc_stats()
    return {"compile_s": dt, "rss_mb": (rss1 - rss0) / MB, "peak_mb": (peak - rss0) / MB,
            "wrote_bytes": wchar1 - wchar0, "new_files": sorted(files_under(roots) - files)}


def regex_escape(text: str) -> str:
    """Escape ``text`` for a regex (Rust/llguidance syntax; also valid for Python's ``re``)."""
    out = []
    for c in text:
        if c in "\\.+*?()|[]{}^$#&-~/":
            out.append("\\" + c)
        elif c == "\n":
            out.append(r"\n")
        elif c == "\t":
            out.append(r"\t")
        elif c == "\r":
            out.append(r"\r")
        else:
            out.append(c)
    return "".join(out)


def old_regex(cell: dict) -> str:
    """The old path's regex, built by outlines-core itself (Hermes: a union of the tools' calls)."""
    from outlines_core.json_schema import build_regex_from_schema

    ws = r"[ ]?"  # the engine's JSON whitespace
    if cell["kind"] == "json":
        return build_regex_from_schema(json.dumps(Order.model_json_schema()), ws)
    if cell["kind"] == "regex":
        return INVOICE_REGEX
    alts = [regex_escape(f'\n{{"name": "{t["function"]["name"]}", "arguments": ')
            + "(" + build_regex_from_schema(json.dumps(t["function"]["parameters"]), ws) + ")"
            + regex_escape("}\n</tool_call>") for t, _ in TOOLS[: cell["n"]]]
    call = regex_escape("<tool_call>") + "(" + "|".join(alts) + ")"
    return rf"\n{{0,2}}{call}(\n{call})*"


def child_old(cell: dict, token_bytes: list[bytes], timeout: float) -> dict:
    import outlines_core

    eos = len(token_bytes) - 1
    by_bytes: dict[bytes, list[int]] = {}
    for tid, b in enumerate(token_bytes[:eos]):
        by_bytes.setdefault(b, []).append(tid)
    vocab, regex = outlines_core.Vocabulary(eos, by_bytes), old_regex(cell)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = proc_stats()[0]
    signal.setitimer(signal.ITIMER_REAL, timeout)  # SIGALRM's default action ends the process
    t0 = time.perf_counter()
    outlines_core.Index(regex, vocab)
    dt = time.perf_counter() - t0
    signal.setitimer(signal.ITIMER_REAL, 0)
    return {"compile_s": dt, "peak_mb": (proc_stats()[1] - rss0) / MB, "regex_chars": len(regex)}


def run_child(kind: str, cell: dict, token_bytes: bytes, timeout: float = 300.0) -> dict:
    """This script as a fresh process with an empty HOME, XDG_CACHE_HOME, TMPDIR and cwd; the
    vocabulary goes in through stdin, the result comes back as the last line of stdout."""
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as box:
        dirs = {d: os.path.join(box, d) for d in ("HOME", "XDG_CACHE_HOME", "TMPDIR", "cwd")}
        for d in dirs.values():
            os.mkdir(d)
        env = {**os.environ, **dirs, "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps([kind, cell, timeout])]
        p = subprocess.run(cmd, input=token_bytes, capture_output=True, env=env, cwd=dirs["cwd"],
                           timeout=timeout + 300)
    if p.returncode == -signal.SIGALRM:
        return {"timed_out": timeout}
    if p.returncode:
        raise RuntimeError(f"{kind} child for {label(cell)}: {p.stderr.decode()[-2000:]}")
    return json.loads(p.stdout.decode().splitlines()[-1])


# --- In-process: compiles and masks ------------------------------------------------------------
def walk_processor(constraint: Constraint, ids: list[int], width: int) -> list[float]:
    """Seconds per ``processor(tokens, logits)`` + ``mx.eval``; entry 0: the first decode step."""
    proc, logits, times = constraint.logits_processor(), mx.random.normal((1, width)), []
    mx.eval(logits)
    for i in range(len(ids) + 1):
        tokens = mx.array([7, 8, 9] + ids[:i])  # a prompt (which the processor skips) + the output so far
        t0 = time.perf_counter()
        mx.eval(proc(tokens, logits))
        times.append(round(time.perf_counter() - t0, 7))
    assert proc.is_complete, "the walk did not complete the structure"
    return times


def walk_llg(constraint: Constraint, ids: list[int]) -> list[float]:
    """Seconds per step of llguidance alone: consume the token, compute the mask into a buffer."""
    matcher = constraint.logits_processor().matcher
    words, times = np.zeros((constraint.vocabulary.size + 31) // 32, dtype=np.int32), []
    for tid in [None, *ids]:
        t0 = time.perf_counter()
        if tid is not None and not matcher.consume_token(tid):
            raise RuntimeError(f"token rejected: {matcher.get_error()}")
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        times.append(round(time.perf_counter() - t0, 7))
    return times


def measure(args: argparse.Namespace) -> dict:
    token_bytes = synthetic_token_bytes(args.vocab_size)
    vocab, blob = Vocabulary(token_bytes, [len(token_bytes) - 1]), pickle.dumps(token_bytes)
    vocab.llg  # noqa: B018
    res = {"versions": {p: version(p) for p in ("llguidance", "outlines_core", "mlx")},
           "device": str(mx.default_device()), "cpus": os.cpu_count(), "runs": args.runs,
           "vocab_size": vocab.size, "loadavg_start": os.getloadavg(), "cells": [], "old": []}
    cells = [{"kind": "tools", "fmt": f, "mode": m, "n": n} for f in ("xml", "hermes")
             for m in ("forced", "auto") for n in (1, 2, 5, 10, 20)] + [{"kind": "json"}, {"kind": "regex"}]
    res["cells"] = [{"label": label(c), "cell": c, "child": [], "compile_s": [], "proc": {}, "llg": {}}
                    for c in cells]
    walks = [walk_ids(c, vocab) for c in cells]
    for run in range(args.runs):  # cells and runs interleaved: the cores are shared
        for i in range(len(cells))[:: -1 if run % 2 else 1]:
            rec, (free, ids) = res["cells"][i], walks[i]
            print(f"run {run + 1}/{args.runs}: {rec['label']}", file=sys.stderr, flush=True)
            rec["child"].append(run_child("new", cells[i], blob))
            for key in ("proc", "llg"):
                t1 = time.perf_counter()
                c = build(cells[i], vocab)
                rec["compile_s"].append(time.perf_counter() - t1)
                steps = (walk_processor(c, free + ids, vocab.size) if key == "proc"
                         else walk_llg(c, free + ids))
                if free:
                    rec[key].setdefault("free text", []).extend(steps[: len(free)])
                rec[key].setdefault("call", []).extend(steps[len(free) :])
    old_cells = [{"kind": "json"}, {"kind": "regex"}] + [
        {"kind": "tools", "fmt": "hermes", "mode": "forced", "n": n} for n in (1, 2, 5)]
    for cell in [] if args.no_old else old_cells:
        print(f"old path: {label(cell)} (limit {args.old_timeout:.0f} s)", file=sys.stderr, flush=True)
        res["old"].append({"label": label(cell), **run_child("old", cell, blob, args.old_timeout)})
    res["loadavg_end"] = os.getloadavg()
    return res


# --- Report ------------------------------------------------------------------------------------
def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1] if len(xs) > 1 else xs[0]


def spread(xs: list[float], scale: float = 1e3) -> str:
    """``median [min-max]`` of ``xs`` times ``scale``, one decimal."""
    m = f"{statistics.median(xs) * scale:.1f}"
    return m if len(xs) == 1 else f"{m} [{min(xs) * scale:.1f}-{max(xs) * scale:.1f}]"


def table(title: str, note: str, header: list[str], rows: list[list]) -> str:
    lines = [f"\n### {title}\n", note + "\n", "| " + " | ".join(header) + " |",
             "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def report(res: dict) -> list[str]:
    """The markdown lines; adds each cell's summaries (and the verdicts) to ``res``."""
    v, cells = res["versions"], res["cells"]
    out = ["# Constrained decoding at agent scale: llguidance vs outlines-core\n",
           f"llguidance {v['llguidance']}, outlines-core {v['outlines_core']}, MLX {v['mlx']} on "
           f"{res['device']}, {res['cpus']} CPU cores shared with other work (so medians, p90, [min-max]); "
           f"--runs {res['runs']}; vocabulary and logits width {res['vocab_size']:,}; load average at start "
           f"/ end: {res['loadavg_start'][0]:.2f} / {res['loadavg_end'][0]:.2f}."]
    for r in cells:
        kids = r["child"]
        r["first_s"] = [k["compile_s"] for k in kids]
        r["rss_mb"], r["peak_mb"] = [k["rss_mb"] for k in kids], [k["peak_mb"] for k in kids]
        r["written"] = [sum(k["wrote_bytes"] for k in kids), sum(len(k["new_files"]) for k in kids)]
        r["mask_ms"] = {ph: [f(r[who][ph]) * 1e3 for who in ("proc", "llg") for f in (statistics.median, p90)]
                        for ph in r["proc"]}  # processor median, p90; llguidance median, p90
    out.append(table(
        "Compile (tool checks + grammar + llguidance)",
        "First compile: the first grammar of a fresh child process per cell and run (grammar stack "
        "imported, vocab.llg built); memory: its RSS growth and peak growth (VmHWM, reset before); "
        "written: write() bytes and new files under its empty HOME, XDG_CACHE_HOME, TMPDIR and cwd. "
        "In-process: this process, a new grammar each time (tool checks cached by their JSON).",
        ["grammar", "first compile ms (fresh process)", "in-process compile ms", "RSS +MB", "peak +MB",
         "written: bytes / new files"],
        [[r["label"], spread(r["first_s"]), spread(r["compile_s"]), spread(r["rss_mb"], 1),
          spread(r["peak_mb"], 1), "{} B / {}".format(*r["written"])] for r in cells]))
    out.append(table(
        f"Mask per decode step at logits width {res['vocab_size']:,} (ms)",
        "processor = `processor(tokens, logits)` + mx.eval; llguidance = consume_token + mask into a "
        "buffer. Steps walk a valid output (parallel calls through the set's tools; auto mode: free "
        "text first), each run on a freshly compiled grammar.",
        ["grammar", "phase", "steps (all runs)", "processor median", "processor p90",
         "llguidance median", "llguidance p90"],
        [[r["label"], ph, len(r["proc"][ph]), *(f"{x:.3f}" for x in m)]
         for r in cells for ph, m in r["mask_ms"].items()]))
    if res["old"]:
        new = {r["label"]: r for r in cells}
        out.append(table(
            "Old path (outlines-core Index over the same vocabulary) beside the new engine",
            "Old: outlines_core.Index(regex, Vocabulary) in a child process (one run), the regex from "
            "outlines_core.json_schema.build_regex_from_schema; Hermes calls as a union of one "
            "alternative per tool. (XML calls have no old-path regex builder any more.)",
            ["grammar", "regex chars", "old compile ms", "old peak +MB", "new first compile ms"],
            [[o["label"], o.get("regex_chars", "-"), f"not finished in {o['timed_out']:.0f} s"
              if "timed_out" in o else f"{o['compile_s'] * 1e3:,.0f}", f"{o.get('peak_mb', 0):,.0f}"
              if "peak_mb" in o else "-", spread(new[o["label"]]["first_s"])] for o in res["old"]]))
    checks = []
    for r in (r for r in cells if r["cell"].get("n") == 20):
        first, mem = statistics.median(r["first_s"]) * 1e3, max(r["rss_mb"] + r["peak_mb"])
        checks += [(f"{r['label']}: first compile <= {TARGET_COMPILE_MS:g} ms", first <= TARGET_COMPILE_MS,
                    f"fresh-process median {first:.1f} ms; in-process {spread(r['compile_s'])} ms"),
                   (f"{r['label']}: extra memory <= {TARGET_MEMORY_MB:g} MB", mem <= TARGET_MEMORY_MB,
                    f"worst RSS or peak growth {mem:.1f} MB"),
                   (f"{r['label']}: nothing written to disk", r["written"] == [0, 0],
                    "{} bytes written, {} new files".format(*r["written"]))]
    for i, who in ((0, "whole processor call"), (2, "llguidance alone")):
        worst, name = max((m[i], r["label"]) for r in cells for m in r["mask_ms"].values())
        checks.append((f"mask median <= {TARGET_MASK_MS:g} ms per token, {who}", worst <= TARGET_MASK_MS,
                       f"worst median {worst:.3f} ms: {name}"))
    res["targets"] = [{"target": t, "pass": ok, "detail": d} for t, ok, d in checks]
    return out + ["\n### Targets\n"] + [f"- {t}: **{'PASS' if ok else 'FAIL'}** ({d})" for t, ok, d in checks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2, help="repetitions of every cell (interleaved)")
    ap.add_argument("--json", help="also write the raw numbers as JSON here")
    ap.add_argument("--old-timeout", type=float, default=120.0,
                    help="time limit (s) of each old-path (outlines-core) compile")
    ap.add_argument("--no-old", action="store_true", help="skip the outlines-core path")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help=argparse.SUPPRESS)
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # the uniqueItems tool warns at each compile
    if args._child:
        kind, cell, timeout = json.loads(args._child)
        token_bytes = pickle.loads(sys.stdin.buffer.read())
        print(json.dumps({"new": child_new, "old": child_old}[kind](cell, token_bytes, timeout)))
        return
    t0 = time.perf_counter()
    lines = report(res := measure(args))
    res["total_s"] = time.perf_counter() - t0
    command = " ".join(["python -m bench.bench_structured", *sys.argv[1:]])
    print("\n".join(lines + [f"\nTotal benchmark time: {res['total_s'] / 60:.1f} min. Command: `{command}`"]))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
