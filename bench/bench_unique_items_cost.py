"""What enforcing ``uniqueItems`` while decoding costs per token: the same valid walks through
``bench_structured.py``'s tool sets (whose ``tag_documents`` has two ``uniqueItems`` arrays), with
and without the guard, interleaved in one process, at a 248,320-token logits width.

    python -m bench.bench_unique_items_cost [--reps 4]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

from bench_structured import VOCAB_SIZE, build, synthetic_token_bytes, walk_ids, walk_processor

from flashmoe_backend.constrained.vocabulary import Vocabulary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=4, help="walks per cell and variant (interleaved)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # tool notes at every compile
    token_bytes = synthetic_token_bytes(VOCAB_SIZE)
    vocab = Vocabulary(token_bytes, [len(token_bytes) - 1])
    vocab.llg  # noqa: B018 - built once, before any walk
    print("| tools | with the guard, median ms | without, median ms | difference |")
    print("|---|---:|---:|---:|")
    for fmt in ("xml", "hermes"):
        for n in (5, 20):
            cell = {"kind": "tools", "fmt": fmt, "mode": "forced", "n": n}
            free, ids = walk_ids(cell, vocab)
            steps: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.reps):
                for guarded in (True, False):
                    constraint = build(cell, vocab)
                    assert constraint.guard is not None, "the tool set should have uniqueItems"
                    if not guarded:
                        constraint.guard = None
                    steps[guarded] += walk_processor(constraint, free + ids, vocab.size)[1:]
            on, off = (statistics.median(steps[g]) * 1e3 for g in (True, False))
            print(f"| {fmt}, {n} | {on:.3f} | {off:.3f} | {on - off:+.3f} |")


if __name__ == "__main__":
    main()
