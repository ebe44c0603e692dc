"""Every kind of bad input of issue #16, performed for real: the error each one gets, verbatim,
and the test that holds it to that error.

    python -m bench.bad_inputs [--out bad_inputs.md] [--no-check-tests]

Each row is one mistake a user makes on one surface:

* **CLI**: ``flashmoe ...`` run in a fresh process; the row shows the exit code and the line
  written to stderr (a ``Traceback`` there is flagged);
* **engine**: ``FlashMoE.load`` / ``FlashMoE.shared`` / ``generate`` on the embedded demo store
  (loaded once), including stores damaged on the fly (copies of the demo store in a temporary
  directory: manifest fields with wrong values, a truncated manifest or expert file, flipped
  record bytes, a bad generation_config.json);
* **pack**: ``pack`` with bad options, source or destination;
* **LangChain** / **LlamaIndex**: the integrations making the same kinds of mistakes their way.

The input column is the code that ran (evaluated from this file's table, so the table cannot
drift from what was run). The message column is ``str(error)`` (CLI: the stderr line), with the
temporary directory written ``$TMP``. The test column names the test that asserts the exception
type and the message; ``--no-check-tests`` skips checking (with ``pytest --collect-only``) that
each named test exists. Takes well under two minutes on a 2-core CPU.
"""

# ruff: noqa: E501 - the table below keeps one input a line

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# -- the table: (surface, input, test node id(s)) ------------------------------------------------
# CLI inputs are command lines ({name} is a fixture path below); the others are Python
# expressions or statements evaluated in ``namespace()``.

CLI_T = "tests/cli/test_cli.py::"
BAD_ARG = CLI_T + "test_bad_argument_is_one_line_and_exit_2"
VAL = "tests/test_validation.py::"
REQ = VAL + "test_bad_request_is_refused_before_generation"
LOAD = VAL + "test_bad_load_option_is_refused"
FMT = "tests/store/test_format.py::"
MALFORMED = FMT + "test_malformed_manifest_field_is_named"
PACK_T = "tests/store/test_pack.py::"
LC = "integrations/langchain-flashmoe/tests/integration_tests/test_lc_defaults_and_errors.py::"
LI = "integrations/llama-index-llms-flashmoe/tests/test_llama_index_flashmoe_defaults_and_errors.py::"
LC_CALL, LI_CALL = LC + "test_bad_call_is_the_engines_error", LI + "test_bad_call_is_the_engines_error"
LC_SET, LI_SET = LC + "test_bad_setting_is_the_engines_error", LI + "test_bad_setting_is_the_engines_error"

HI = '[{"role": "user", "content": "hi"}]'

# fmt: off
ROWS: list[tuple[str, str, str]] = [
    # -- CLI: argparse's checks ------------------------------------------------------------------
    ("CLI", "flashmoe generate demo -p hi --cache-gb 0", f"{BAD_ARG}[generate demo -p hi --cache-gb 0]"),
    ("CLI", "flashmoe generate demo -p hi --cache-gb lots",
     f"{BAD_ARG}[generate demo -p hi --cache-gb lots]"),
    ("CLI", "flashmoe generate demo -p hi -m 0", f"{BAD_ARG}[generate demo -p hi -m 0]"),
    ("CLI", "flashmoe generate demo -p hi -m -5", f"{BAD_ARG}[generate demo -p hi -m -5]"),
    ("CLI", "flashmoe generate demo -p ''", f"{BAD_ARG}[generate demo -p ]"),
    ("CLI", "flashmoe generate demo", f"{BAD_ARG}[generate demo]"),
    ("CLI", "flashmoe generate demo -p hi --top-p 1.5", f"{BAD_ARG}[generate demo -p hi --top-p 1.5]"),
    ("CLI", "flashmoe generate demo -p hi --temp -0.5", f"{BAD_ARG}[generate demo -p hi --temp -0.5]"),
    ("CLI", "flashmoe generate demo -p hi --seed x", f"{BAD_ARG}[generate demo -p hi --seed x]"),
    ("CLI", "flashmoe generate demo -p hi --stop ''", f"{BAD_ARG}[generate demo -p hi --stop ]"),
    ("CLI", "flashmoe chat demo --cache-gb 0", f"{BAD_ARG}[chat demo --cache-gb 0]"),
    ("CLI", "flashmoe demo -m -5", f"{BAD_ARG}[demo -m -5]"),
    ("CLI", "flashmoe pack src dst --bits 7", f"{BAD_ARG}[pack src dst --bits 7]"),
    ("CLI", "flashmoe pack src dst --group-size 0", f"{BAD_ARG}[pack src dst --group-size 0]"),
    ("CLI", "flashmoe info ''", f"{BAD_ARG}[info ]"),
    ("CLI", "flashmoe bogus", f"{BAD_ARG}[bogus]"),
    # -- CLI: the engine's and the store's errors, mapped to one line ---------------------------
    ("CLI", "flashmoe info {nowhere}", f"{CLI_T}test_missing_store_is_an_error_line"),
    ("CLI", "flashmoe generate {nowhere} -p hi", f"{CLI_T}test_missing_store_is_an_error_line"),
    ("CLI", "flashmoe info {not_a_store}", f"{CLI_T}test_directory_that_is_not_a_store"),
    ("CLI", "flashmoe verify {not_a_store}", f"{CLI_T}test_directory_that_is_not_a_store"),
    ("CLI", "flashmoe chat {not_a_store}", f"{CLI_T}test_directory_that_is_not_a_store"),
    ("CLI", "flashmoe generate demo -p hi -k 99",
     f"{CLI_T}test_engine_refusals_are_one_line[experts-per-token-too-many]"),
    ("CLI", "flashmoe generate demo -p Hello --cache-gb 1e-12",
     f"{CLI_T}test_engine_refusals_are_one_line[cache-below-one-record]"),
    ("CLI", "flashmoe generate demo -p Hello -m 40000",
     f"{CLI_T}test_engine_refusals_are_one_line[context-overflow]"),
    ("CLI", "flashmoe generate demo -p Hello -m 2 --cache-gb 0.00003",
     f"{CLI_T}test_cache_too_small_for_a_token_is_a_warning_line"),
    ("CLI", "flashmoe info {store_num_experts_lots}", f"{MALFORMED}[num-experts-str]"),
    ("CLI", "flashmoe verify {store_flipped} -q", f"{FMT}test_flipped_byte_never_yields_tokens"),
    ("CLI", "flashmoe pack {nowhere} {tmp}/out", f"{CLI_T}test_missing_checkpoint_for_pack"),
    ("CLI", "flashmoe pack {nowhere} {not_a_store}", f"{FMT}test_cli_pack_info_verify_generate"),
    # -- engine: load ----------------------------------------------------------------------------
    ("engine", 'FlashMoE.load("demo", bogus=1)', f"{LOAD}[unknown-option]"),
    ("engine", 'FlashMoE.shared("demo", bogus=1, cache_size=2)',
     f"{VAL}test_shared_refuses_an_unknown_load_argument"),
    ("engine", 'FlashMoE.load("demo", cache_gb=0)', f"{LOAD}[cache-gb-zero]"),
    ("engine", 'FlashMoE.load("demo", cache_gb="4")', f"{LOAD}[cache-gb-str]"),
    ("engine", 'FlashMoE.load("demo", cache_gb=1e-9)', f"{LOAD}[cache-below-one-record]"),
    ("engine", 'FlashMoE.load("demo", experts_per_token=64)', f"{LOAD}[experts-per-token-too-many]"),
    ("engine", 'FlashMoE.load("demo", page_cache="nope")', f"{LOAD}[page-cache-unknown]"),
    ("engine", 'FlashMoE.load("demo", policy="fifo")', f"{LOAD}[policy-unknown]"),
    ("engine", "FlashMoE.load(nowhere)", f"{VAL}test_missing_store_is_a_file_not_found_error"),
    ("engine", "FlashMoE.load(not_a_store)", f"{VAL}test_missing_store_is_a_file_not_found_error"),
    ("engine", "FlashMoE.load(42)", f"{VAL}test_missing_store_is_a_file_not_found_error"),
    # -- engine: damaged stores (copies of the demo store) -------------------------------------
    ("store", "FlashMoE.load(store_num_experts_lots)", f"{MALFORMED}[num-experts-str]"),
    ("store", "FlashMoE.load(store_num_experts_float)", f"{MALFORMED}[num-experts-float]"),
    ("store", "FlashMoE.load(store_alignment_lots)", f"{MALFORMED}[alignment-str]"),
    ("store", "FlashMoE.load(store_checksum_str)", f"{MALFORMED}[checksum-str]"),
    ("store", "FlashMoE.load(store_offset_str)", f"{MALFORMED}[offset-str]"),
    ("store", "FlashMoE.load(store_layers_empty)", f"{MALFORMED}[layers-empty]"),
    ("store", "FlashMoE.load(store_file_missing)", f"{MALFORMED}[file-missing]"),
    ("store", "FlashMoE.load(store_version_9)", f"{MALFORMED}[version-unsupported]"),
    ("store", "FlashMoE.load(store_manifest_truncated)", f"{FMT}test_corrupt_manifest"),
    ("store", "FlashMoE.load(store_expert_file_truncated)", f"{FMT}test_truncated_expert_file"),
    ("store", "FlashMoE.load(store_no_tokenizer_config)", f"{FMT}test_missing_tokenizer_file"),
    ("store", "FlashMoE.load(store_bad_generation_config)", f"{VAL}test_bad_generation_config_names_the_file"),
    ("store", 'FlashMoE.load(store_flipped).generate("Hello")', f"{FMT}test_flipped_byte_never_yields_tokens"),
    # -- engine: generate --------------------------------------------------------------------------
    ("engine", 'engine.generate([{"role": "robot", "content": "x"}])', f"{REQ}[unknown-role]"),
    ("engine", 'engine.generate([{"content": "x"}])', f"{REQ}[no-role]"),
    ("engine", 'engine.generate(["Hello"])', f"{REQ}[message-not-a-dict]"),
    ("engine", 'engine.generate([{"role": "user", "content": 5}])', f"{REQ}[content-int]"),
    ("engine", 'engine.generate([{"role": "user", "content": None}])', f"{REQ}[content-none]"),
    ("engine", 'engine.generate([{"role": "user"}])', f"{REQ}[no-content]"),
    ("engine", 'engine.generate([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])',
     f"{REQ}[image-part]"),
    ("engine", 'engine.generate([{"role": "user", "content": ""}])', f"{REQ}[user-content-empty]"),
    ("engine", 'engine.generate("")', f"{REQ}[prompt-empty-string]"),
    ("engine", 'engine.generate({"role": "user", "content": "x"})', f"{REQ}[prompt-dict]"),
    ("engine", "engine.generate(42)", f"{REQ}[prompt-int]"),
    ("engine", "engine.generate([1, 99999])", f"{REQ}[token-out-of-vocab]"),
    ("engine", f"engine.generate({HI}, tools=WEATHER_TOOL)", f"{REQ}[tools-dict]"),
    ("engine", f"engine.generate({HI}, tools=[42])", f"{REQ}[tool-not-dict]"),
    ("engine", f'engine.generate({HI}, tools=[{{"type": "function", "function": {{"name": "lookup"}}}}])',
     f"{REQ}[tool-no-parameters]"),
    ("engine", f"engine.generate({HI}, tools=[WEATHER_TOOL, WEATHER_TOOL])", f"{REQ}[tool-duplicate]"),
    ("engine", f'engine.generate({HI}, tools=[WEATHER_TOOL], tool_choice="nope")', f"{REQ}[tool-choice-unknown]"),
    ("engine", f"engine.generate({HI}, tools=[WEATHER_TOOL], tool_choice=42)", f"{REQ}[tool-choice-int]"),
    ("engine", f'engine.generate({HI}, tool_choice="required")', f"{REQ}[tool-choice-required-no-tools]"),
    ("engine", f'engine.generate({HI}, tools=[WEATHER_TOOL], parallel_tool_calls="yes")',
     f"{REQ}[parallel-not-bool]"),
    ("engine", f"engine.generate({HI}, response_format=42)", f"{REQ}[format-int]"),
    ("engine", f'engine.generate({HI}, response_format="json")', f"{REQ}[format-str]"),
    ("engine", f'engine.generate({HI}, response_format={{"type": "object", "properties": {{"a": {{"type": "strin"}}}}}})',
     f"{REQ}[format-bad-schema]"),
    ("engine", f'engine.generate({HI}, response_format={{"type": "object", "properties": {{"a": {{"not": {{"type": "null"}}}}}}}})',
     f"{REQ}[format-unsupported-keyword]"),
    ("engine", f'engine.generate({HI}, response_format={{"type": "json_schema", "json_schema": {{"name": "n"}}}})',
     f"{REQ}[format-json-schema-without-schema]"),
    ("engine", f"engine.generate({HI}, temperature=-1)", f"{REQ}[temperature-negative]"),
    ("engine", f'engine.generate({HI}, temperature="hot")', f"{REQ}[temperature-str]"),
    ("engine", f"engine.generate({HI}, max_tokens=0)", f"{REQ}[max-tokens-zero]"),
    ("engine", f"engine.generate({HI}, max_tokens=1.5)", f"{REQ}[max-tokens-float]"),
    ("engine", f"engine.generate({HI}, top_p=0)", f"{REQ}[top-p-zero]"),
    ("engine", f"engine.generate({HI}, top_p=1.5)", f"{REQ}[top-p-above-one]"),
    ("engine", f"engine.generate({HI}, top_k=-1)", f"{REQ}[top-k-negative]"),
    ("engine", f"engine.generate({HI}, stop=5)", f"{REQ}[stop-int]"),
    ("engine", f'engine.generate({HI}, stop=[""])', f"{REQ}[stop-empty]"),
    ("engine", f"engine.generate({HI}, seed=-1)", f"{REQ}[seed-negative]"),
    ("engine", f'engine.generate({HI}, seed="x")', f"{REQ}[seed-str]"),
    ("engine", f'engine.generate({HI}, enable_thinking="no")', f"{REQ}[enable-thinking-str]"),
    ("engine", f"engine.generate({HI}, temprature=0.5)", f"{REQ}[unknown-argument]"),
    ("engine", f"engine.generate({HI}, max_tokens=40000)", f"{REQ}[context-overflow]"),
    ("engine", "engine.generate([5] * 32768)", f"{REQ}[prompt-fills-context]"),
    ("engine", 'engine.generate("hello " * 40000)',
     f"{VAL}test_long_prompt_is_refused_without_a_tokenizer_warning"),
    # -- pack ----------------------------------------------------------------------------------------
    ("pack", "pack(nowhere, tmp / 'out')", f"{FMT}test_pack_refuses_bad_sources"),
    ("pack", "pack(demo_store, tmp / 'out', PackOptions(bits=7))", f"{FMT}test_pack_refuses_bad_sources"),
    ("pack", "pack(demo_store, tmp / 'out', PackOptions(group_size=48))", f"{PACK_T}test_bad_options[group-size-48]"),
    ("pack", "pack(demo_store, tmp / 'out', PackOptions(dtype='float8'))", f"{PACK_T}test_bad_options[dtype-float8]"),
    ("pack", "pack(demo_store, not_a_store)", f"{FMT}test_cli_pack_info_verify_generate"),
    # -- LangChain -------------------------------------------------------------------------------------
    ("LangChain", "ChatFlashMoE(model=str(nowhere))", f"{LC}test_missing_store_is_a_file_not_found_error"),
    ("LangChain", "ChatFlashMoE(model=str(not_a_store))", f"{LC}test_missing_store_is_a_file_not_found_error"),
    ("LangChain", 'ChatFlashMoE(model="demo", temperature=-1.0)', f"{LC_SET}[temperature-negative]"),
    ("LangChain", 'ChatFlashMoE(model="demo", max_tokens=0)', f"{LC_SET}[max-tokens-zero]"),
    ("LangChain", 'ChatFlashMoE(model="demo", cache_gb=0.0)', f"{LC_SET}[cache-gb-zero]"),
    ("LangChain", 'ChatFlashMoE(model="demo", load_options={"bogus": 1})', f"{LC_SET}[load-option-unknown]"),
    ("LangChain", 'lc.invoke("")', f"{LC_CALL}[empty-prompt]"),
    ("LangChain", 'lc.invoke([HumanMessage([{"type": "text", "text": "What is this?"}, '
     '{"type": "image", "url": "https://example.com/cat.png"}])])', f"{LC_CALL}[image-part]"),
    ("LangChain", 'lc.invoke([ChatMessage(role="robot", content="beep")])', f"{LC_CALL}[unknown-role]"),
    ("LangChain", 'lc.invoke("x", max_tokens=0)', f"{LC_CALL}[max-tokens-zero]"),
    ("LangChain", 'list(lc.stream("x", max_tokens=0))', f"{LC_CALL}[stream-max-tokens-zero]"),
    ("LangChain", 'lc.invoke("x", no_such_option=1)', f"{LC_CALL}[unknown-argument]"),
    ("LangChain", 'lc.invoke("x", response_format=42)', f"{LC_CALL}[format-int]"),
    ("LangChain", 'lc.with_structured_output({"type": "object", "properties": {"a": {"type": "strin"}}})',
     f"{LC_CALL}[format-bad-schema]"),
    ("LangChain", 'lc.with_structured_output({"type": "object"}, method="xml")',
     f"{LC}test_structured_output_with_an_unknown_method_is_refused"),
    ("LangChain", 'lc.bind_tools([WEATHER_TOOL], tool_choice="nope")', f"{LC_CALL}[tool-choice-unknown]"),
    ("LangChain", 'lc.bind_tools([{"type": "function", "function": {"name": "lookup"}}])',
     f"{LC_CALL}[tool-no-parameters]"),
    ("LangChain", 'lc.invoke("x", tool_choice="required")', f"{LC_CALL}[tool-choice-required-no-tools]"),
    ("LangChain", 'lc.invoke("x", max_tokens=40000)', f"{LC_CALL}[context-overflow]"),
    # -- LlamaIndex -----------------------------------------------------------------------------------
    ("LlamaIndex", "LlamaIndexFlashMoE(model=str(nowhere))", f"{LI}test_missing_store_is_a_file_not_found_error"),
    ("LlamaIndex", "LlamaIndexFlashMoE(model=str(not_a_store))", f"{LI}test_missing_store_is_a_file_not_found_error"),
    ("LlamaIndex", "LlamaIndexFlashMoE()", f"{LI}test_no_model_and_no_engine_is_refused"),
    ("LlamaIndex", 'LlamaIndexFlashMoE(model="demo", temperature=-1.0)', f"{LI_SET}[temperature-negative]"),
    ("LlamaIndex", 'LlamaIndexFlashMoE(model="demo", top_p=2.0)', f"{LI_SET}[top-p-above-one]"),
    ("LlamaIndex", 'LlamaIndexFlashMoE(model="demo", load_kwargs={"bogus": 1})', f"{LI_SET}[load-option-unknown]"),
    ("LlamaIndex", 'li.complete("")', f"{LI_CALL}[empty-prompt]"),
    ("LlamaIndex", 'li.chat([ChatMessageLI(role="user", blocks=[TextBlock(text="What is this?"), '
     'ImageBlock(image=b"\\x89PNG")])])', f"{LI_CALL}[image-part]"),
    ("LlamaIndex", 'li.complete("x", max_tokens=0)', f"{LI_CALL}[max-tokens-zero]"),
    ("LlamaIndex", 'list(li.stream_chat([ChatMessageLI(role="user", content="x")], max_tokens=0))',
     f"{LI_CALL}[stream-max-tokens-zero]"),
    ("LlamaIndex", 'li.chat([ChatMessageLI(role="user", content="x")], no_such_option=1)',
     f"{LI_CALL}[unknown-argument]"),
    ("LlamaIndex", 'li.chat([ChatMessageLI(role="user", content="x")], response_format=42)', f"{LI_CALL}[format-int]"),
    ("LlamaIndex", 'li.chat([ChatMessageLI(role="user", content="x")], tools=[WEATHER_TOOL], tool_choice="nope")',
     f"{LI_CALL}[tool-choice-unknown]"),
    ("LlamaIndex", 'li.chat([ChatMessageLI(role="user", content="x")], '
     'tools=[{"type": "function", "function": {"name": "lookup"}}])', f"{LI_CALL}[tool-no-parameters]"),
    ("LlamaIndex", 'li.chat_with_tools([], user_msg="x", tool_required=True)',
     f"{LI_CALL}[tool-choice-required-no-tools]"),
    ("LlamaIndex", 'li.complete("x", max_tokens=40000)', f"{LI_CALL}[context-overflow]"),
]
# fmt: on


# -- fixtures: damaged copies of the demo store ----------------------------------------------------


def _edit_manifest(edit):
    def apply(store: Path) -> None:
        data = json.loads((store / "manifest.json").read_text())
        edit(data)
        (store / "manifest.json").write_text(json.dumps(data))

    return apply


def _truncate(name: str, keep: float):
    def apply(store: Path) -> None:
        path = next(store.glob(name))
        os.truncate(path, int(path.stat().st_size * keep))

    return apply


def _flip_every_record(store: Path) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    for layer in manifest["layers"]:
        with open(store / layer["file"], "r+b") as f:
            for e in range(layer["num_experts"]):
                f.seek(e * layer["record_bytes"] + 10)
                byte = f.read(1)
                f.seek(e * layer["record_bytes"] + 10)
                f.write(bytes([byte[0] ^ 0xFF]))


def _layer0(key: str, value: Any):
    return _edit_manifest(lambda d: d["layers"][0].__setitem__(key, value))


def _checksum_str(data: dict) -> None:
    data["layers"][0]["checksums"][3] = "x"


def _offset_str(data: dict) -> None:
    data["layers"][0]["tensors"][0]["offset"] = "x"


#: fixture name -> (what it is, for the legend; how a copy of the demo store is damaged)
DAMAGED = {
    "store_num_experts_lots": ('manifest.json: layers[0].num_experts = "lots"', _layer0("num_experts", "lots")),
    "store_num_experts_float": ("manifest.json: layers[0].num_experts = 31.5", _layer0("num_experts", 31.5)),
    "store_alignment_lots": ('manifest.json: alignment = "lots"',
                             _edit_manifest(lambda d: d.__setitem__("alignment", "lots"))),
    "store_checksum_str": ('manifest.json: layers[0].checksums[3] = "x"', _edit_manifest(_checksum_str)),
    "store_offset_str": ('manifest.json: layers[0].tensors[0].offset = "x"', _edit_manifest(_offset_str)),
    "store_layers_empty": ("manifest.json: layers = []", _edit_manifest(lambda d: d.__setitem__("layers", []))),
    "store_file_missing": ("manifest.json: layers[0] without its file",
                           _edit_manifest(lambda d: d["layers"][0].pop("file"))),
    "store_version_9": ("manifest.json: version = 9", _edit_manifest(lambda d: d.__setitem__("version", 9))),
    "store_manifest_truncated": ("manifest.json cut to half its bytes", _truncate("manifest.json", 0.5)),
    "store_expert_file_truncated": ("experts/layer_002.bin 100 bytes short",
                                    lambda s: os.truncate(s / "experts/layer_002.bin",
                                                          (s / "experts/layer_002.bin").stat().st_size - 100)),
    "store_no_tokenizer_config": ("tokenizer_config.json deleted",
                                  lambda s: (s / "tokenizer_config.json").unlink()),
    "store_bad_generation_config": ('generation_config.json: {"do_sample": true, "top_p": 3}',
                                    lambda s: (s / "generation_config.json").write_text(
                                        '{"do_sample": true, "top_p": 3}')),
    "store_flipped": ("one byte flipped in every expert record (checksums no longer match)", _flip_every_record),
}


@dataclass
class Outcome:
    kind: str  # exception type (and the builtin types it is), or "exit N"
    message: str
    ok: bool  # refused (an exception, or a non-zero exit / warning line) without a traceback


def _kind(error: BaseException) -> str:
    """The error's type, and the builtin types a user catches it as: ``PromptError (ValueError)``."""
    name = type(error).__name__
    builtins = [t.__name__ for t in (FileNotFoundError, TypeError, ValueError) if isinstance(error, t)]
    also = [b for b in builtins if b != name]
    return f"{name} ({', '.join(also)})" if also else name


def _run_python(code: str, ns: dict) -> Outcome:
    try:
        with _quiet():
            exec(compile(code, "<row>", "exec"), ns)  # the table's own constant code
    except Exception as e:  # what a user would catch is the point
        return Outcome(_kind(e), str(e), True)
    return Outcome("no error", "(accepted)", False)


@contextlib.contextmanager
def _quiet():
    """Keep what a row prints (pack's notices, tqdm) out of the report's terminal output."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _flashmoe() -> list[str]:
    script = Path(sys.executable).parent / "flashmoe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flashmoe_backend.cli"]


def _run_cli(line: str, paths: dict[str, Path]) -> Outcome:
    argv = shlex.split(line.format(**{k: str(v) for k, v in paths.items()}))[1:]
    done = subprocess.run(
        [*_flashmoe(), *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )
    lines = [x for x in done.stderr.splitlines() if x.startswith(("flashmoe: error:", "flashmoe: warning:"))]
    lines += [x for x in done.stderr.splitlines() if x.startswith("CORRUPT")][:1]
    message = lines[0] if lines else (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
    if len([x for x in done.stderr.splitlines() if x.startswith("CORRUPT")]) > 1:
        message += f" (and {done.stderr.count('CORRUPT') - 1} more CORRUPT lines; stdout: {done.stdout.strip()})"
    traceback = "Traceback" in done.stderr
    refused = done.returncode != 0 or message.startswith("flashmoe: warning:")
    return Outcome(f"exit {done.returncode}" + (" + TRACEBACK" if traceback else ""), message,
                   refused and not traceback)


def namespace(tmp: Path, paths: dict[str, Path]) -> dict[str, Any]:
    """What the table's Python inputs see: the engine (demo store, loaded once and shared by the
    integrations' objects), the classes, the demo's tool, and the fixture paths."""
    from langchain_core.messages import ChatMessage, HumanMessage
    from langchain_flashmoe import ChatFlashMoE
    from llama_index.core.base.llms.types import ChatMessage as ChatMessageLI
    from llama_index.core.base.llms.types import ImageBlock, TextBlock
    from llama_index.llms.flashmoe import FlashMoE as LlamaIndexFlashMoE

    from flashmoe_backend import FlashMoE, PackOptions, pack
    from flashmoe_backend.cli.demo import WEATHER_TOOL
    from flashmoe_backend.store.source import default_store

    engine = FlashMoE.shared("demo")
    return {
        "FlashMoE": FlashMoE, "PackOptions": PackOptions, "pack": pack, "WEATHER_TOOL": WEATHER_TOOL,
        "ChatFlashMoE": ChatFlashMoE, "HumanMessage": HumanMessage, "ChatMessage": ChatMessage,
        "LlamaIndexFlashMoE": LlamaIndexFlashMoE, "ChatMessageLI": ChatMessageLI,
        "TextBlock": TextBlock, "ImageBlock": ImageBlock,
        "engine": engine, "lc": ChatFlashMoE(model="demo"), "li": LlamaIndexFlashMoE(model="demo"),
        "demo_store": default_store(), "tmp": tmp, **paths,
    }


def make_fixtures(tmp: Path) -> dict[str, Path]:
    from flashmoe_backend.store.source import default_store

    paths = {"tmp": tmp, "nowhere": tmp / "nowhere", "not_a_store": tmp / "not-a-store"}
    paths["not_a_store"].mkdir()
    (paths["not_a_store"] / "notes.txt").write_text("not a store\n")
    for name, (_, damage) in DAMAGED.items():
        store = shutil.copytree(default_store(), tmp / name.removeprefix("store_"))
        damage(store)
        paths[name] = store
    return paths


def collected_tests(node_ids: set[str]) -> set[str]:
    """The ones of ``node_ids`` that ``pytest --collect-only`` finds."""
    files = sorted({n.split("::")[0] for n in node_ids})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        capture_output=True, text=True, cwd=ROOT,
    )
    found = {line.strip() for line in done.stdout.splitlines() if "::" in line}
    functions = {n.split("[")[0] for n in found}
    return {n for n in node_ids if n in found or ("[" not in n and n in functions)}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _code(text: str) -> str:
    return f"`{text}`"


def report(rows: list[tuple[str, str, str, Outcome]], legend: dict[str, str], covered: set[str] | None,
           seconds: float) -> str:
    refused = sum(o.ok for *_, o in rows)
    lines = [
        "# Bad inputs and their errors (issue #16)",
        "",
        f"Generated by `python -m bench.bad_inputs` in {seconds:.0f} s: {len(rows)} bad inputs, "
        f"{refused} refused with a clear error and no traceback"
        + (f", {sum(t in covered for *_, t, _ in rows)} covered by a collected test." if covered is not None
           else "."),
        "Each input was performed for real; the message is `str(error)` (CLI: the stderr line), "
        "`$TMP` the temporary directory of the run.",
        "",
        "Fixtures: " + "; ".join(f"`{k}`: {v}" for k, v in legend.items()) + ".",
        "",
        "| # | surface | input | exception type / exit code | verbatim message | test |",
        "|---|---|---|---|---|---|",
    ]
    for i, (surface, shown, test, outcome) in enumerate(rows, 1):
        mark = "" if covered is None else (" ✓" if test in covered else " **(not found)**")
        flag = "" if outcome.ok else " **NOT REFUSED**"
        lines.append(
            f"| {i} | {surface} | {_cell(_code(shown))} | {_cell(outcome.kind)}{flag} | "
            f"{_cell(outcome.message)} | {_cell(_code(test))}{mark} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bad_inputs.md"), help="markdown table to write")
    parser.add_argument("--no-check-tests", action="store_true", help="do not collect the named tests")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flashmoe-bad-inputs-") as tmp_dir:
        tmp = Path(tmp_dir).resolve()
        paths = make_fixtures(tmp)
        ns = namespace(tmp, paths)
        rows = []
        for surface, shown, test in ROWS:
            outcome = _run_cli(shown, paths) if surface == "CLI" else _run_python(shown, ns)
            outcome.message = outcome.message.replace(str(tmp), "$TMP")
            shown = shown.replace("{tmp}", "$TMP").replace("{", "").replace("}", "") if surface == "CLI" else shown
            rows.append((surface, shown, test, outcome))
            print(f"{len(rows):3} {surface:10} {outcome.kind:38} {outcome.message[:90]}", flush=True)
    covered = None if args.no_check_tests else collected_tests({t for *_, t, _ in rows})
    legend = {
        "nowhere": "a path that does not exist",
        "not_a_store": "a directory without manifest.json",
        "engine": 'FlashMoE.shared("demo")',
        "lc": 'ChatFlashMoE(model="demo")',
        "li": 'llama_index.llms.flashmoe.FlashMoE(model="demo")',
        "demo_store": "the embedded demo store's directory",
        **{name: f"a copy of the demo store, {what}" for name, (what, _) in DAMAGED.items()},
    }
    text = report(rows, legend, covered, time.perf_counter() - start)
    args.out.write_text(text)
    missing = [t for *_, t, _ in rows if covered is not None and t not in covered]
    not_refused = [s for _, s, _, o in rows if not o.ok]
    print(f"wrote {args.out}: {len(rows)} rows, {len(not_refused)} not refused, "
          f"{'unchecked' if covered is None else f'{len(missing)} without a collected test'}")
    for t in missing:
        print(f"  no test: {t}")
    return 1 if missing or not_refused else 0


if __name__ == "__main__":
    sys.exit(main())
