"""The ``flashmoe`` command on the embedded demo store: one-line errors with exit code 2 for bad
arguments and for engine/store errors, reasoning printed apart from the answer, chat history,
``demo`` as a STORE, ``--raw``, and a start that imports no mlx-lm/transformers/outlines."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashmoe_backend.cli import commands as cli
from flashmoe_backend.cli.commands import (
    assistant_message,
    error_message,
    generation_prompt,
    main,
    store_path,
)
from flashmoe_backend.cli.console import REASONING_PREFIX, ChunkPrinter, reasoning_style, unanswered_hint
from flashmoe_backend.cli.demo import DOCUMENT, QUESTION
from flashmoe_backend.store.source import default_store

HEAVY = ("mlx_lm", "transformers", "outlines")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` in-process: exit code (argparse's exits too), stdout, stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def raising(error: BaseException):
    """A command that raises ``error`` (patched in for ``cmd_info``)."""

    def command(args):
        raise error

    return command


# -- bad arguments: argparse's one line, exit 2 ---------------------------------------------------

BAD_ARGUMENTS = [
    (["generate", "demo", "-p", "hi", "--cache-gb", "0"], "argument --cache-gb: must be > 0, got 0"),
    (["generate", "demo", "-p", "hi", "--cache-gb", "-1"], "argument --cache-gb: must be > 0, got -1"),
    (
        ["generate", "demo", "-p", "hi", "--cache-gb", "lots"],
        "argument --cache-gb: must be a number, got 'lots'",
    ),
    (
        ["generate", "demo", "-p", "hi", "--cache-gb", "nan"],
        "argument --cache-gb: must be a finite number, got 'nan'",
    ),
    (
        ["generate", "demo", "-p", "hi", "--cache-gb", "inf"],
        "argument --cache-gb: must be a finite number, got 'inf'",
    ),
    (["generate", "demo", "-p", "hi", "-m", "0"], "argument --max-tokens/-m: must be >= 1, got 0"),
    (["generate", "demo", "-p", "hi", "-m", "-5"], "argument --max-tokens/-m: must be >= 1, got -5"),
    (
        ["generate", "demo", "-p", "hi", "-m", "1.5"],
        "argument --max-tokens/-m: must be an integer, got '1.5'",
    ),
    (["generate", "demo", "-p", ""], "argument --prompt/-p: must not be empty"),
    (["generate", "demo"], "the following arguments are required: --prompt/-p"),
    (["generate", "demo", "-p"], "argument --prompt/-p: expected one argument"),
    (["generate", "demo", "-p", "hi", "--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["generate", "demo", "-p", "hi", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["generate", "demo", "-p", "hi", "--min-p", "2"], "argument --min-p: must be in [0, 1], got 2"),
    (
        ["generate", "demo", "-p", "hi", "--temp", "-0.5"],
        "argument --temperature/--temp: must be >= 0, got -0.5",
    ),
    (["generate", "demo", "-p", "hi", "--top-k", "-1"], "argument --top-k: must be >= 0, got -1"),
    (
        ["generate", "demo", "-p", "hi", "-k", "0"],
        "argument --experts-per-token/-k: must be >= 1, got 0",
    ),
    (["generate", "demo", "-p", "hi", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["generate", "demo", "-p", "hi", "--seed", "x"], "argument --seed: must be an integer, got 'x'"),
    (["generate", "demo", "-p", "hi", "--stop", ""], "argument --stop: must not be empty"),
    (
        ["generate", "demo", "-p", "hi", "--page-cache", "maybe"],
        "argument --page-cache: invalid choice: 'maybe'",
    ),
    (
        ["chat", "demo", "--repetition-penalty", "0"],
        "argument --repetition-penalty: must be > 0, got 0",
    ),
    (["chat", "demo", "--cache-gb", "0"], "argument --cache-gb: must be > 0, got 0"),
    (["chat", "demo", "-m", "0"], "argument --max-tokens/-m: must be >= 1, got 0"),
    (["demo", "--cache-gb", "0"], "argument --cache-gb: must be > 0, got 0"),
    (["demo", "-m", "-5"], "argument --max-tokens/-m: must be >= 1, got -5"),
    (["pack", "src", "dst", "--bits", "7"], "argument --bits: invalid choice: 7"),
    (["pack", "src", "dst", "--bits", "four"], "argument --bits: must be an integer, got 'four'"),
    (["pack", "src", "dst", "--group-size", "0"], "argument --group-size: must be >= 1, got 0"),
    (["info", ""], "argument STORE: must not be empty"),
    (["info"], "the following arguments are required: STORE"),
    ([], "the following arguments are required: COMMAND"),
    (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_and_exit_2(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert f"flashmoe: error: {message}" in err
    assert "Traceback" not in err and not out


# -- engine and store errors: the same line, exit 2; --debug shows the traceback -------------------


STORE_COMMANDS = [["info"], ["verify"], ["generate", "-p", "hi"], ["chat"]]


def _with_store(command: list[str], store) -> list[str]:
    return [command[0], str(store), *command[1:]]


def test_missing_store_is_an_error_line(tmp_path, capsys):
    # One wording whichever command (and FlashMoE.load) meets the path.
    from flashmoe_backend import FlashMoE
    from flashmoe_backend.errors import StoreNotFoundError

    missing = tmp_path / "nowhere"
    expected = f"{missing}: no such store directory; make a store with `flashmoe pack`"
    with pytest.raises(StoreNotFoundError) as caught:
        FlashMoE.load(missing)
    assert str(caught.value) == expected
    for command in STORE_COMMANDS:
        assert run(_with_store(command, missing), capsys) == (2, "", f"flashmoe: error: {expected}\n")


def test_directory_that_is_not_a_store(tmp_path, capsys):
    from flashmoe_backend import FlashMoE
    from flashmoe_backend.errors import StoreNotFoundError

    expected = (
        f"{tmp_path}: not a flashmoe store (no manifest.json) nor a model checkpoint (no config.json); "
        "make a store with `flashmoe pack`, or pass an mlx-community checkpoint directory"
    )
    with pytest.raises(StoreNotFoundError) as caught:
        FlashMoE.load(tmp_path)
    assert str(caught.value) == expected
    for command in STORE_COMMANDS:
        code, out, err = run(_with_store(command, tmp_path), capsys)
        assert (code, out, err) == (2, "", f"flashmoe: error: {expected}\n"), command


def test_missing_checkpoint_for_pack(tmp_path, capsys):
    code, _, err = run(["pack", str(tmp_path / "nowhere"), str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.startswith(f"flashmoe: error: {tmp_path / 'nowhere'}: no such checkpoint directory")
    assert err.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path, capsys):
    from flashmoe_backend.store.format import StoreError

    for argv in (["--debug", "info", str(tmp_path)], ["info", str(tmp_path), "--debug"]):
        with pytest.raises(StoreError, match="not a flashmoe store"):
            main(argv)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ValueError("bad value"), "flashmoe: error: bad value\n"),
        (
            FileNotFoundError(2, "No such file or directory", "/x/y"),
            "flashmoe: error: /x/y: No such file or directory\n",
        ),
        (PermissionError(13, "Permission denied", "/x"), "flashmoe: error: /x: Permission denied\n"),
    ],
)
def test_engine_errors_map_to_exit_2(monkeypatch, capsys, error, message):
    monkeypatch.setattr(cli, "cmd_info", raising(error))
    assert run(["info", "demo"], capsys) == (2, "", message)


def test_flashmoe_errors_map_to_exit_2_and_bugs_do_not(monkeypatch, capsys):
    from flashmoe_backend.errors import PromptError, UnknownArgumentError

    for error in (PromptError("messages[0]: unknown role 'robot'"), UnknownArgumentError("bad keyword")):
        monkeypatch.setattr(cli, "cmd_info", raising(error))
        assert run(["info", "demo"], capsys) == (2, "", f"flashmoe: error: {error}\n")
    monkeypatch.setattr(cli, "cmd_info", raising(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):  # not the user's mistake: the traceback stays
        main(["info", "demo"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["-k", "99"],
            "flashmoe: error: experts_per_token is 99 but the model has 32 experts per layer",
            id="experts-per-token-too-many",
        ),
        pytest.param(
            ["--cache-gb", "1e-12"],
            "flashmoe: error: cache budget of 0 bytes cannot hold one expert record",
            id="cache-below-one-record",
        ),
        pytest.param(
            ["-m", "40000"],
            "flashmoe: error: the prompt (15 tokens) plus max_tokens (40000) is 40015 tokens, beyond "
            "the model's context window of 32768; lower max_tokens to at most 32753",
            id="context-overflow",
        ),
    ],
)
def test_engine_refusals_are_one_line(argv, message, capsys):
    code, out, err = run(["generate", "demo", "-p", "Hello", "-m", "4", *argv], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(message) and err.count("\n") == 1


def test_cache_too_small_for_a_token_is_a_warning_line(capsys):
    from flashmoe_backend.store.format import read_manifest

    record = max(layer.record_bytes for layer in read_manifest(default_store()).layers)
    budget = str(2 * record / 1024**3)  # two records: a token needs four
    code, out, err = run(["generate", "demo", "-p", "Hello", "-m", "2", "--cache-gb", budget], capsys)
    assert code == 0 and out.strip()
    assert err.startswith(
        "flashmoe: warning: expert cache budget of 0.03 MiB cannot hold one token's experts of a layer"
    )
    assert "Traceback" not in err and "warnings.warn" not in err


def test_warnings_are_one_line(monkeypatch, capsys):
    import warnings

    def warn(args):
        warnings.warn("the cache is small", UserWarning, stacklevel=2)
        return 0

    monkeypatch.setattr(cli, "cmd_info", warn)
    assert run(["info", "demo"], capsys) == (0, "", "flashmoe: warning: the cache is small\n")


def test_keyboard_interrupt_exits_130_quietly(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_info", raising(KeyboardInterrupt()))
    code, out, err = run(["info", "demo"], capsys)
    assert (code, out) == (130, "") and "Traceback" not in err and not err.strip()


def test_closed_pipe_exits_quietly(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_info", raising(BrokenPipeError(32, "Broken pipe")))
    assert run(["info", "demo"], capsys) == (1, "", "")


def test_error_message_of_an_error_without_text():
    assert error_message(ValueError()) == "ValueError"


def test_bad_argument_in_a_fresh_process_has_no_traceback():
    commands = [[sys.executable, "-m", "flashmoe_backend.cli"]]
    entry_point = Path(sys.executable).parent / "flashmoe"  # the installed ``flashmoe`` script
    if entry_point.exists():
        commands.append([str(entry_point)])
    for command in commands:
        argv = [*command, "generate", "demo", "-p", "hi", "--cache-gb", "0"]
        done = subprocess.run(argv, capture_output=True, text=True)
        assert done.returncode == 2
        assert "flashmoe: error: argument --cache-gb: must be > 0, got 0" in done.stderr
        assert "Traceback" not in done.stderr


# -- reasoning apart from the answer ---------------------------------------------------------------

# How a thinking model streams: reasoning (the template opened <think>), then the answer.
THINKING = [
    ("reasoning", "\nThe user"),
    ("reasoning", " greets.\n\nSay hi"),
    ("reasoning", ".\n"),
    ("content", "\n\n"),
    ("content", "Hi"),
    ("content", "! How can I help?\n"),
]


def printed(pieces, style) -> str:
    out = io.StringIO()
    printer = ChunkPrinter(out, style)
    for kind, text in pieces:
        printer.write(kind, text)
    printer.close()
    return out.getvalue()


def test_reasoning_prefixed_off_a_terminal():
    assert printed(THINKING, "prefix") == (
        f"{REASONING_PREFIX}The user greets.\n[reasoning]\n{REASONING_PREFIX}Say hi.\nHi! How can I help?\n"
    )


def test_reasoning_dimmed_on_a_terminal():
    out = printed(THINKING, "dim")
    assert out.endswith("\x1b[0m\nHi! How can I help?\n")
    assert out.startswith("\x1b[2mThe user\x1b[0m\x1b[2m greets.\n\nSay hi\x1b[0m")


def test_reasoning_hidden():
    assert printed(THINKING, "hide") == "Hi! How can I help?\n"


def test_answer_without_reasoning_is_printed_as_is():
    assert printed([("content", "pharmacist"), ("content", "\n")], "prefix") == "pharmacist\n"
    assert printed([], "prefix") == "\n"  # the line after "A: " still ends


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_reasoning_style_follows_the_output(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert reasoning_style(Terminal()) == "dim"
    assert reasoning_style(io.StringIO()) == "prefix"
    assert reasoning_style(Terminal(), hide=True) == "hide"
    monkeypatch.setenv("NO_COLOR", "1")
    assert reasoning_style(Terminal()) == "prefix"


def test_generate_with_thinking_prints_reasoning_apart(capsys):
    # The demo model was not trained to think: what it writes inside <think> must not read as
    # its answer, and the user is told why the answer is empty.
    code, out, err = run(["generate", "demo", "-p", "Hello", "-m", "24", "--enable-thinking"], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if line]
    assert lines and all(line.startswith("[reasoning]") for line in lines), out
    assert "<think>" not in out and "</think>" not in out
    assert "flashmoe: the model" in err and "--no-enable-thinking" in err
    code, out, _ = run(
        ["generate", "demo", "-p", "Hello", "-m", "24", "--enable-thinking", "--hide-reasoning"], capsys
    )
    assert (code, out) == (0, "\n")


def test_unanswered_hint_only_when_reasoning_took_the_answer():
    from flashmoe_backend import GenerationResult, Stats

    def result(text, reasoning, finish):
        return GenerationResult(text, [], finish, Stats(generated_tokens=24), reasoning=reasoning)

    assert "all 24 tokens reasoning" in unanswered_hint(result("", "hmm", "length"))
    assert "reasoned but gave no answer" in unanswered_hint(result("", "hmm", "stop"))
    assert unanswered_hint(result("Hi", "hmm", "stop")) is None
    assert unanswered_hint(result("", None, "stop")) is None


# -- generate: chat template for chat models, --raw for raw text ---------------------------------


def test_generation_prompt():
    assert generation_prompt("Hello", raw=False, has_chat_template=True) == [
        {"role": "user", "content": "Hello"}
    ]
    assert generation_prompt("Hello", raw=True, has_chat_template=True) == "Hello"
    assert generation_prompt("Hello", raw=False, has_chat_template=False) == "Hello"


@pytest.fixture
def prompts(monkeypatch) -> list:
    """The prompts ``FlashMoE.stream`` is called with (copied: chat appends to its list)."""
    from flashmoe_backend.engine import FlashMoE

    seen, stream = [], FlashMoE.stream

    def spy(self, prompt, **kwargs):
        seen.append(json.loads(json.dumps(prompt)))
        return stream(self, prompt, **kwargs)

    monkeypatch.setattr(FlashMoE, "stream", spy)
    return seen


def test_generate_uses_the_chat_template_and_raw_does_not(prompts, capsys):
    code, out, _ = run(["generate", "demo", "-p", "Hello", "-m", "24", "--no-enable-thinking"], capsys)
    assert code == 0 and out == "Hi! What can I do for you?\n"
    code, _, err = run(["generate", "demo", "-p", "Hello", "-m", "8", "--raw"], capsys)
    assert code == 0 and "prompt 3 tok" in err  # "Hello" alone: no turn markup around it
    assert prompts == [[{"role": "user", "content": "Hello"}], "Hello"]


def test_only_the_given_sampling_arguments_reach_the_engine():
    # The rest come from the store's generation_config.json (the demo's: greedy, no thinking).
    parse = cli.build_parser({"generate"}).parse_args
    assert cli.sampling_kwargs(parse(["generate", "demo", "-p", "x"])) == {}
    given = parse(
        ["generate", "demo", "-p", "x", "-m", "9", "--temp", "0.5", "--stop", "\n", "--no-enable-thinking"]
    )
    assert cli.sampling_kwargs(given) == {
        "max_tokens": 9,
        "temperature": 0.5,
        "stop": ["\n"],
        "enable_thinking": False,
    }


# -- chat -----------------------------------------------------------------------------------------


def test_chat_keeps_the_assistant_messages(prompts, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nWhat is your name?\n"))
    code, out, err = run(["chat", "demo", "-m", "30", "--no-enable-thinking"], capsys)
    assert code == 0
    first, second = prompts
    assert first == [{"role": "user", "content": "Hello"}]
    assert second == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! What can I do for you?"},
        {"role": "user", "content": "What is your name?"},
    ]
    assert out.startswith(">> Hi! What can I do for you?\n>> ")
    assert out.endswith(">> \n")  # Ctrl-D (end of input) ends the prompt line
    assert err.count("[flashmoe] prompt") == 2


def test_chat_history_holds_reasoning_where_the_template_reads_it(prompts, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAgain\n"))
    code, _, _ = run(["chat", "demo", "-m", "24", "--enable-thinking"], capsys)
    assert code == 0
    assistant = prompts[1][1]
    assert assistant["role"] == "assistant" and assistant["reasoning_content"]
    assert "<think>" not in assistant["content"] and "<think>" not in assistant["reasoning_content"]


def test_assistant_message():
    from flashmoe_backend import GenerationResult, Stats

    plain = GenerationResult("Hi", [], "stop", Stats(), raw_text="Hi")
    assert assistant_message(plain) == {"role": "assistant", "content": "Hi"}
    thought = GenerationResult("Hi", [], "stop", Stats(), raw_text="hmm\n</think>\n\nHi", reasoning="hmm")
    assert assistant_message(thought) == {"role": "assistant", "content": "Hi", "reasoning_content": "hmm"}


def test_chat_ends_on_an_empty_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nnever read\n"))
    code, out, _ = run(["chat", "demo"], capsys)
    assert (code, out) == (0, ">> ")


# -- demo as a STORE, info, help ------------------------------------------------------------------


def test_demo_is_a_store_name(tmp_path):
    assert store_path("demo") == default_store()
    assert store_path(str(tmp_path)) == tmp_path
    assert store_path("./demo") == Path("demo")  # a directory of that name


def test_bench_model_takes_demo(monkeypatch):
    import flashmoe_backend.bench

    seen = []
    monkeypatch.setattr(flashmoe_backend.bench, "run", lambda args, argv: seen.append(args.store))
    assert main(["bench", "model", "demo", "--no-k4", "--no-mlx-lm"]) == 0
    assert seen == [default_store()]


def test_info_and_verify_demo(capsys):
    code, out, err = run(["info", "demo", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["model_type"] == "qwen3_5_moe" and info["experts_per_layer"] == 32
    assert run(["info", "demo"], capsys)[0] == 0
    code, out, _ = run(["verify", "demo", "-q"], capsys)
    assert code == 0 and out.startswith("OK: 256 records")


def test_help_is_plain_text(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    assert "``" not in out and "`" not in out
    assert out.splitlines()[2].startswith("flashmoe: run Mixture-of-Experts LLMs")
    for command in ("pack", "generate", "chat", "info", "verify", "bench", "demo"):
        assert f"    {command} " in out


# -- startup: no mlx-lm, transformers or outlines on the way to --help or info ---------------------

LOADED = "import sys; print(','.join(m for m in {heavy!r} if m in sys.modules))"


@pytest.mark.parametrize(
    "code",
    [
        "import flashmoe_backend",
        "import flashmoe_backend.cli",
        "from flashmoe_backend.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
        "from flashmoe_backend.cli import main\nmain(['info', 'demo'])",
    ],
    ids=["import package", "import cli", "--help", "info demo"],
)
def test_startup_imports_nothing_heavy(code):
    script = f"{code}\n{LOADED.format(heavy=HEAVY)}"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "", f"loaded: {done.stdout.splitlines()[-1]}"


def test_public_names_import_lazily():
    import flashmoe_backend

    for name in flashmoe_backend.__all__:
        assert getattr(flashmoe_backend, name) is not None
    assert set(flashmoe_backend.__all__) <= set(dir(flashmoe_backend))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = flashmoe_backend.nope


# -- first calls with default settings -------------------------------------------------------------

_GROUNDED = "Use the following facts to answer.\n" + DOCUMENT + "\n\n" + QUESTION


def test_generate_answers_with_default_settings(capsys):
    code, out, _ = run(["generate", "demo", "-p", _GROUNDED], capsys)
    assert code == 0 and "pharmacist" in out


def test_chat_answers_with_default_settings(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(_GROUNDED.replace("\n", " ") + "\n"))
    code, out, _ = run(["chat", "demo"], capsys)
    assert code == 0 and "pharmacist" in out
