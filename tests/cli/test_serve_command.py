"""``flashmoe serve``: its arguments, a port in use said before the model loads, a real server in
a subprocess that the openai client uses (API key from the environment, offline guard on), and a
CLI start that does not import the server's stack."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from flashmoe_backend.cli import commands as cli
from flashmoe_backend.cli.commands import served_model_id
from flashmoe_backend.store.source import default_store
from tests.cli.test_cli import run

SERVER_STACK = ("fastapi", "uvicorn", "sse_starlette", "starlette")


def test_help_lists_serve_and_its_options(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "    serve " in out
    code, out, _ = run(["serve", "--help"], capsys)
    assert code == 0
    for option in ("--host", "--port", "--cache-gb", "--api-key", "--max-queue", "--timeout",
                   "--max-body-bytes", "--max-tokens-limit", "--prompt-cache-dir", "--offline"):
        assert option in out
    assert "default: 127.0.0.1" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["serve", "demo", "--port", "70000"], "argument --port: must be in [0, 65535], got 70000"),
        (["serve", "demo", "--max-queue", "-1"], "argument --max-queue: must be >= 0, got -1"),
        (["serve", "demo", "--api-key", ""], "argument --api-key: must not be empty"),
        (["serve", "demo", "--timeout", "x"], "argument --timeout: must be a number, got 'x'"),
        (["serve", "demo", "--prompt-cache-dir", ""], "argument --prompt-cache-dir: must not be empty"),
    ],
)
def test_bad_arguments_are_one_line(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and f"flashmoe: error: {message}" in err


def test_port_in_use_is_said_before_the_model_loads(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(["serve", "demo", "--port", str(port)], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"flashmoe: error: cannot listen on 127.0.0.1:{port}: ")


def test_served_model_id():
    assert served_model_id(default_store()) == "demo"
    assert served_model_id(default_store().parent / "my-store") == "my-store"


def test_startup_does_not_import_the_server_stack():
    code = ("from flashmoe_backend.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n"
            f"    pass\nimport sys\nprint(','.join(m for m in {SERVER_STACK!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "", f"loaded: {done.stdout.splitlines()[-1]}"


def test_serve_demo_answers_the_openai_client_and_ends_on_ctrl_c():
    import httpx
    import openai

    env = {**os.environ, "FLASHMOE_API_KEY": "sekrit"}
    process = subprocess.Popen(
        [sys.executable, "-m", "flashmoe_backend.cli", "serve", "demo", "--port", "0", "--offline"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        port = None
        for line in process.stderr:  # "flashmoe: serving 'demo' at http://127.0.0.1:PORT/v1"
            if match := re.search(r"serving 'demo' at http://127\.0\.0\.1:(\d+)/v1", line):
                port = int(match.group(1))
                break
        assert port, "the server did not say where it serves"
        url = f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["status"] == "ok"
        assert httpx.get(url + "/models", timeout=30).status_code == 401  # the key came from the env
        client = openai.OpenAI(base_url=url, api_key="sekrit", max_retries=0)
        answer = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hello"}], max_tokens=20
        )
        assert answer.choices[0].message.content.strip()
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130  # as every flashmoe command ends on Ctrl-C
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
