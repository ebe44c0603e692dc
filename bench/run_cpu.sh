#!/usr/bin/env bash
# The CPU benchmark behind bench/RESULTS.md (2-core, 24 GB machine; ~20 GiB of free disk needed).
# Run from the repository root with the project's environment active. Takes ~30-40 minutes.
set -euo pipefail
STORE=${STORE:-/tmp/flashmoe-bench-store}
OUT=${OUT_DIR:-bench/results}
mkdir -p "$OUT"
df -h "$(dirname "$STORE")"

# 1. Synthetic Qwen3.5-397B-sized store (6 layers x 512 experts x 7,077,888 B = 20.25 GiB), calibrated
#    routing trace, every experiment; the store is kept for step 2 and deleted at the end.
python -m flashmoe_backend.bench synthetic --store "$STORE" --keep-store --layers 6 --experts 512 \
    --drop-caches --repeats 2 --out "$OUT/cpu_full.json" --markdown "$OUT/cpu_full.md"

# 2. The same store with the expert-compute stand-in off: I/O path alone against the floor.
python -m flashmoe_backend.bench synthetic --store "$STORE" --experiments decode --no-touch \
    --drop-caches --repeats 2 --out "$OUT/cpu_notouch.json" --markdown "$OUT/cpu_notouch.md"

rm -rf "$STORE"

# 3. Real-model mode on the embedded demo model (tiny: structure, not speed).
python -m flashmoe_backend.bench model "$(python -c 'from flashmoe_backend.cli.demo import default_store; print(default_store())')" \
    --prompt-tokens 512 --max-tokens 32 --out "$OUT/model_demo.json" --markdown "$OUT/model_demo.md"
