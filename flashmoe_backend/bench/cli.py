"""The command line: ``flashmoe bench synthetic|model ...`` (= ``python -m flashmoe_backend.bench``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from flashmoe_backend.bench.config import EXPERIMENTS, ModelConfig, SyntheticConfig, from_namespace
from flashmoe_backend.bench.model import run_model
from flashmoe_backend.bench.report import write_report
from flashmoe_backend.bench.synthetic import run_synthetic
from flashmoe_backend.experts.cache import POLICIES


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _add_synthetic(p: argparse.ArgumentParser) -> None:
    d = SyntheticConfig()
    p.add_argument(
        "--store",
        type=Path,
        default=d.store,
        help="synthetic store directory: reused if it exists, else built there (default: a temp dir)",
    )
    p.add_argument("--keep-store", action="store_true", help="keep a store this run built (default: delete)")
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("-k", type=int, default=d.k, help="experts per token of the trace")
    p.add_argument(
        "--budget-frac", type=float, default=d.budget_frac, help="cache budget, share of the expert bytes"
    )
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens, help="tokens timed per decode run")
    p.add_argument("--warmup", type=int, default=d.warmup, help="tokens decoded before timing (from cold)")
    p.add_argument(
        "--policy-tokens", type=int, default=d.policy_tokens, help="trace length of the policy study"
    )
    p.add_argument("--prefill-tokens", type=int, default=d.prefill_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--io-threads", type=int, default=d.io_threads)
    p.add_argument("--write-threads", type=int, default=d.write_threads)
    p.add_argument("--half-life", type=float, default=d.half_life, help="lfu half-life (default: cache.py's)")
    p.add_argument(
        "--half-lives",
        type=_float_list,
        default=d.half_lives,
        help="lfu half-lives compared in the policy study",
    )
    p.add_argument("--guard", type=int, default=d.guard, help="lfu recency guard (default: cache.py's)")
    p.add_argument("--quick-policies", action="store_true", help="policy study on the calibrated trace only")
    p.add_argument("--prefetch-recalls", type=_float_list, default=d.prefetch_recalls)
    p.add_argument(
        "--compute-ms",
        type=float,
        default=d.compute_ms,
        help="emulated non-expert compute per layer for the prefetch-overlap runs (0: skip)",
    )
    p.add_argument(
        "--no-touch",
        dest="touch",
        action="store_false",
        help="skip the expert-compute stand-in (one read of each needed record from memory)",
    )
    p.add_argument("--disk-sample-bytes", type=float, default=d.disk_sample_bytes)
    p.add_argument("--memory-sample-bytes", type=float, default=d.memory_sample_bytes)
    p.add_argument(
        "--mmap-random",
        action="store_true",
        help="also run the mmap baseline with MADV_RANDOM (4 KiB faults: very slow)",
    )
    p.add_argument("--drop-caches", action="store_true", help="also write /proc/sys/vm/drop_caches (root)")
    p.add_argument(
        "--repeats",
        type=int,
        default=d.repeats,
        help="rounds of the decode runs (round-robin); each configuration keeps its fastest",
    )
    p.add_argument(
        "--experiments", default=d.experiments, help=f"comma list of {','.join(EXPERIMENTS)} (or all)"
    )
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a seconds-long smoke run (CI)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--markdown", type=Path, default=None, help="write the markdown report here")


def _add_model(p: argparse.ArgumentParser) -> None:
    d = ModelConfig(store=Path())
    p.add_argument("store", type=Path)
    p.add_argument(
        "--cache-gb", type=float, default=d.cache_gb, help="default: --budget-frac of the expert bytes"
    )
    p.add_argument("--budget-frac", type=float, default=d.budget_frac)
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--prefill-step", type=int, default=d.prefill_step)
    p.add_argument("--policy", choices=POLICIES, default=d.policy)
    p.add_argument("--page-cache", choices=("bypass", "keep"), default=d.page_cache)
    p.add_argument("--io-threads", type=int, default=d.io_threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-k4", dest="with_k4", action="store_false", help="skip the K=4 run")
    p.add_argument(
        "--no-mlx-lm",
        dest="with_mlx_lm",
        action="store_false",
        help="skip mlx-lm with the whole model in memory",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``flashmoe bench`` arguments (subcommands ``synthetic`` and ``model``)."""
    sub = parser.add_subparsers(dest="bench_mode", required=True)
    _add_synthetic(
        sub.add_parser("synthetic", help="Qwen3.5-397B-sized synthetic store + calibrated routing trace")
    )
    _add_model(sub.add_parser("model", help="FlashMoE.generate on a real store"))


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark ``args`` describes; write and return its report."""
    if argv is None:  # through the ``flashmoe`` command
        command = shlex.join(["flashmoe", *sys.argv[1:]])
    else:
        command = shlex.join(["python", "-m", "flashmoe_backend.bench", *argv])
    if args.bench_mode == "synthetic":
        report = run_synthetic(from_namespace(SyntheticConfig, args).resolved(), command)
    else:
        report = run_model(from_namespace(ModelConfig, args), command)
    # The reader once could not read bf16 tensors and the benchmark shimmed it; the key stays.
    report["reader_bf16_shim"] = False
    write_report(report, args.out, args.markdown)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    from flashmoe_backend.bench import __doc__ as summary

    parser = argparse.ArgumentParser(prog="flashmoe bench", description=summary.split("\n\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    run(parser.parse_args(argv), argv)
    return 0
