"""``flashmoe serve`` on the demo store: what the server costs per generated token against calling
the engine directly, and the time to first token with and without the on-disk prompt cache.

    python -m bench.bench_server [--runs 2] [--repeats 4] [--max-tokens 128] [--json OUT.json]

(a) Overhead. One ``flashmoe serve demo`` process on a loopback port, and the same store loaded
by ``FlashMoE.load`` in this process; the official ``openai`` client here. Per run, every mode is
timed ``--repeats`` times, interleaved round-robin (the order rotates from run to run), so that
a change in the machine's load hits every mode alike:

* ``engine generate`` / ``engine stream``: ``engine.generate`` / iterating ``engine.stream``;
* ``server`` / ``server stream``: ``client.completions.create`` with ``stream`` off / on.

All four generate from the raw prompt the demo model continues until ``max_tokens`` (greedy,
exactly ``--max-tokens`` tokens each, checked), so they do the same work. The time of a request
(wall, client side, from the call until the last chunk) divided by its tokens is its time per
generated token; overhead is the server's median over the engine's median, streamed against
streamed. The same for a short grounded chat answer (``/v1/chat/completions``, a few tokens): a
per-request figure, where the fixed cost of HTTP shows.

(b) Time to first token of a chat request with a long-ish system prompt and 5 tools (``--tools``) (time from
the call until the first chunk after the role chunk, ``max_tokens=1``: the first token's chunk,
or the finish chunk when that token is held back as tool-call markup), each in a fresh server
process (started before the clock; its startup is not timed): without ``--prompt-cache-dir``; with
it on an empty directory (the prefill writes the file); again with that directory (a restarted
server: the file is read instead of prefilling). A second identical request in each process
shows the in-memory prompt cache.

The machine's 1-minute load average is recorded before and after each part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "demo"
#: A raw prompt the demo model continues until max_tokens (never an end of text).
ENDLESS = "Once upon a time"
OVERHEAD_MODES = ("engine generate", "server", "engine stream", "server stream")
CHAT_MODES = ("engine chat", "server chat", "engine chat stream", "server chat stream")


# -- a server process ---------------------------------------------------------------------------


@dataclass
class Served:
    """A server process: its base URL (``.../v1``) and process id."""

    url: str
    pid: int


@contextlib.contextmanager
def spawned_server(*options: str, timeout: float = 180) -> Iterator[Served]:
    """``flashmoe serve demo --port 0 --offline *options`` in a new process; yields it once
    ``/health`` answers; ends it with SIGINT (Ctrl-C)."""
    import httpx

    process = subprocess.Popen(
        [sys.executable, "-m", "flashmoe_backend.cli", "serve", "demo", "--port", "0", "--offline", *options],
        # uvicorn's access log goes to stdout: not into this benchmark's report
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    seen: list[str] = []
    drain = None
    try:
        port = None
        for line in process.stderr:
            seen.append(line)
            if match := re.search(r"serving 'demo' at http://127\.0\.0\.1:(\d+)/v1", line):
                port = int(match.group(1))
                break
        if port is None:
            raise SystemExit("the server did not start:\n" + "".join(seen))
        # keep reading what it logs: a full pipe would stall the server
        drain = threading.Thread(target=seen.extend, args=(process.stderr,), daemon=True)
        drain.start()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not answer:\n" + "".join(seen))
            time.sleep(0.05)
        yield Served(f"http://127.0.0.1:{port}/v1", process.pid)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if drain is not None:
            drain.join(10)
        process.stderr.close()


def client(url: str):
    """The official openai client of a server (no retries: a failure must show)."""
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)


def summarize(values: list[float], scale: float = 1.0, digits: int = 3) -> dict:
    """Median and spread (min-max) of ``values`` times ``scale``."""
    xs = [v * scale for v in values]
    return {"median": round(statistics.median(xs), digits), "min": round(min(xs), digits),
            "max": round(max(xs), digits), "n": len(xs), "values": [round(x, digits) for x in xs]}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# -- (a) overhead per generated token ----------------------------------------------------------


def overhead_modes(engine, url: str, max_tokens: int) -> dict[str, Callable[[], tuple[int, str]]]:
    """Mode -> a function doing one request, returning (generated tokens, text)."""
    from flashmoe_backend.cli.demo import DOCUMENT, QUESTION

    api = client(url)
    raw = dict(max_tokens=max_tokens, temperature=0)
    grounded = [{"role": "system", "content": "Use the following facts to answer.\n" + DOCUMENT},
                {"role": "user", "content": QUESTION}]

    def engine_generate():
        r = engine.generate(ENDLESS, **raw)
        return len(r.token_ids), r.text

    def engine_stream():
        r = [item for item in engine.stream(ENDLESS, **raw)][-1]
        return len(r.token_ids), r.text

    def server():
        r = api.completions.create(model=MODEL, prompt=ENDLESS, **raw)
        return r.usage.completion_tokens, r.choices[0].text

    def server_stream():
        text, usage = "", None
        for c in api.completions.create(model=MODEL, prompt=ENDLESS, stream=True,
                                        stream_options={"include_usage": True}, **raw):
            text += c.choices[0].text if c.choices else ""
            usage = c.usage or usage
        return usage.completion_tokens, text

    def engine_chat():
        r = engine.generate(grounded, temperature=0)
        return len(r.token_ids), r.text

    def engine_chat_stream():
        r = [item for item in engine.stream(grounded, temperature=0)][-1]
        return len(r.token_ids), r.text

    def server_chat():
        r = api.chat.completions.create(model=MODEL, messages=grounded, temperature=0)
        return r.usage.completion_tokens, r.choices[0].message.content

    def server_chat_stream():
        text, usage = "", None
        for c in api.chat.completions.create(model=MODEL, messages=grounded, temperature=0, stream=True,
                                             stream_options={"include_usage": True}):
            text += (c.choices[0].delta.content or "") if c.choices else ""
            usage = c.usage or usage
        return usage.completion_tokens, text

    return {"engine generate": engine_generate, "engine stream": engine_stream, "server": server,
            "server stream": server_stream, "engine chat": engine_chat, "server chat": server_chat,
            "engine chat stream": engine_chat_stream,
            "server chat stream": server_chat_stream}


#: (server mode, the direct mode it is compared with): the two of a pair run back to back.
PAIRS = (("server", "engine generate"), ("server stream", "engine stream"),
         ("server chat", "engine chat"), ("server chat stream", "engine chat stream"))


def cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads) used so far by process ``pid``, or by this one;
    ``None`` where psutil is missing for another process."""
    if pid is None:
        return time.process_time()
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main_thread_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of process ``pid``'s main thread, where the server's event loop runs (on Linux
    its thread id is the pid); ``None`` where that cannot be read."""
    try:
        import psutil

        [main] = [t for t in psutil.Process(pid).threads() if t.id == pid]
    except (ImportError, ValueError):
        return None
    return main.user_time + main.system_time


def measure_overhead(runs: int, repeats: int, max_tokens: int) -> dict:
    """Part (a): seconds per generated token of each mode, interleaved in back-to-back pairs
    (server, engine), and the ratios. Also the CPU time per token of the process that runs the
    engine (this one for a direct call, the server's for a request) and, apart, of the client
    (this process, for a request): on a machine with no core to spare, a client's CPU time is
    taken from the engine too."""
    from flashmoe_backend import FlashMoE

    load_before = load_average()
    engine = FlashMoE.load(MODEL)
    try:
        with spawned_server() as served:
            modes = overhead_modes(engine, served.url, max_tokens)
            texts: dict[str, set[str]] = {m: set() for m in modes}
            for request in modes.values():  # warm-up: first-use compilation, the expert cache
                request()
            wall: dict[str, list[float]] = {m: [] for m in modes}
            cpu: dict[str, list[float]] = {m: [] for m in modes}
            client_cpu: dict[str, list[float]] = {m: [] for m in modes if m.startswith("server")}
            loop_cpu: dict[str, list[float]] = {m: [0.0, 0] for m in OVERHEAD_MODES if m.startswith("server")}
            paired: dict[str, list[float]] = {server: [] for server, _ in PAIRS}
            per_run: list[dict[str, float]] = []

            def sample(mode: str) -> float:
                server_cpu = cpu_seconds(served.pid) if mode.startswith("server") else 0.0
                loop_before = main_thread_cpu_seconds(served.pid) if mode in loop_cpu else None
                own_cpu, tic = time.process_time(), time.perf_counter()
                tokens, text = modes[mode]()
                seconds = time.perf_counter() - tic
                used = time.process_time() - own_cpu
                if mode.startswith("server"):
                    client_cpu[mode].append(used / (tokens if mode in OVERHEAD_MODES else 1))
                    after = cpu_seconds(served.pid)
                    used = None if after is None else after - server_cpu
                if mode in OVERHEAD_MODES and tokens != max_tokens:
                    raise SystemExit(f"{mode}: {tokens} tokens, expected {max_tokens}")
                if loop_before is not None:  # summed: the clock ticks are 10 ms, a request ~1 s
                    loop_cpu[mode][0] += main_thread_cpu_seconds(served.pid) - loop_before
                    loop_cpu[mode][1] += tokens
                texts[mode].add(text)
                per = tokens if mode in OVERHEAD_MODES else 1  # chat: per request
                wall[mode].append(seconds / per)
                if used is not None:
                    cpu[mode].append(used / per)
                return seconds / per

            for run in range(runs):
                this_run: dict[str, list[float]] = {m: [] for m in modes}
                shift = run % len(PAIRS)
                for rep in range(repeats):
                    for server, direct in PAIRS[shift:] + PAIRS[:shift]:
                        first, second = (server, direct) if (rep + run) % 2 else (direct, server)
                        got = {first: sample(first), second: sample(second)}
                        paired[server].append(got[server] / got[direct])
                        for mode, value in got.items():
                            this_run[mode].append(value)
                per_run.append({m: statistics.median(v) for m, v in this_run.items()})
    finally:
        engine.close()
    same = (len(set().union(*(texts[m] for m in OVERHEAD_MODES))) == 1
            and len(set().union(*(texts[m] for m in CHAT_MODES))) == 1)

    def ratio(server: str, direct: str) -> dict:
        med = statistics.median(wall[server]) / statistics.median(wall[direct])
        out = {"median_ratio": round(med, 4), "overhead_percent": round((med - 1) * 100, 2),
               "min_ratio": round(min(wall[server]) / min(wall[direct]), 4),
               "per_run_ratios": [round(r[server] / r[direct], 4) for r in per_run],
               "paired_ratio": summarize(paired[server], digits=4)}
        if cpu[server] and cpu[direct]:
            out["cpu_ratio"] = round(statistics.median(cpu[server]) / statistics.median(cpu[direct]), 4)
        return out

    return {
        "max_tokens": max_tokens,
        "runs": runs,
        "repeats": repeats,
        "same_text_everywhere": same,
        "ms_per_token": {m: summarize(wall[m], 1000) for m in OVERHEAD_MODES},
        "cpu_ms_per_token": {m: summarize(cpu[m], 1000) for m in OVERHEAD_MODES if cpu[m]},
        "client_cpu_ms_per_token": {m: summarize(client_cpu[m], 1000) for m in OVERHEAD_MODES
                                    if m in client_cpu},
        "chat_ms_per_request": {m: summarize(wall[m], 1000) for m in CHAT_MODES},
        # the server's own work per token: its event loop thread (the engine runs in another)
        "event_loop_cpu_ms_per_token": {m: round(c / n * 1000, 3) for m, (c, n) in loop_cpu.items() if n},
        "ratios": {f"{server} / {direct}": ratio(server, direct) for server, direct in PAIRS},
        "load_average": {"before": load_before, "after": load_average()},
    }


# -- (b) time to first token with the prompt cache on disk --------------------------------------


def agent_system_prompt(lines: int) -> str:
    """A long-ish agent system prompt: the demo's facts and ``lines`` numbered rules."""
    from flashmoe_backend.cli.demo import DOCUMENT

    topics = ("bookings", "refunds", "weather questions", "office moves", "calendar entries",
              "payments", "travel documents", "seat changes")
    rules = [f"Rule {i + 1}: for {topics[i % len(topics)]}, check the record first, answer in one "
             f"short sentence, and call a tool only when the record does not say." for i in range(lines)]
    return "\n".join(["You are the support assistant of a travel company. Use the following facts "
                      "to answer.", DOCUMENT, *rules])


def agent_tools(n: int = 5) -> list[dict]:
    """``n`` tools: the demo's weather tool, then the first of tests/fixtures/tool_specs.json."""
    from flashmoe_backend.cli.demo import WEATHER_TOOL

    specs = json.loads((ROOT / "tests" / "fixtures" / "tool_specs.json").read_text())
    return [WEATHER_TOOL, *specs[: n - 1]]


def first_token(url: str, messages: list[dict], tools: list[dict]) -> dict:
    """One streamed chat request: seconds to its first chunk after the role chunk, and usage."""
    tic = time.perf_counter()
    first, usage = None, None
    stream = client(url).chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_tokens=1, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if first is None and chunk.choices:
            choice = chunk.choices[0]
            delta = choice.delta
            if delta.content or delta.tool_calls or choice.finish_reason or (delta.model_extra or {}).get(
                "reasoning_content"
            ):
                first = time.perf_counter() - tic
    return {"seconds": first, "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens}


def measure_ttft(runs: int, system_lines: int, n_tools: int = 5) -> dict:
    """Part (b): per run, three fresh server processes (no cache / writing it / reading it)."""
    from flashmoe_backend.cli.demo import QUESTION

    load_before = load_average()
    messages = [{"role": "system", "content": agent_system_prompt(system_lines)},
                {"role": "user", "content": QUESTION}]
    tools = agent_tools(n_tools)
    conditions = ("no prompt-cache-dir", "prompt-cache-dir, empty (writes)",
                  "prompt-cache-dir, restart (reads)")
    results: dict[str, list[dict]] = {c: [] for c in conditions}
    file_bytes = []
    for run in range(runs):
        with tempfile.TemporaryDirectory(prefix="flashmoe-bench-cache-") as directory:
            plan = [(conditions[0], ()), (conditions[1], ("--prompt-cache-dir", directory)),
                    (conditions[2], ("--prompt-cache-dir", directory))]
            # the no-cache process goes last every other run; the reading one always follows the writer
            if run % 2:
                plan = plan[1:] + plan[:1]
            for condition, options in plan:
                with spawned_server(*options) as served:
                    first = first_token(served.url, messages, tools)
                    second = first_token(served.url, messages, tools)
                results[condition].append({"first": first, "second": second})
            file_bytes.append(sum(p.stat().st_size for p in Path(directory).glob("*.safetensors")))
    report = {
        "system_prompt_lines": system_lines,
        "tools": [t["function"]["name"] for t in tools],
        "prompt_tokens": results[conditions[0]][0]["first"]["prompt_tokens"],
        "cache_file_bytes": file_bytes,
        "conditions": {},
        "load_average": {"before": load_before, "after": load_average()},
    }
    for condition, rs in results.items():
        report["conditions"][condition] = {
            "first_request_ttft_s": summarize([r["first"]["seconds"] for r in rs]),
            "first_request_cached_tokens": [r["first"]["cached_tokens"] for r in rs],
            "second_request_ttft_s": summarize([r["second"]["seconds"] for r in rs]),
            "second_request_cached_tokens": [r["second"]["cached_tokens"] for r in rs],
        }
    none = report["conditions"][conditions[0]]["first_request_ttft_s"]["median"]
    hit = report["conditions"][conditions[2]]["first_request_ttft_s"]["median"]
    report["speedup_first_request"] = round(none / hit, 2) if hit else None
    return report


# -- report --------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    """The tables of RESULTS.md's section."""
    a, b = report["overhead"], report["ttft"]
    load = a["load_average"]
    out = [f"(a) {a['max_tokens']} generated tokens per request, {a['runs']} runs x {a['repeats']} repeats "
           f"per mode, interleaved; load average {load['before']} -> {load['after']}; "
           f"same text in every mode: {a['same_text_everywhere']}", "",
           "| mode | ms / generated token, median | min-max |", "|---|---:|---:|"]
    for mode, s in a["ms_per_token"].items():
        out.append(f"| {mode} | {s['median']:.2f} | {s['min']:.2f}-{s['max']:.2f} |")
    if a["cpu_ms_per_token"]:
        out += ["", "| mode | CPU ms / generated token of the engine's process, median | min-max "
                "| the client's (this process), median |", "|---|---:|---:|---:|"]
        for mode, s in a["cpu_ms_per_token"].items():
            c = a["client_cpu_ms_per_token"].get(mode)
            out.append(f"| {mode} | {s['median']:.2f} | {s['min']:.2f}-{s['max']:.2f} | "
                       f"{'-' if c is None else format(c['median'], '.2f')} |")
    out += ["", "| short chat answer | ms / request, median | min-max |", "|---|---:|---:|"]
    for mode, s in a["chat_ms_per_request"].items():
        out.append(f"| {mode} | {s['median']:.1f} | {s['min']:.1f}-{s['max']:.1f} |")
    out += ["", "| ratio (wall) | of medians (overhead) | per run | back-to-back pairs: median (min-max) "
            "| of minima | engine process CPU, of medians |", "|---|---:|---|---:|---:|---:|"]
    for name, r in a["ratios"].items():
        per_run = ", ".join(f"{x:.3f}" for x in r["per_run_ratios"])
        pair = r["paired_ratio"]
        out.append(f"| {name} | {r['median_ratio']:.3f} ({r['overhead_percent']:+.1f}%) | {per_run} "
                   f"| {pair['median']:.3f} ({pair['min']:.3f}-{pair['max']:.3f}) | {r['min_ratio']:.3f} "
                   f"| {r.get('cpu_ratio', float('nan')):.3f} |")
    if a["event_loop_cpu_ms_per_token"]:
        loops = ", ".join(f"{m} {v:.3f} ms" for m, v in a["event_loop_cpu_ms_per_token"].items())
        out += ["", f"The server's event loop thread's CPU per generated token: {loops}."]
    out += ["", f"(b) system prompt + {len(b['tools'])} tools = {b['prompt_tokens']} prompt tokens; "
            f"cache file {b['cache_file_bytes']} bytes; load average {b['load_average']['before']} -> "
            f"{b['load_average']['after']}", "",
            "| fresh server process | 1st request TTFT, median | min-max | cached tokens "
            "| 2nd request TTFT |",
            "|---|---:|---:|---|---:|"]
    for condition, c in b["conditions"].items():
        f, s = c["first_request_ttft_s"], c["second_request_ttft_s"]
        out.append(f"| {condition} | {f['median']:.3f} s | {f['min']:.3f}-{f['max']:.3f} s | "
                   f"{', '.join(map(str, c['first_request_cached_tokens']))} | {s['median']:.3f} s |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2, help="runs of each part (>= 1; 2+ for a spread)")
    p.add_argument("--repeats", type=int, default=4, help="requests per mode per run in part (a)")
    p.add_argument("--max-tokens", type=int, default=128, help="generated tokens per request in part (a)")
    p.add_argument("--system-lines", type=int, default=10, help="rules in part (b)'s system prompt")
    p.add_argument("--tools", type=int, default=5, help="tools in part (b)'s request (>= 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    if min(args.runs, args.repeats, args.max_tokens, args.tools) < 1 or args.system_lines < 0:
        p.error("--runs, --repeats, --max-tokens and --tools must be >= 1, --system-lines >= 0")
    tic = time.perf_counter()
    report = {
        "command": shlex.join(["python", "-m", "bench.bench_server",
                               *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "note": "shared machine: other jobs ran during the benchmark (see load_average)"},
        "overhead": measure_overhead(args.runs, args.repeats, args.max_tokens),
        "ttft": measure_ttft(args.runs, args.system_lines, args.tools),
    }
    report["seconds"] = round(time.perf_counter() - tic, 1)
    print(markdown(report))
    print(f"\n{report['seconds']} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
