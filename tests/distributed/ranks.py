"""What each rank runs under ``mlx.launch`` in tests/distributed (not a test module itself).

``python ranks.py SPEC_JSON``: every rank loads ``spec["store"]`` with ``spec["load"]``; rank 0
runs ``spec["scenario"]`` and writes its findings to ``{spec["out"]}/rank0.json``; the other ranks
follow (or fail on purpose) and write ``rank<r>.json`` when their ``follow()`` returns.

Scenarios: ``"exact"`` (greedy tokens, a logits trace, a constrained and a tool-call generation,
the distributed statistics), ``"greedy"`` (greedy tokens only), ``"die"`` (rank 1 exits in the
middle of a generation), ``"hang"`` (rank 1 stops, SIGSTOP, in the middle of a generation).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashmoe_backend import FlashMoE  # noqa: E402
from flashmoe_backend.errors import DistributedError  # noqa: E402
from tests.distributed.common import (  # noqa: E402
    ASK,
    GREEDY_TOKENS,
    PROMPT,
    SCHEMA,
    TRACE_STEPS,
    WEATHER,
    logits_trace,
)


def exact(engine: FlashMoE, out: Path) -> dict:
    result = engine.generate(PROMPT, max_tokens=GREEDY_TOKENS)
    greedy_stats = engine.distributed_stats.to_dict()
    logits, _ = logits_trace(engine.model, PROMPT, TRACE_STEPS, drive=result.token_ids)
    np.save(out / "logits.npy", np.array(logits))
    structured = engine.generate(ASK, response_format=SCHEMA, max_tokens=40, temperature=1.0, seed=1)
    tool = engine.generate(ASK, tools=[WEATHER], tool_choice="required", max_tokens=120,
                           temperature=1.0, seed=0, parallel_tool_calls=False)
    return {
        "tokens": result.token_ids,
        "greedy_stats": greedy_stats,
        "structured": {"text": structured.text, "parsed": structured.parsed,
                       "finish_reason": structured.finish_reason},
        "tool": {"raw_text": tool.raw_text, "finish_reason": tool.finish_reason,
                 "calls": [[c.name, c.arguments] for c in tool.tool_calls]},
    }


def failing(engine: FlashMoE) -> dict:
    tic = time.monotonic()
    try:
        engine.generate(PROMPT, max_tokens=GREEDY_TOKENS)
    except DistributedError as e:
        seconds = time.monotonic() - tic
        try:  # a broken group refuses at once
            engine.generate(PROMPT, max_tokens=2)
            again = None
        except DistributedError as e2:
            again = str(e2)
        return {"error": str(e), "type": type(e).__name__, "seconds": seconds, "again": again}
    return {"error": None, "seconds": time.monotonic() - tic}


def sabotage(engine: FlashMoE, scenario: str, after: int) -> None:
    """Make this rank fail on its ``after``-th expert fetch, in the middle of a generation."""
    calls = 0

    def on_fetch(layer: int, experts: list[int]) -> None:
        nonlocal calls
        calls += 1
        if calls == after:
            if scenario == "die":
                os._exit(0)  # exits early (status 0: mlx.launch lets the other rank report)
            os.kill(os.getpid(), signal.SIGSTOP)

    engine.streamer.hooks.on_fetch = on_fetch


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = Path(spec["out"])
    mx.set_default_device(mx.cpu)
    engine = FlashMoE.load(spec["store"], **spec["load"])
    rank = engine.distributed.rank
    if rank == 0:
        if spec["scenario"] == "exact":
            found = exact(engine, out)
        elif spec["scenario"] == "greedy":
            found = {"tokens": engine.generate(PROMPT, max_tokens=GREEDY_TOKENS).token_ids}
        else:
            found = failing(engine)
        found["rank"] = rank
        engine.close()
        (out / "rank0.json").write_text(json.dumps(found))
        return
    if spec["scenario"] in ("die", "hang"):
        sabotage(engine, spec["scenario"], spec.get("after", 20))
    engine.follow()
    engine.close()
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "followed": True}))


if __name__ == "__main__":
    main()
