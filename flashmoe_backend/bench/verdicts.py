"""What a synthetic report concludes: the benchmark's targets (met or not), the design decisions
the measurements support, and consistency checks the tests assert (never speed)."""

from __future__ import annotations

from flashmoe_backend.experts.cache import DEFAULT_POLICY

#: Targets of the benchmark (from the issue).
TARGETS = {
    "decode_over_floor": 1.25,  # at most
    "hit_rate_over_belady": 0.9,  # at least
    "prefill_over_one_pass": 1.5,  # at most
    "speedup_over_page_cache_baseline": 3.0,  # at least
}
AT_MOST = {"decode_over_floor", "prefill_over_one_pass"}


def verdict(name: str, value: float, **extra) -> dict:
    """A measured value against its target in ``TARGETS``."""
    goal = TARGETS[name]
    if name in AT_MOST:
        return {"value": value, "target": f"<= {goal}", "met": value <= goal, **extra}
    return {"value": value, "target": f">= {goal}", "met": value >= goal, **extra}


def _at_budget(rows: list[dict], fraction: float) -> list[dict]:
    """Policy-study rows of the calibrated trace at the run's budget."""
    return [r for r in rows if r["trace"] == "calibrated" and abs(r["budget_fraction"] - fraction) < 0.01]


def _policy_verdicts(rows: list[dict], fraction: float) -> tuple[dict, dict]:
    """The hit-rate target and the default-policy decision from the policy study."""
    here = _at_budget(rows, fraction)
    online = [r for r in here if r["policy"].startswith("lru") or r["policy"].startswith("lfu")]
    best = max(online, key=lambda r: r["hit_rate"])
    lru = next(r for r in online if r["policy"] == "lru")
    decision = {
        "measured_best": best["policy"],
        "best_over_belady": best["over_belady"],
        "lru_over_belady": lru["over_belady"],
        "shipped_default": DEFAULT_POLICY,
    }
    target = verdict("hit_rate_over_belady", best["over_belady"], policy=best["policy"])
    oracles = [r for r in here if r["policy"].startswith("oracle")]
    if oracles:  # the most an online policy could reach on this trace
        target["online_reference_over_belady"] = max(r["over_belady"] for r in oracles)
    return target, decision


def _page_cache_decision(default: dict, os_only: dict) -> dict:
    """Bypass the OS page cache (our cache only) or keep it: whichever decoded faster."""
    return {
        "choice": "bypass" if default["seconds_per_token"] <= os_only["seconds_per_token"] else "keep",
        "ours_bypass_seconds_per_token": default["seconds_per_token"],
        "os_page_cache_seconds_per_token": os_only["seconds_per_token"],
        "os_page_cache_hit_rate": os_only.get("os_cache_hit_rate"),
        "ours_hit_rate": default["hit_rate"],
    }


def _prefetch_decision(default: dict, runs: list[dict]) -> dict:
    """Each prefetch run against the same run without prefetch; keep it on if it gains > 2%."""
    prefetch = [r for r in runs if r["group"] == "prefetch"]
    effects = []
    for r in prefetch:
        if r["config"]["prefetch_recall"] is None:
            continue
        ms = r["config"]["compute_ms"]
        ref = (
            default
            if not ms
            else next(
                (
                    x
                    for x in prefetch
                    if x["config"]["prefetch_recall"] is None and x["config"]["compute_ms"] == ms
                ),
                None,
            )
        )
        if ref:
            effects.append(
                {
                    "run": r["name"],
                    "recall": r["config"]["prefetch_recall"],
                    "compute_ms": ms,
                    "seconds_per_token": r["seconds_per_token"],
                    "without_prefetch": ref["seconds_per_token"],
                    "net_gain": 1 - r["seconds_per_token"] / ref["seconds_per_token"],
                }
            )
    return {
        "keep_on": any(e["net_gain"] > 0.02 for e in effects if e["compute_ms"] == 0),
        "effects": effects,
    }


def judge(report: dict, default: dict | None) -> tuple[dict, dict]:
    """The report's targets and decisions; ``default`` is the decode run of the shipped defaults."""
    runs = report.get("decode", [])
    targets, decisions = {}, {}
    if default:
        targets["decode_over_floor"] = verdict("decode_over_floor", default["measured_over_floor"])
    if report.get("policies"):
        fraction = report["store"]["budget_fraction"]
        targets["hit_rate_over_belady"], decisions["default_policy"] = _policy_verdicts(
            report["policies"], fraction
        )
    elif default:
        targets["hit_rate_over_belady"] = verdict("hit_rate_over_belady", default["hit_rate_over_belady"])
    if "prefill" in report:
        targets["prefill_over_one_pass"] = verdict(
            "prefill_over_one_pass", report["prefill"]["over_one_pass"]
        )
    mmaps = [r for r in runs if r["name"].startswith("mmap")]
    if default and mmaps:
        best_mmap = min(mmaps, key=lambda r: r["seconds_per_token"])
        targets["speedup_over_page_cache_baseline"] = verdict(
            "speedup_over_page_cache_baseline",
            best_mmap["seconds_per_token"] / default["seconds_per_token"],
            baseline=best_mmap["name"],
        )
    os_only = next(
        (r for r in runs if r["group"] == "page_cache" and r["name"].startswith("OS page cache only")), None
    )
    if default and os_only:
        decisions["page_cache"] = _page_cache_decision(default, os_only)
    if default and any(r["group"] == "prefetch" and r["config"]["prefetch_recall"] is not None for r in runs):
        decisions["prefetch"] = _prefetch_decision(default, runs)
    return targets, decisions


def invariants(report: dict) -> dict:
    """Consistency checks the tests assert (never speed)."""
    out = {}
    rb = report["store"]["record_bytes"]
    budget = report["store"]["budget_bytes"]
    for r in report.get("decode", []):
        if "counters" not in r:  # runs outside our reader and cache (mmap)
            continue
        c = r["counters"]
        cfg = r["config"]
        prefetch = cfg["prefetch_recall"] is not None
        T = r["tokens_measured"] + r["warmup_tokens"]
        bytes_ok = c["bytes_read"] == c["experts_read"] * rb
        out[r["name"]] = {
            "lookups_equal_accesses": c["hits"] + c["misses"] == T * r["layers"] * r["k"],
            # prefetched reads are not misses
            "bytes_read_equal_misses_times_record": bytes_ok
            and (prefetch or c["experts_read"] == c["misses"]),
            "cache_within_budget": r["own_cache_bytes_peak"] <= cfg["budget_bytes"],
            "hit_rate_at_most_belady": prefetch
            or r["hit_rate_all_tokens"] <= r["belady_hit_rate_all_tokens"] + 1e-9,
            "floor_positive": (r["floor_seconds_per_token"] or 0) > 0,
        }
    for row in report.get("policies", []):
        key = f"policy {row['trace']} {row['budget_fraction']:.2f} {row['policy']}"
        out[key] = {"hit_rate_at_most_belady": row["hit_rate"] <= row["belady_hit_rate"] + 1e-9}
    out["budget_fits"] = {"budget_at_least_k_records": budget >= report["store"]["k"] * rb}
    return out
