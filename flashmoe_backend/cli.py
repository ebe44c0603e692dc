"""The ``flashmoe`` command: pack, generate, chat, info, verify, bench, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .store import StoreError

MiB = 1024**2


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="store directory made by `flashmoe pack`")
    p.add_argument("--cache-gb", type=float, default=4.0, help="expert cache budget (GiB)")
    p.add_argument("--experts-per-token", "-k", type=int, default=None,
                   help="override the model's top-k (changes its output; default: exact)")
    p.add_argument("--page-cache", choices=("bypass", "keep"), default="bypass")
    p.add_argument("--policy", choices=("lfu", "lru"), default="lfu")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temperature", "--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None)


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=args.stop, enable_thinking=args.enable_thinking)


def _load(args):
    from .engine import FlashMoE

    return FlashMoE.load(args.store, cache_gb=args.cache_gb,
                         experts_per_token=args.experts_per_token, page_cache=args.page_cache,
                         policy=args.policy)


def _print_stats(stats) -> None:
    print(
        f"[flashmoe] prompt {stats.prompt_tokens} tok at {stats.prompt_tps:.1f} tok/s, "
        f"generated {stats.generated_tokens} tok at {stats.generation_tps:.1f} tok/s | "
        f"experts: {stats.hits} hits, {stats.misses} misses ({stats.hit_rate:.0%} hit rate), "
        f"{stats.bytes_read / MiB:.1f} MiB read, I/O wait {stats.io_seconds:.2f}s, "
        f"compute {stats.compute_seconds:.2f}s, cache {stats.cache_bytes / MiB:.1f} MiB "
        f"(peak {stats.cache_bytes_peak / MiB:.1f} MiB)",
        file=sys.stderr,
    )


def _stream_to_stdout(engine, prompt, **kwargs):
    from .generate import GenerationResult

    result = None
    for item in engine.stream(prompt, **kwargs):
        if isinstance(item, GenerationResult):
            result = item
        else:
            print(item.text, end="", flush=True)
    print()
    return result


def cmd_pack(args) -> int:
    from .packing import PackOptions, pack

    manifest = pack(args.src, args.dst, PackOptions(bits=args.bits, group_size=args.group_size,
                                                    dtype=args.dtype))
    print(f"packed {len(manifest.layers)} MoE layers, {manifest.expert_bytes / MiB:.1f} MiB of "
          f"experts, into {args.dst}")
    return 0


def cmd_generate(args) -> int:
    engine = _load(args)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    result = _stream_to_stdout(engine, prompt, **_sampling(args))
    _print_stats(result.stats)
    return 0


def cmd_chat(args) -> int:
    engine = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("flashmoe chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input(">> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        result = _stream_to_stdout(engine, messages, **_sampling(args))
        messages.append({"role": "assistant", "content": result.text})
        _print_stats(result.stats)
    return 0


def store_info(store: Path) -> dict:
    """Architecture and sizes of a store: what stays resident, what streams."""
    from .store import RESIDENT, check_store, read_config, read_manifest

    manifest, config = read_manifest(store), read_config(store)
    check_store(store, manifest, config)
    text = config.get("text_config", config)
    first = manifest.layers[0]
    return {
        "model_type": manifest.model_type,
        "layers": text.get("num_hidden_layers"),
        "moe_layers": len(manifest.layers),
        "hidden_size": text.get("hidden_size"),
        "experts_per_layer": first.num_experts,
        "experts_per_token": text.get("num_experts_per_tok"),
        "expert_quantization": first.quantization,
        "expert_record_bytes": first.record_bytes,
        "expert_bytes": manifest.expert_bytes,
        "resident_bytes": (store / RESIDENT).stat().st_size,
    }


def cmd_info(args) -> int:
    info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if key.endswith("bytes"):
            value = f"{value / MiB:,.1f} MiB ({value:,} bytes)"
        print(f"{key:22} {value}")
    return 0


def cmd_verify(args) -> int:
    from .store import verify_store

    report = verify_store(args.store, progress=not args.quiet)
    for file, expert in report.bad:
        print(f"CORRUPT {args.store / file}: expert {expert} fails its checksum", file=sys.stderr)
    status = "OK" if report.ok else f"{len(report.bad)} corrupt record(s)"
    print(f"{status}: {report.records} records, {report.bytes / MiB:.1f} MiB checked")
    return 0 if report.ok else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(cache_gb=args.cache_gb, max_tokens=args.max_tokens)


def cmd_bench(args) -> int:
    from .bench import run

    run(args, sys.argv[2:])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="pack a local checkpoint into a streaming store")
    p.add_argument("src", type=Path, help="Hugging Face or mlx-community checkpoint directory")
    p.add_argument("dst", type=Path, help="store directory to create")
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4, 5, 6, 8, or 16 (no quantization)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_engine_args(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive streaming chat")
    _add_engine_args(p)
    p.add_argument("--system", default=None)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="architecture and sizes of a store")
    p.add_argument("store", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check every expert record's checksum")
    p.add_argument("store", type=Path)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_verify)

    from .bench import add_arguments

    p = sub.add_parser("bench", help="decode/prefill against the physical floor (JSON + markdown)")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="run the embedded demo model offline")
    p.add_argument("--cache-gb", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StoreError as e:
        print(f"flashmoe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
