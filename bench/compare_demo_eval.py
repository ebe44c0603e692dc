"""Side-by-side table of two ``train/evaluate.py`` runs (their ``.json`` outputs): old vs new.

    python -m bench.compare_demo_eval OLD.json NEW.json [--labels old,new]

One table per bit width: each metric of ``train.evaluate.COLUMNS`` (plus the JSON field accuracy
and QA 'contains'), the two scores, their difference, and the mean decode tok/s of each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train.evaluate import COLUMNS

EXTRA = [("qa", "contains", "QA reply contains the answer"), ("tool_auto", "name", "tool name (auto)"),
         ("tool_required", "name", "tool name (required)"), ("json_free", "fields", "JSON fields (free)"),
         ("json_constrained", "fields", "JSON fields (constrained)")]


def compare(old: dict, new: dict, labels: tuple[str, str]) -> str:
    lines = []
    for bits in old["results"]:
        o, n = old["results"][bits], new["results"].get(bits, {})
        a_, b_ = labels
        lines += [f"### {bits}-bit experts", "",
                  f"| metric | {a_} | {b_} | new - old | tok/s {a_} | tok/s {b_} |",
                  "|---|---|---|---|---|---|"]
        for task, key, title in COLUMNS + EXTRA:
            a, b = o.get(task, {}), n.get(task, {})
            if key not in a and key not in b:
                continue
            va, vb = a.get(key), b.get(key)
            delta = f"{(vb - va) * 100:+.0f} pt" if va is not None and vb is not None else "-"
            lines.append(f"| {title} | {_pct(va)} | {_pct(vb)} | {delta} | {a.get('tok_s', 0):.0f} | "
                         f"{b.get('tok_s', 0):.0f} |")
        lines.append("")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--labels", default="old,new")
    args = p.parse_args(argv)
    labels = tuple(args.labels.split(","))
    text = compare(json.loads(args.old.read_text()), json.loads(args.new.read_text()), labels)
    print(text)
    return text


if __name__ == "__main__":
    main()
