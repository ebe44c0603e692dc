"""The ``flashmoe`` command: pack, generate, chat, serve, info, verify, bench, download, demo.

Only the standard library is imported at the top: each command imports what it needs (the engine
pulls in mlx-lm and transformers, seconds), so ``flashmoe --help`` and ``flashmoe info`` start at
once. Bad arguments are rejected by argparse's ``type`` functions below with one line and exit
code 2; engine and store errors get the same treatment in ``main`` (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from flashmoe_backend.store.source import DEMO_NAME, default_store

MiB = 1024**2
PROG = "flashmoe"
DESCRIPTION = "flashmoe: run Mixture-of-Experts LLMs larger than memory by streaming experts from SSD."
EPILOG = """examples:
  flashmoe demo                          the embedded demo model, offline
  flashmoe chat demo                     chat with it
  flashmoe generate demo -p "Hello"      one answer
  flashmoe serve demo                    an OpenAI-compatible server on http://127.0.0.1:8000/v1
  flashmoe info demo                     what a store holds
  flashmoe chat ~/models/Qwen3.5-397B-A17B-4bit   an mlx-community checkpoint, read in place
  flashmoe download mlx-community/Qwen3.5-397B-A17B-4bit   then: flashmoe chat <that repo id>"""
STORE_HELP = (
    "store directory made by 'flashmoe pack'; an mlx-community checkpoint directory (read in "
    "place, no pack); a Hugging Face repo id ORG/NAME in the local Hugging Face cache; or 'demo' "
    "for the embedded demo model (./demo for a directory of that name)"
)

# -- argument types: each raises ArgumentTypeError, which argparse prints as
# "flashmoe: error: argument --NAME: MESSAGE" with exit code 2 --------------------------------


def _bounds(gt: float | None, ge: float | None, le: float | None) -> str:
    """The allowed range in words: "> 0", ">= 1", "in (0, 1]"."""
    if (gt is not None or ge is not None) and le is not None:
        return f"in {'(' if gt is not None else '['}{gt if gt is not None else ge}, {le}]"
    if gt is not None:
        return f"> {gt}"
    if ge is not None:
        return f">= {ge}"
    return f"<= {le}"


def number(
    kind: type[int] | type[float] = float,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
) -> Callable[[str], int | float]:
    """An argparse ``type``: a finite ``kind`` (int or float) within the given bounds."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        below = (gt is not None and value <= gt) or (ge is not None and value < ge)
        if below or (le is not None and value > le):
            raise argparse.ArgumentTypeError(f"must be {_bounds(gt, ge, le)}, got {text.strip()}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some of its own messages
    return parse


def nonempty(text: str) -> str:
    """An argparse ``type``: any string but the empty one."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def store_path(text: str) -> Path:
    """An argparse ``type`` for a STORE: a directory, or ``demo`` for the embedded demo store."""
    if text == DEMO_NAME:
        return default_store()
    return Path(nonempty(text)).expanduser()


def dir_path(text: str) -> Path:
    """An argparse ``type`` for a directory to write to (created later if missing)."""
    return Path(nonempty(text)).expanduser()


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors, in every subcommand too, start "flashmoe: error:" like
    the errors ``main`` reports (argparse would write "flashmoe generate: error:")."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


# -- arguments shared by several commands ---------------------------------------------------------


def _add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", type=store_path, help=STORE_HELP)
    p.add_argument(
        "--download",
        action="store_true",
        help="when STORE is a Hugging Face repo id not yet in the local cache, download it first "
        "(huggingface_hub: resumable, with progress bars); without it nothing is downloaded",
    )


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    _add_store_arg(p)
    p.add_argument("--cache-gb", type=number(gt=0), default=4.0, help="expert cache budget (GiB)")
    p.add_argument(
        "--experts-per-token",
        "-k",
        type=number(int, ge=1),
        default=None,
        help="override the model's top-k (changes its output; default: exact)",
    )
    p.add_argument("--page-cache", choices=("bypass", "keep"), default="bypass")
    p.add_argument("--policy", choices=("lfu", "lru"), default="lfu")


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from flashmoe_backend.server.settings import ServerSettings  # standard library only

    defaults = ServerSettings(model_id="")
    p.add_argument(
        "--host", type=nonempty, default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)",
    )
    p.add_argument("--port", type=number(int, ge=0, le=65535), default=8000, help="default: 8000")
    p.add_argument(
        "--api-key", type=nonempty, default=os.environ.get("FLASHMOE_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default: $FLASHMOE_API_KEY, else none)",
    )
    p.add_argument(
        "--model-id", type=nonempty, default=None,
        help="the model's name in /v1/models and requests (default: 'demo', or the store directory's name)",
    )
    p.add_argument(
        "--max-queue", type=number(int, ge=0), default=defaults.max_queue,
        help=f"requests that may wait while one generates; beyond them 429 (default: {defaults.max_queue})",
    )
    p.add_argument(
        "--timeout", type=number(ge=0), default=defaults.timeout,
        help=f"seconds a request may take, queueing included; 0: no limit (default: {defaults.timeout:g})",
    )
    p.add_argument(
        "--max-body-bytes", type=number(int, ge=1), default=defaults.max_body_bytes,
        help=f"largest request body; beyond it 413 (default: {defaults.max_body_bytes})",
    )
    p.add_argument(
        "--max-tokens-limit", type=number(int, ge=1), default=defaults.max_tokens_limit,
        help=f"largest max_tokens a request may ask for (default: {defaults.max_tokens_limit})",
    )
    p.add_argument(
        "--prompt-cache-dir", metavar="DIR", type=dir_path,
        default=None,
        help="keep the prefill of each system prompt + tool list in DIR (created if missing), so that "
        "a restarted server does not prefill it again (default: memory only)",
    )
    p.add_argument(
        "--offline", action="store_true",
        help="block every connection and DNS lookup beyond this machine (flashmoe_backend.offline)",
    )


SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    # No defaults here (None): what the user leaves out comes from the store's
    # generation_config.json, else from GenerationParams.
    p.add_argument("--max-tokens", "-m", type=number(int, ge=1), help="default: the store's, else 256")
    p.add_argument("--temperature", "--temp", type=number(ge=0), help="default: the store's, else 0 (greedy)")
    p.add_argument("--top-p", type=number(gt=0, le=1))
    p.add_argument("--top-k", type=number(int, ge=0), help="0: no top-k cut")
    p.add_argument("--min-p", type=number(ge=0, le=1))
    p.add_argument("--repetition-penalty", type=number(gt=0))
    p.add_argument("--seed", type=number(int, ge=0))
    p.add_argument("--stop", type=nonempty, action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--enable-thinking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the model reason before answering (default: the store's, else the chat template's)",
    )
    p.add_argument(
        "--hide-reasoning",
        action="store_true",
        help="do not print reasoning (default: dimmed on a terminal, else lines starting with "
        "'[reasoning] ')",
    )


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The generation arguments the user gave (the engine fills in the store's defaults)."""
    kwargs = {name: getattr(args, name) for name in SAMPLING if getattr(args, name) is not None}
    if args.stop:
        kwargs["stop"] = args.stop
    if args.enable_thinking is not None:
        kwargs["enable_thinking"] = args.enable_thinking
    return kwargs


def fetch_if_asked(args: argparse.Namespace) -> None:
    """``--download``: a repo id not in the local Hugging Face cache is downloaded first."""
    from flashmoe_backend.store.source import repo_id_of

    repo = repo_id_of(args.store) if getattr(args, "download", False) else None
    if repo is None:
        return
    from flashmoe_backend.errors import StoreNotFoundError
    from flashmoe_backend.store.hub import cached_snapshot, download

    try:
        cached_snapshot(repo)
    except StoreNotFoundError:
        print(f"flashmoe: downloading {repo} into the Hugging Face cache", file=sys.stderr)
        download(repo)


def _load(args: argparse.Namespace):
    from flashmoe_backend.engine import FlashMoE

    fetch_if_asked(args)
    engine = FlashMoE.load(
        args.store,
        cache_gb=args.cache_gb,
        experts_per_token=args.experts_per_token,
        page_cache=args.page_cache,
        policy=args.policy,
        # serve's option only; generate and chat run one process per conversation
        prompt_cache_dir=getattr(args, "prompt_cache_dir", None),
    )
    if engine.distributed is not None and not engine.distributed.is_leader:
        # Under mlx.launch every rank runs the same command; rank 0 does what it says, the
        # others serve their experts to it, print nothing, and end when rank 0 closes.
        try:
            engine.follow()
        finally:
            engine.close()
        raise SystemExit(0)
    return engine


def _answer(engine, prompt, args: argparse.Namespace):
    """Stream one answer to stdout (reasoning set apart), then the statistics to stderr."""
    from flashmoe_backend.cli.console import print_stats, stream_to_console, unanswered_hint

    result = stream_to_console(
        engine.stream(prompt, **sampling_kwargs(args)), hide_reasoning=args.hide_reasoning
    )
    hint = unanswered_hint(result)
    if hint:
        print(f"flashmoe: {hint}", file=sys.stderr)
    print_stats(result.stats)
    if engine.distributed_stats is not None:
        from flashmoe_backend.cli.console import format_distributed_stats

        print("\n".join(format_distributed_stats(engine.distributed_stats)), file=sys.stderr)
    return result


def generation_prompt(text: str, *, raw: bool, has_chat_template: bool) -> str | list[dict]:
    """What ``flashmoe generate`` sends: a user message for chat models (their template adds the
    turn markup they were trained on), the text itself with ``--raw`` or without a template."""
    if raw or not has_chat_template:
        return text
    return [{"role": "user", "content": text}]


def assistant_message(result) -> dict:
    """A generation as the assistant turn of a chat history: the answer as ``content`` and the
    reasoning as ``reasoning_content`` (where chat templates look for it), no raw markup."""
    message = {"role": "assistant", "content": result.text}
    if result.reasoning:
        message["reasoning_content"] = result.reasoning
    return message


def _read_turn(prompt: str = ">> ") -> str | None:
    """The user's next line; ``None`` on an empty line or end of input (Ctrl-D)."""
    try:
        line = input(prompt).strip()
    except EOFError:
        print()  # Ctrl-D leaves the cursor after the prompt: end that line
        return None
    return line or None


# -- commands -------------------------------------------------------------------------------------


def cmd_pack(args: argparse.Namespace) -> int:
    from flashmoe_backend.store.pack import PackOptions, pack

    options = PackOptions(
        bits=args.bits,
        group_size=args.group_size,
        dtype=args.dtype,
        delete_source_shards=args.delete_source_shards,
    )
    manifest = pack(args.src, args.dst, options)
    print(
        f"packed {len(manifest.layers)} MoE layers, {manifest.expert_bytes / MiB:.1f} MiB of "
        f"experts, into {args.dst}"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    engine = _load(args)
    try:
        has_template = engine.tokenizer.chat_template is not None
        _answer(engine, generation_prompt(args.prompt, raw=args.raw, has_chat_template=has_template), args)
    finally:
        engine.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("flashmoe chat: empty line or Ctrl-D to quit", file=sys.stderr)
    try:
        while (line := _read_turn()) is not None:
            messages.append({"role": "user", "content": line})
            messages.append(assistant_message(_answer(engine, messages, args)))
    finally:
        engine.close()
    return 0


def served_model_id(store: Path) -> str:
    """The name ``flashmoe serve`` lists in ``/v1/models``: ``demo`` for the embedded store, the
    repo id for a Hugging Face repo, else the store (or checkpoint) directory's name."""
    from flashmoe_backend.store.source import repo_id_of

    if store == default_store():
        return DEMO_NAME
    return repo_id_of(store) or store.resolve().name


#: Hosts that only this machine reaches (serving there needs no API key).
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args: argparse.Namespace) -> int:
    from flashmoe_backend.server.run import listen, serve
    from flashmoe_backend.server.settings import ServerSettings

    settings = ServerSettings(
        model_id=args.model_id or served_model_id(args.store),
        api_key=args.api_key,
        max_queue=args.max_queue,
        timeout=args.timeout or None,
        max_body_bytes=args.max_body_bytes,
        max_tokens_limit=args.max_tokens_limit,
    )
    from flashmoe_backend.distributed import launched_rank

    # Before the load: a port in use is said at once. Under mlx.launch only rank 0 serves (the
    # other ranks follow it from _load and never get here), so only it binds the port.
    sock = listen(args.host, args.port) if launched_rank() == 0 else None
    try:
        if args.offline:  # after listen, which may look the host name up
            from flashmoe_backend.offline import block_network

            block_network()
        engine = _load(args)
        try:
            host, port = sock.getsockname()[:2]
            where = f"[{host}]" if ":" in host else host
            print(f"flashmoe: serving {settings.model_id!r} at http://{where}:{port}/v1", file=sys.stderr)
            if args.api_key is None and args.host not in LOOPBACK:
                print(f"{PROG}: warning: {args.host} is not loopback and no --api-key is set: anyone "
                      "who can reach this port can use the model", file=sys.stderr)
            serve(engine, settings, sock)
        finally:
            with engine.lock:  # a generation stopped at shutdown unwinds within a decode step
                engine.close()
    finally:
        if sock is not None:
            sock.close()
    return 0


def store_info(store: Path) -> dict:
    """Architecture and sizes of a store (or of a checkpoint read in place): what stays resident,
    what streams."""
    from flashmoe_backend.store.format import quantization_summary
    from flashmoe_backend.store.layout import PackedStore
    from flashmoe_backend.store.source import open_source

    source = open_source(store)
    manifest, config = source.manifest, source.config
    text = config.get("text_config", config)
    first = manifest.layers[0]
    return {
        "source": "store" if isinstance(source, PackedStore) else "checkpoint (read in place)",
        "path": str(source.root),
        "model_type": manifest.model_type,
        "layers": text.get("num_hidden_layers"),
        "moe_layers": len(manifest.layers),
        "hidden_size": text.get("hidden_size"),
        "experts_per_layer": first.num_experts,
        "experts_per_token": text.get("num_experts_per_tok"),
        "expert_quantization": first.quantization,
        # per tensor kind
        "quantization": quantization_summary(source.root, manifest, config, source.resident_header()),
        "expert_record_bytes": first.record_bytes,
        "expert_bytes": manifest.expert_bytes,
        "resident_bytes": source.resident_bytes(),
    }


def cmd_info(args) -> int:
    from flashmoe_backend.store.format import summary_lines

    fetch_if_asked(args)
    info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if key.endswith("bytes"):
            value = f"{value / MiB:,.1f} MiB ({value:,} bytes)"
        elif key == "quantization":  # one line per tensor kind, aligned under the first
            value = f"\n{'':22} ".join(summary_lines(value))
        print(f"{key:22} {value}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from flashmoe_backend.store.source import find_source, is_packed_store

    fetch_if_asked(args)
    path = find_source(args.store)
    if not is_packed_store(path):
        return _verify_checkpoint(path, args)
    from flashmoe_backend.store.format import verify_store

    report = verify_store(path, progress=not args.quiet)
    for file, expert in report.bad:
        print(f"CORRUPT {path / file}: expert {expert} fails its checksum", file=sys.stderr)
    status = "OK" if report.ok else f"{len(report.bad)} corrupt record(s)"
    print(f"{status}: {report.records} records, {report.bytes / MiB:.1f} MiB checked")
    return 0 if report.ok else 1


def _verify_checkpoint(path: Path, args: argparse.Namespace) -> int:
    from flashmoe_backend.store.checkpoint import verify_checkpoint

    report = verify_checkpoint(path, progress=not args.quiet)
    for line in report.bad:
        print(f"CORRUPT {line}", file=sys.stderr)
    status = "OK" if report.ok else f"{len(report.bad)} problem(s)"
    unhashed = report.shards - report.hashed
    without = f" ({unhashed} with no Hugging Face sha256: not files of a Hugging Face cache)"
    print(
        f"{status}: {report.shards} weight files, {report.hashed} checked against their Hugging Face "
        f"sha256{without if unhashed else ''}; {report.slices} expert slices against their first-read "
        f"CRC32; {report.bytes / MiB:.1f} MiB read"
    )
    return 0 if report.ok else 1


def cmd_download(args: argparse.Namespace) -> int:
    from flashmoe_backend.store.hub import download

    path = download(args.repo, revision=args.revision)
    print(f"downloaded {args.repo} to {path}; run it with: flashmoe chat {args.repo}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flashmoe_backend.cli.demo import run_demo

    return run_demo(cache_gb=args.cache_gb, max_tokens=args.max_tokens)


def cmd_bench(args: argparse.Namespace) -> int:
    from flashmoe_backend.bench import run

    if args.bench_mode == "model":  # its STORE may be "demo" too (synthetic's --store is a work dir)
        args.store = store_path(str(args.store))
    run(args, sys.argv[2:])
    return 0


# -- the parser and main --------------------------------------------------------------------------


def _debug_flag(default: object) -> argparse.ArgumentParser:
    """A parent parser with ``--debug``: accepted before and after the command."""
    parent = Parser(add_help=False)
    parent.add_argument(
        "--debug", action="store_true", default=default, help="show the traceback of an error"
    )
    return parent


def build_parser(commands: Collection[str | None] | None = None) -> argparse.ArgumentParser:
    """The ``flashmoe`` parser. With ``commands`` given, only those commands' arguments are
    complete (the others still parse, in ``--help`` too): ``bench`` builds its arguments from
    modules that import numpy and MLX, which ``flashmoe --help`` or ``flashmoe info`` should not
    wait for."""
    parser = Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_debug_flag(False)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # SUPPRESS: a subcommand's --debug, when absent, leaves the top-level one's value alone
    common = [_debug_flag(argparse.SUPPRESS)]

    p = sub.add_parser(
        "pack",
        parents=common,
        help="pack a local checkpoint into a streaming store (resumable: run it again after an interruption)",
    )
    p.add_argument("src", type=Path, help="Hugging Face or mlx-community checkpoint directory")
    p.add_argument("dst", type=Path, help="store directory to create")
    p.add_argument(
        "--bits",
        type=number(int),
        choices=(2, 3, 4, 5, 6, 8, 16),
        default=4,
        help="bits per expert weight; 16: no quantization",
    )
    p.add_argument("--group-size", type=number(int, ge=1), default=64)
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    p.add_argument(
        "--delete-source-shards",
        action="store_true",
        help="delete each source shard once every tensor of it is in the store and verified, for a "
        "disk that cannot hold both (the source is gone afterwards)",
    )
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("generate", parents=common, help="generate text from a prompt")
    _add_engine_args(p)
    p.add_argument("--prompt", "-p", type=nonempty, required=True)
    p.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as raw text (default for chat models: as a user message, through "
        "the chat template)",
    )
    p.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # the default now
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", parents=common, help="interactive streaming chat")
    _add_engine_args(p)
    p.add_argument("--system", default=None, help="system message")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "serve", parents=common, help="OpenAI-compatible HTTP server: chat, completions, tools, JSON schemas"
    )
    _add_engine_args(p)
    _add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", parents=common, help="architecture and sizes of a store or checkpoint")
    _add_store_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify",
        parents=common,
        help="check every expert record's checksum (a checkpoint: each shard's Hugging Face sha256 "
        "and the first-read checksums)",
    )
    _add_store_arg(p)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "download",
        parents=common,
        help="download a Hugging Face checkpoint into the local Hugging Face cache (resumable)",
    )
    p.add_argument(
        "repo", metavar="REPO", type=nonempty, help="repo id, e.g. mlx-community/Qwen3.5-397B-A17B-4bit"
    )
    p.add_argument("--revision", type=nonempty, default=None, help="branch, tag or commit (default: main)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "bench", parents=common, help="decode/prefill against the physical floor (JSON + markdown)"
    )
    if commands is None or "bench" in commands:
        from flashmoe_backend.bench import add_arguments

        add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", parents=common, help="run the embedded demo model offline")
    p.add_argument("--cache-gb", type=number(gt=0), default=None, help="default: a quarter of the experts")
    p.add_argument("--max-tokens", "-m", type=number(int, ge=1), default=48)
    p.set_defaults(func=cmd_demo)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (its first argument that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def error_message(error: BaseException) -> str:
    """One line for an error: ``path: reason`` for OS errors, else the error's own message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


def _silence_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured in tests)
        pass


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the caller's mistake (reported in one line) rather than a bug (a
    traceback): the engine's and the store's errors, and bad values or files in general."""
    from flashmoe_backend.errors import USER_ERRORS  # here: it imports the store module, and with it numpy

    return isinstance(error, (ValueError, OSError, *USER_ERRORS))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A warning (a cache too small to hold a token's experts) is advice to the user: one line,
    # not the source line that raised it.
    print(f"{PROG}: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flashmoe`` with ``argv`` (default: the command line); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser({command_of(argv)}).parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(file=sys.stderr)  # the ^C was echoed mid-line
        return 130
    except BrokenPipeError:  # stdout's reader left (`| head`): stop, and skip the flush at exit
        _silence_stdout()
        return 1
    except Exception as e:
        if args.debug or not is_user_error(e):
            raise
        print(f"{PROG}: error: {error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
