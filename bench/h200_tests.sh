#!/usr/bin/env bash
# The tests that must also hold on a CUDA machine (GPU paths and CPU-pinned paths alike), run on
# the lent H200 after the MLX CUDA setup of ../shared/tools/mlx-cuda.md:
#   bash bench/h200_tests.sh [OUT_DIR]
# The kernels' CUDA tests run only here (CI has no GPU); everything else must pass on both.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
. /tmp/mlxenv
export PYTHONPATH=$PWD:$PWD/kernels:${PYTHONPATH:-}
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
python3 -m pytest -q -p no:cacheprovider -rs kernels/tests tests/experts tests/test_engine.py \
  tests/test_engine_kernels.py tests/store 2>&1 | tee "$out/h200_tests.txt" | tail -40
