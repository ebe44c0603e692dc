"""Expert parallelism (issue 20): bytes each rank reads per token, and the time the protocol's
collectives take per token, for N = 1, 2, 4 ranks at Qwen3.5-397B's shapes.

    python -m bench.bench_distributed [--tokens 1000] [--warmup 300] [--fractions 0.1 0.25]
        [--ranks 1 2 4] [--runs 2] [--comm-tokens 64] [--out bench/results/distributed]

Two parts:

* **bytes** (a simulation, deterministic): the calibrated routing trace (``bench/trace.py``, 60
  layers x 512 experts, k=10) through the real ``ExpertStreamer`` and ``ExpertCache`` (default
  policy) with a reader that reads nothing, one cache per rank of the same per-rank budget,
  each rank seeing only the experts it owns (``distributed.owners``), for both expert splits;
  and tensor parallelism of every expert as a model (each rank would hold 1/N of every expert:
  the misses of one cache N times the budget, 1/N of each record read per rank; it would need
  re-packed records, so it is not implemented). Per token: the mean bytes a rank reads, and the
  critical path: the sum over layers of the most any rank reads in that layer (each MoE layer
  ends with a collective, so a layer takes as long as its slowest rank).
* **comm** (measured): ``mlx.launch -n N --backend ring`` over loopback, this module's
  ``--comm-rank`` mode on every rank: rank 0 drives the real ``ExpertGroup.forward`` for 60
  layers per decode token (decode shapes: one row of 4,096 bf16, k=10) with a stand-in switch
  that computes nothing (zeros), the others the real ``follow`` loop; so what is timed is the
  protocol alone (two ``all_sum``s per layer, their Python around them), per token. ``--runs``
  launches per N, each reported, with the spread.

Then the modelled decode speedup with one disk per machine: I/O time = critical-path bytes /
disk bandwidth (each machine reads its share from its own disk at the single-disk bandwidth),
plus the measured communication per token; a model, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flashmoe_backend.bench import trace as tr
from flashmoe_backend.bench.shapes import QWEN35
from flashmoe_backend.bench.synthetic_store import synthetic_manifest
from flashmoe_backend.distributed import SPLITS, owners

RECORD = 7_077_888  # one 4-bit Qwen3.5-397B expert record (bench/shapes.py)
LAYERS = 60
MiB = 1024**2
# Single-disk bandwidths the model uses: this machine's measured random 6.75 MB reads
# (bench/RESULTS.md, "Expert streaming on this CPU machine"), and flash-moe's M3 Max figure for
# cold parallel 7 MB reads with F_NOCACHE (../shared/DESIGN.md section 9).
DISKS = {"this machine (1.2 GB/s)": 1.2e9, "M3 Max SSD (5.5 GB/s cold)": 5.5e9}


# -- bytes -----------------------------------------------------------------------------------


class _NullReader:
    def read_iter(self, layer, experts):
        return iter([()] * len(experts))  # any value but None


def _misses(trace: np.ndarray, budget: int, owned: np.ndarray | None, warmup: int) -> np.ndarray:
    """Misses per (token, layer) after ``warmup`` tokens, of one cache of ``budget`` bytes that
    sees only the experts ``owned`` (``[experts]`` bools; None: all)."""
    from flashmoe_backend.experts.cache import ExpertCache
    from flashmoe_backend.experts.switch import ExpertStreamer

    manifest = synthetic_manifest(trace.shape[1], QWEN35["experts"], RECORD)
    cache = ExpertCache(budget)
    streamer = ExpertStreamer(manifest, _NullReader(), cache)
    out = np.zeros((trace.shape[0] - warmup, trace.shape[1]), dtype=np.int64)
    for t in range(trace.shape[0]):
        for layer in range(trace.shape[1]):
            experts = trace[t, layer]
            if owned is not None:
                experts = experts[owned[experts]]
            before = cache.counters.misses
            streamer.fetch(layer, experts.tolist())
            streamer.release()
            if t >= warmup:
                out[t - warmup, layer] = cache.counters.misses - before
    return out


def bytes_study(trace: np.ndarray, fractions: list[float], ranks: list[int], warmup: int) -> list[dict]:
    total = trace.shape[1] * QWEN35["experts"] * RECORD
    rows = []
    for fraction in fractions:
        budget = int(fraction * total)
        single = None
        for n in ranks:
            splits = ["-"] if n == 1 else [*SPLITS, "tensor (model)"]
            for split in splits:
                tic = time.perf_counter()
                if split == "tensor (model)":
                    per_rank = [_misses(trace, n * budget, None, warmup) * RECORD / n] * n
                elif n == 1:
                    per_rank = [_misses(trace, budget, None, warmup) * RECORD]
                else:
                    owner = owners(QWEN35["experts"], n, split)
                    per_rank = [_misses(trace, budget, owner == r, warmup) * RECORD for r in range(n)]
                stacked = np.stack(per_rank)  # [rank, token, layer] bytes
                per_token = stacked.sum(axis=2)  # [rank, token]
                critical = stacked.max(axis=0).sum(axis=1)  # [token]
                row = {
                    "budget_fraction": fraction,
                    "ranks": n,
                    "split": split,
                    "mean_rank_MiB_per_token": float(per_token.mean() / MiB),
                    "max_rank_MiB_per_token": float(per_token.mean(axis=1).max() / MiB),
                    "critical_MiB_per_token": float(critical.mean() / MiB),
                    "seconds": time.perf_counter() - tic,
                }
                if n == 1:
                    single = row["critical_MiB_per_token"]
                row["critical_vs_one"] = row["critical_MiB_per_token"] / single if single else None
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# -- comm ------------------------------------------------------------------------------------


class _Counters:
    bytes_read = experts_read = 0
    io_seconds = 0.0


class _Streamer:
    """What ``ExpertGroup`` reads of a streamer: the manifest, counters and cache gauges."""

    def __init__(self, layers: int):
        from flashmoe_backend.experts.cache import ExpertCache

        self.manifest = synthetic_manifest(layers, QWEN35["experts"], RECORD)
        self.counters = _Counters()
        self.cache = ExpertCache(RECORD)


class _ZeroSwitch:
    """A layer that computes nothing: its share is zeros of the real shape (only the protocol
    is timed)."""

    def __init__(self, layer: int):
        self.layer = layer

    def partial(self, x, host, dtype, experts):
        import mlx.core as mx

        return mx.zeros((*host.shape, x.shape[-1]), dtype=x.dtype)


def comm_rank(tokens: int, out: Path) -> None:
    """One rank of the communication measurement (under ``mlx.launch``)."""
    import mlx.core as mx

    from flashmoe_backend.distributed import ExpertGroup

    mx.set_default_device(mx.cpu)
    group = mx.distributed.init(strict=True)
    switches = [_ZeroSwitch(layer) for layer in range(LAYERS)]
    shard = ExpertGroup(group, _Streamer(LAYERS), width=QWEN35["hidden"], k=QWEN35["k"])
    if group.rank() != 0:
        shard.follow(switches)
        return
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, 1, QWEN35["hidden"])).astype(np.float32)).astype(mx.bfloat16)
    host = np.sort(rng.choice(QWEN35["experts"], QWEN35["k"], replace=False))[None, None]
    times = []
    for t in range(tokens + 4):  # the first 4 warm up
        tic = time.perf_counter()
        for switch in switches:
            mx.eval(shard.forward(switch, x, host, mx.uint32))
        if t >= 4:
            times.append(time.perf_counter() - tic)
    stats = shard.gather_stats(tokens + 4)
    shard.close()
    out.write_text(json.dumps({
        "ranks": group.size(),
        "tokens": tokens,
        "ms_per_token_median": 1000 * statistics.median(times),
        "ms_per_token_p10": 1000 * float(np.percentile(times, 10)),
        "ms_per_token_p90": 1000 * float(np.percentile(times, 90)),
        "us_per_layer_median": 1e6 * statistics.median(times) / LAYERS,
        "bytes_per_token_rank0": stats.ranks[0].comm_bytes / (tokens + 4),
        # the part of rank 0's time spent inside the collectives' evaluations (the rest: Python,
        # building the messages, the stand-in layer's zeros)
        "in_collectives": stats.ranks[0].comm_seconds / (sum(times) * (tokens + 4) / tokens),
        "loadavg": os.getloadavg(),
    }))


def comm_study(ranks: list[int], runs: int, tokens: int, out_dir: Path) -> list[dict]:
    from tests.distributed.common import free_ports, mlx_launch

    rows = []
    for n in ranks:
        if n < 2:
            continue
        for run in range(runs):
            result = out_dir / f"comm_n{n}_run{run}.json"
            result.unlink(missing_ok=True)
            argv = [*mlx_launch(), "-n", str(n), "--backend", "ring", "--starting-port",
                    str(free_ports(n)),
                    "--python", sys.executable, "-m", "bench.bench_distributed", "--comm-rank",
                    "--comm-tokens", str(tokens), "--comm-out", str(result)]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
            if not result.exists():
                raise RuntimeError(f"comm run N={n} failed:\n{done.stderr[-3000:]}")
            row = {"run": run, **json.loads(result.read_text())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# -- the model -------------------------------------------------------------------------------


def speedup_model(byte_rows: list[dict], comm_rows: list[dict]) -> list[dict]:
    comm = {}
    for n in {r["ranks"] for r in comm_rows}:
        comm[n] = statistics.median(r["ms_per_token_median"] for r in comm_rows if r["ranks"] == n) / 1000
    rows = []
    for fraction in sorted({r["budget_fraction"] for r in byte_rows}):
        one = next(r for r in byte_rows if r["budget_fraction"] == fraction and r["ranks"] == 1)
        for r in byte_rows:
            if r["budget_fraction"] != fraction or r["ranks"] == 1:
                continue
            for disk, bandwidth in DISKS.items():
                t1 = one["critical_MiB_per_token"] * MiB / bandwidth
                tn = r["critical_MiB_per_token"] * MiB / bandwidth + comm.get(r["ranks"], 0.0)
                rows.append({"budget_fraction": fraction, "ranks": r["ranks"], "split": r["split"],
                             "disk": disk, "io_ms_one": 1000 * t1, "ms_n": 1000 * tn,
                             "speedup": t1 / tn})
    return rows


def markdown(byte_rows: list[dict], comm_rows: list[dict], model_rows: list[dict]) -> str:
    lines = ["| per-rank budget (of all experts) | ranks | split | MiB/token, mean rank | "
             "MiB/token, busiest rank | critical path MiB/token | vs one process |", "|---" * 7 + "|"]
    for r in byte_rows:
        lines.append(f"| {r['budget_fraction']:.0%} | {r['ranks']} | {r['split']} | "
                     f"{r['mean_rank_MiB_per_token']:.1f} | {r['max_rank_MiB_per_token']:.1f} | "
                     f"{r['critical_MiB_per_token']:.1f} | {r['critical_vs_one']:.3f} |")
    lines += ["", "| ranks | run | ms/token (median; p10-p90) | us/layer | "
              "bytes/token in rank 0's collectives | load avg |", "|---" * 6 + "|"]
    for r in comm_rows:
        lines.append(f"| {r['ranks']} | {r['run']} | {r['ms_per_token_median']:.2f} "
                     f"({r['ms_per_token_p10']:.2f}-{r['ms_per_token_p90']:.2f}) | "
                     f"{r['us_per_layer_median']:.0f} | {r['bytes_per_token_rank0'] / 1024:.0f} KiB | "
                     f"{r['loadavg'][0]:.1f} |")
    lines += ["", "| budget | ranks | split | disk | one process I/O ms/token | "
              "N ranks ms/token (I/O + comm) | speedup (model) |", "|---" * 7 + "|"]
    for r in model_rows:
        lines.append(f"| {r['budget_fraction']:.0%} | {r['ranks']} | {r['split']} | {r['disk']} | "
                     f"{r['io_ms_one']:.0f} | {r['ms_n']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--comm-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bytes", action="store_true")
    p.add_argument("--skip-comm", action="store_true")
    p.add_argument("--comm-from", type=Path, nargs="+", default=None,
                   help="comm results (JSON files of earlier runs, e.g. another machine's) to model "
                   "with, instead of measuring here")
    p.add_argument("--out", type=Path, default=Path("bench/results/distributed"))
    p.add_argument("--comm-rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--comm-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.comm_rank:
        comm_rank(args.comm_tokens, args.comm_out)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = args.out.parent / (args.out.name + "_runs")
    work.mkdir(exist_ok=True)
    byte_rows = []
    if not args.skip_bytes:
        spec = tr.TraceSpec(tokens=args.warmup + args.tokens, layers=LAYERS, seed=args.seed)
        byte_rows = bytes_study(tr.generate_trace(spec), args.fractions, args.ranks, args.warmup)
    if args.comm_from:
        comm_rows = [{"run": i, **json.loads(f.read_text())} for i, f in enumerate(args.comm_from)]
    else:
        comm_rows = [] if args.skip_comm else comm_study(args.ranks, args.runs, args.comm_tokens, work)
    model_rows = speedup_model(byte_rows, comm_rows) if byte_rows else []
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "bytes": byte_rows,
              "comm": comm_rows, "model": model_rows, "loadavg": os.getloadavg()}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(byte_rows, comm_rows, model_rows))
    print(markdown(byte_rows, comm_rows, model_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
