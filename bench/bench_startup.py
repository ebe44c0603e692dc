"""Startup time of the ``flashmoe`` command and of ``import flashmoe_backend``, in fresh processes.

    python -m bench.bench_startup [--runs 7] [--repetitions 3] [--out bench/results/startup]

Times three commands from spawn to exit, each in a new process (nothing cached in the
interpreter; the OS file cache is warmed by one discarded run of each first):

* ``flashmoe --help`` (the installed entry point), target <= 1 s;
* ``flashmoe info demo``, target <= 2 s;
* ``python -c "import flashmoe_backend"`` (no target: the lazy package should cost ~nothing).

Each repetition runs every command ``--runs`` times, round-robin, so that a change in the
machine's load hits all commands alike; it reports the median and the spread (min-max) per
command, and the load average around it. The verdict uses the median over all runs. Writes
``OUT.json`` and ``OUT.md``.

``--pythonpath DIR`` times another copy of the package (e.g. ``git archive`` of an older commit
unpacked in DIR: ``PYTHONPATH`` comes before the editable install), ``--info-store`` the store
``info`` reads (a copy without the ``demo`` name needs the path of the demo store).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"flashmoe --help": 1.0, "flashmoe info demo": 2.0}


def flashmoe_executable() -> str:
    """The ``flashmoe`` entry point of this interpreter's environment (else the one on PATH)."""
    beside = Path(sys.executable).parent / "flashmoe"
    found = str(beside) if beside.exists() else shutil.which("flashmoe")
    if found is None:
        raise SystemExit("flashmoe is not installed: pip install -e .")
    return found


def commands(info_store: str) -> dict[str, list[str]]:
    """Label -> argv of each timed command."""
    flashmoe = flashmoe_executable()
    return {
        "flashmoe --help": [flashmoe, "--help"],
        "flashmoe info demo": [flashmoe, "info", info_store],
        'python -c "import flashmoe_backend"': [sys.executable, "-c", "import flashmoe_backend"],
    }


def time_once(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one run of ``argv`` in a fresh process; fails loudly if it fails.

    It runs in the temp directory: ``python -c`` puts its working directory first on
    ``sys.path``, where a checkout's ``flashmoe_backend`` would shadow the one being timed."""
    tic = time.perf_counter()
    done = subprocess.run(
        argv, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    seconds = time.perf_counter() - tic
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return seconds


def summarize(seconds: list[float]) -> dict:
    """Median and spread of a list of timings."""
    return {
        "runs": [round(s, 4) for s in seconds],
        "median": round(statistics.median(seconds), 4),
        "min": round(min(seconds), 4),
        "max": round(max(seconds), 4),
    }


def repetition(cmds: dict[str, list[str]], runs: int, env: dict[str, str]) -> dict:
    """``runs`` timings of every command, round-robin, with the load average before and after."""
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {label: [] for label in cmds}
    for _ in range(runs):
        for label, argv in cmds.items():
            seconds[label].append(time_once(argv, env))
    return {
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "commands": {label: summarize(s) for label, s in seconds.items()},
    }


def verdicts(reps: list[dict]) -> dict:
    """Per command: the median over all runs of all repetitions, against its target."""
    out = {}
    for label in reps[0]["commands"]:
        every = [s for rep in reps for s in rep["commands"][label]["runs"]]
        medians = [rep["commands"][label]["median"] for rep in reps]
        target = TARGETS.get(label)
        median = statistics.median(every)
        out[label] = {
            "median": round(median, 4),
            "min": round(min(every), 4),
            "max": round(max(every), 4),
            "repetition_medians": medians,
            "target": target,
            "met": None if target is None else median <= target,
        }
    return out


def to_markdown(report: dict) -> str:
    """The report as a markdown section body."""
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpus']} CPUs, Python {report['machine']['python']}, "
        f"{report['machine']['platform']}; {report['runs']} runs x {len(report['repetitions'])} "
        "repetitions per command, fresh process each, after one warm-up run.",
        "",
        "| command | median | min-max | repetition medians | target | met |",
        "|---|---:|---:|---|---:|---|",
    ]
    for label, v in report["summary"].items():
        target = "-" if v["target"] is None else f"<= {v['target']:.1f} s"
        met = "-" if v["met"] is None else ("yes" if v["met"] else "**no**")
        reps = ", ".join(f"{m:.3f}" for m in v["repetition_medians"])
        spread = f"{v['min']:.3f}-{v['max']:.3f} s"
        lines.append(f"| `{label}` | {v['median']:.3f} s | {spread} | {reps} | {target} | {met} |")
    loads = ", ".join(f"{r['load_before']:.2f}->{r['load_after']:.2f}" for r in report["repetitions"])
    lines += ["", f"Load average (1 min) around each repetition: {loads}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed runs per command per repetition (>= 5)")
    p.add_argument("--repetitions", type=int, default=3, help=">= 2")
    p.add_argument("--out", type=Path, default=Path("bench/results/startup"), help="writes OUT.json, OUT.md")
    p.add_argument("--pythonpath", type=Path, default=None, help="time the package found in this directory")
    p.add_argument("--info-store", default="demo", help="the STORE of the info command")
    args = p.parse_args()
    if args.runs < 5 or args.repetitions < 2:
        p.error("--runs must be >= 5 and --repetitions >= 2 for a median and a spread")

    env = dict(os.environ)
    if args.pythonpath is not None:
        env["PYTHONPATH"] = str(args.pythonpath.resolve())
    cmds = commands(args.info_store)
    for argv in cmds.values():  # warm the OS file cache: the first run reads every .py and .so
        time_once(argv, env)
    reps = []
    for i in range(args.repetitions):
        reps.append(repetition(cmds, args.runs, env))
        for label, s in reps[-1]["commands"].items():
            print(
                f"repetition {i + 1}: {label:38} median {s['median']:.3f} s ({s['min']:.3f}-{s['max']:.3f})"
            )
    report = {
        "command": shlex.join(["python", "-m", "bench.bench_startup", *sys.argv[1:]]),
        "runs": args.runs,
        "pythonpath": None if args.pythonpath is None else str(args.pythonpath),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "timed": {label: shlex.join([Path(argv[0]).name, *argv[1:]]) for label, argv in cmds.items()},
        "targets_s": TARGETS,
        "repetitions": reps,
        "summary": verdicts(reps),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
