"""The report: the machine it ran on, the markdown rendering of a JSON report, and writing both."""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path

from flashmoe_backend.bench.common import GiB, MiB


def machine_info(path: Path) -> dict:
    """CPUs, MLX and its device, memory (Linux) and the free disk space at ``path``."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import mlx.core as mx

        info["mlx"] = mx.__version__
        info["mlx_device"] = str(mx.default_device())
    except Exception:  # pragma: no cover
        pass
    try:
        with open("/proc/meminfo") as f:
            mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        info["memory_total_bytes"] = mem.get("MemTotal")
        info["memory_available_bytes"] = mem.get("MemAvailable")
    except OSError:
        pass
    info["disk_free_bytes"] = shutil.disk_usage(path).free
    return info


def write_report(report: dict, out: Path | None, markdown: Path | None) -> None:
    """The JSON to ``out`` and the markdown to ``markdown``; the markdown to stdout if neither."""
    text = to_markdown(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(text)
    if not out and not markdown:
        print(text)


# -- markdown -------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "—" if x is None else f"{x:.1%}"


def _ms(x) -> str:
    return "—" if x is None else f"{x * 1000:.1f}"


def _mib(x) -> str:
    return "—" if x is None else f"{x / MiB:,.0f}"


def _fixed(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    """The report as markdown: setup, measured bandwidths, then a table per experiment."""
    m = report["machine"]
    out = [
        f"Command: `{report.get('command')}`",
        "",
        f"Machine: {m.get('cpus')} CPUs, {(m.get('memory_total_bytes') or 0) / GiB:.1f} GiB RAM, "
        f"{m.get('platform')}, MLX {m.get('mlx')} on {m.get('mlx_device')}.",
    ]
    sections = _MODEL_SECTIONS if report["mode"] == "model" else _SYNTHETIC_SECTIONS
    for section in sections:
        out += section(report)
    return "\n".join(out) + "\n"


# -- model mode


def _model_setup(report: dict) -> list[str]:
    s, b = report["store"], report["bandwidth"]
    return [
        f"Store: {s['path']}, {s['moe_layers']} MoE layers, {_mib(s['expert_bytes'])} MiB experts, "
        f"{_mib(s['resident_bytes'])} MiB resident; budget {_mib(s['budget_bytes'])} MiB "
        f"({s['budget_fraction']:.0%}).",
        f"Measured: disk {b['disk']['bytes_per_s'] / 1e9:.2f} GB/s, memory "
        f"{b['memory']['bytes_per_s'] / 1e9:.2f} GB/s.\n",
    ]


def _model_table(report: dict) -> list[str]:
    header = [
        "K",
        "prompt tok",
        "prefill s",
        "gen tok",
        "decode tok/s",
        "hit",
        "Belady hit",
        "MiB read/tok",
        "I/O wait",
        "router sync",
        "compute+rest",
        "floor ms/tok",
        "measured/floor",
    ]
    rows = [
        [
            r["k"],
            r["prompt_tokens"],
            f"{r['prefill_seconds']:.2f}",
            r["generated_tokens"],
            f"{r['decode_tokens_per_s']:.2f}",
            f"{r['hit_rate']:.3f}",
            f"{r['belady_hit_rate']:.3f}",
            _mib(r["bytes_read_per_token"]),
            _pct(r["time_shares"]["io_wait"]),
            _pct(r["time_shares"]["router_sync"]),
            _pct(r["time_shares"]["compute_and_rest"]),
            _ms(r["floor_seconds_per_token"]),
            f"{r['measured_over_floor']:.2f}",
        ]
        for r in report["runs"]
    ]
    return [_table(header, rows)]


def _mlx_lm(report: dict) -> list[str]:
    x = report.get("mlx_lm_in_memory")
    if not x:
        return []
    return [
        f"\nmlx-lm, whole model in memory: prompt {x['prompt_tps']:.1f} tok/s, "
        f"generation {x['generation_tps']:.1f} tok/s."
    ]


_MODEL_SECTIONS = (_model_setup, _model_table, _mlx_lm)


# -- synthetic mode


def _synthetic_setup(report: dict) -> list[str]:
    s, cs, b = report["store"], report["cold_start"], report["bandwidth"]
    return [
        f"Store: {s['layers']} layers x {s['experts_per_layer']} experts x {s['record_bytes']:,} B = "
        f"{s['expert_bytes'] / GiB:.2f} GiB of experts; budget {s['budget_bytes'] / GiB:.2f} GiB "
        f"({s['budget_fraction']:.0%}); K={s['k']}.",
        f"Cold start: posix_fadvise(DONTNEED) on every expert file before each run"
        f"{', plus drop_caches' if cs['drop_caches'] else ''}; store bytes resident after eviction: "
        f"{_mib(cs['resident_bytes_after_evict'])} MiB.",
        f"Measured in this run: disk {b['disk']['bytes_per_s'] / 1e9:.2f} GB/s (O_DIRECT, "
        f"{b['disk']['records']} random records in batches of {b['disk']['batch']}, "
        f"{b['disk']['threads']} threads); memory {b['memory']['bytes_per_s'] / 1e9:.2f} GB/s "
        f"({b['memory']['method']}).\n",
    ]


def _trace_table(report: dict) -> list[str]:
    t = report["trace"]
    rows = []
    for name, c in t["checks"].items():
        target = c["target"] if not isinstance(c["target"], list) else f"{c['target'][0]}–{c['target'][1]}"
        extra = f" (max feasible {c['bound']:.3f})" if "bound" in c else ""
        verdict = {True: "ok", False: "off", None: "n/a (quoted for 512 experts, k=10)"}[c["ok"]]
        rows.append([name, f"{c['value']:.3f}", f"{target}{extra}", verdict])
    return [
        "**Routing trace vs the published Qwen3.5-397B statistics** "
        f"({t['stats']['tokens']} tokens x {t['stats']['layers']} layers, seed {t['spec']['seed']})\n",
        _table(["statistic", "measured", "target", ""], rows),
    ]


def _policy_table(report: dict) -> list[str]:
    if not report.get("policies"):
        return []
    rows = [
        [
            r["trace"],
            f"{r['budget_fraction']:.0%}",
            r["policy"],
            f"{r['hit_rate']:.3f}",
            f"{r['over_belady']:.3f}",
        ]
        for r in report["policies"]
    ]
    return [
        "\n**Cache policies vs Belady** (hit rate over the whole trace, cold start; no I/O)\n",
        _table(["trace", "budget", "policy", "hit rate", "/ Belady"], rows),
    ]


def _pair(values, fmt: str) -> str:
    return "—" if not values else "/".join(format(x, fmt) for x in values)


def _decode_table(report: dict) -> list[str]:
    if not report.get("decode"):
        return []
    header = [
        "run",
        "memory MiB",
        "tok/s",
        "ms/token",
        "hit",
        "Belady hit",
        "MiB read/tok",
        "MiB from disk/tok",
        "I/O wait",
        "expert compute",
        "rest",
        "floor ms/tok",
        "measured/floor",
        "disk GB/s before/after",
        "load before/after",
    ]
    rows = []
    for r in report["decode"]:
        sh = r["time_shares"]
        disk = r.get("disk_bytes_per_s_around_run")
        rows.append(
            [
                r["name"],
                _mib(r.get("memory_bytes")),
                f"{r['tokens_per_s']:.2f}",
                _ms(r["seconds_per_token"]),
                _fixed(r.get("hit_rate_combined", r.get("hit_rate"))),
                _fixed(r.get("belady_hit_rate")),
                _mib(r.get("bytes_read_per_token")),
                _mib(r.get("disk_bytes_per_token")),
                _pct(sh.get("io_wait")),
                _pct(sh.get("expert_compute")),
                _pct(sh.get("rest")),
                _ms(r.get("floor_seconds_per_token")),
                _fixed(r.get("measured_over_floor"), 2),
                _pair(disk and [x / 1e9 for x in disk], ".2f"),
                _pair(r.get("load_average"), ".1f"),
            ]
        )
    return [
        "\n**Decode** (after warm-up; ms per token; shares of wall time; hit = served from memory, "
        "own cache or page cache)\n",
        _table(header, rows),
    ]


def _prefill_table(report: dict) -> list[str]:
    p = report.get("prefill")
    if not p:
        return []
    header = [
        "prefill s",
        "of which I/O wait s",
        "expert compute s",
        "one raw pass s",
        "one pass GB/s",
        "prefill / one pass",
    ]
    row = [
        f"{p['seconds']:.2f}",
        f"{p['io_seconds']:.2f}",
        f"{p['expert_compute_seconds']:.2f}",
        f"{p['one_pass_seconds']:.2f}",
        f"{p['one_pass_bytes_per_s'] / 1e9:.2f}",
        f"{p['over_one_pass']:.2f}",
    ]
    return [
        f"\n**Prefill** of {p['prompt_tokens']} tokens (layer-major, cold): needs "
        f"{p['experts_needed']} experts ({p['experts_needed_share']:.0%} of the store, "
        f"{p['bytes_needed'] / GiB:.2f} GiB) in {p['groups']} group(s)\n",
        _table(header, [row]),
    ]


def _target_table(report: dict) -> list[str]:
    if not report.get("targets"):
        return []
    rows = [
        [k, f"{v['value']:.3f}", v["target"], "met" if v["met"] else "NOT met"]
        for k, v in report["targets"].items()
    ]
    return ["\n**Targets**\n", _table(["target", "measured", "goal", ""], rows)]


def _decision_block(report: dict) -> list[str]:
    if not report.get("decisions"):
        return []
    return ["\n**Decisions**\n", "```json\n" + json.dumps(report["decisions"], indent=1) + "\n```"]


_SYNTHETIC_SECTIONS = (
    _synthetic_setup,
    _trace_table,
    _policy_table,
    _decode_table,
    _prefill_table,
    _target_table,
    _decision_block,
)
