"""What the distributed tests and the script their ranks run (``ranks.py``) share: the requests,
the logits trace, and ``launch``, which runs ``ranks.py`` on two ranks under ``mlx.launch``."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

PROMPT = [5, 17, 42, 99, 7, 250, 31, 64, 128, 3, 77, 11]
GREEDY_TOKENS = 40
TRACE_STEPS = 16
ASK = [{"role": "user", "content": "What is the weather in Oslo for three days?"}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": -5, "maximum": 5}},
          "required": ["ok", "n"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}}
RANKS = Path(__file__).with_name("ranks.py")
REPO = Path(__file__).resolve().parents[2]


def logits_trace(model, prompt, steps, drive):
    """Logits of a prefill then ``steps`` cached decode steps fed ``drive``'s tokens."""
    from mlx_lm.models.cache import make_prompt_cache  # here: the benchmark's launcher lacks mlx-lm

    cache = make_prompt_cache(model)
    out = [model(mx.array(prompt)[None], cache=cache)[0]]
    for tok in drive[:steps]:
        out.append(model(mx.array([[tok]]), cache=cache)[0])
    return mx.concatenate(out, axis=0), list(drive[:steps])


def mlx_launch() -> list[str]:
    """The ``mlx.launch`` command of this environment (the venv's, else the module)."""
    found = Path(sys.executable).with_name("mlx.launch")
    if found.exists():
        return [str(found)]
    if shutil.which("mlx.launch"):
        return [shutil.which("mlx.launch")]
    # The module has no __main__ guard: call its main (argv after "-c" are the arguments).
    return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def free_ports(n: int = 2) -> int:
    """A port p with p .. p + n - 1 free on loopback: ``mlx.launch`` gives rank r port p + r
    (tests and benchmarks may launch at the same time, so not its fixed default)."""
    for _ in range(200):
        port = random.randint(20000, 60000)
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports on loopback")


@dataclass
class Launch:
    returncode: int | None  # None: killed by the test (a rank hung, as asked)
    stdout: str
    stderr: str
    results: dict[int, dict]  # rank -> what it wrote
    seconds: float


def launch(spec: dict, out: Path, *, ranks: int = 2, timeout: float = 300.0,
           wait_for: int | None = None) -> Launch:
    """Run ``ranks.py`` on ``ranks`` ranks over loopback (ring backend) with ``spec``.

    ``wait_for``: return as soon as that rank wrote its results, ending the launch (a scenario
    whose other rank hangs on purpose). The launch runs in a session of its own, which is ended
    (by its id) if it outlives ``timeout``.
    """
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(out)}
    argv = [*mlx_launch(), "-n", str(ranks), "--backend", "ring", "--starting-port",
            str(free_ports(ranks)), "--python", sys.executable, str(RANKS), json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tic = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    killed = False
    try:
        if wait_for is not None:
            target = out / f"rank{wait_for}.json"
            while not target.exists() and proc.poll() is None and time.monotonic() - tic < timeout:
                time.sleep(0.2)
            time.sleep(0.5)  # let the rank finish writing
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
        stdout, stderr = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - tic)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        killed = True
        stdout, stderr = proc.communicate()
    results = {}
    for r in range(ranks):
        path = out / f"rank{r}.json"
        if path.exists():
            results[r] = json.loads(path.read_text())
    return Launch(None if killed else proc.returncode, stdout, stderr, results,
                  time.monotonic() - tic)
