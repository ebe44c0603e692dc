"""``bench/bench_server.py`` at tiny size: the report's structure and invariants, never speed
(the full run's numbers are in bench/RESULTS.md, "flashmoe serve")."""

from __future__ import annotations

import importlib
import json


def test_bench_server_tiny(tmp_path):
    script = importlib.import_module("bench.bench_server")  # as ``python -m bench.bench_server``
    out = tmp_path / "server.json"
    report = script.main(["--runs", "1", "--repeats", "1", "--max-tokens", "3", "--system-lines", "0",
                          "--tools", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    overhead = report["overhead"]
    assert overhead["same_text_everywhere"]  # the server adds nothing to the engine's output
    assert set(overhead["ms_per_token"]) == set(script.OVERHEAD_MODES)
    assert all(s["n"] == 1 and s["median"] > 0 for s in overhead["ms_per_token"].values())
    assert set(overhead["ratios"]) == {f"{server} / {direct}" for server, direct in script.PAIRS}
    assert all(r["median_ratio"] > 0 for r in overhead["ratios"].values())
    ttft = report["ttft"]
    assert ttft["tools"] == ["get_weather"] and ttft["prompt_tokens"] > 0 and ttft["cache_file_bytes"][0] > 0
    none, writes, reads = ttft["conditions"].values()
    assert none["first_request_cached_tokens"] == writes["first_request_cached_tokens"] == [0]
    # the restarted server read the prefix (system prompt + tools) from the file
    assert 0 < reads["first_request_cached_tokens"][0] < ttft["prompt_tokens"]
    assert all(c["first_request_ttft_s"]["median"] > 0 for c in ttft["conditions"].values())
    assert "| server stream / engine stream |" in script.markdown(report)
