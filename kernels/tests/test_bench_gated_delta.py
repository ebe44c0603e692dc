"""kernels/bench/bench_gated_delta.py at tiny size: it runs as written and its rows are sane
(structure and accuracy, never speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_gated_delta.py"


def test_bench_gated_delta_tiny(tmp_path):
    out = tmp_path / "gdn.json"
    args = ["--lengths", "40", "--qwen-lengths", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["T"] == 40 and row["ops_ms"] > 0 and row["chunked_ms"] > 0
    assert row["chunked_max_abs_dy"] < 1e-5 and row["chunked_max_abs_dstate"] < 1e-5
    assert "| small | 1 | 40 |" in proc.stdout
