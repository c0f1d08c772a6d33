#!/usr/bin/env bash
# What a session with a GPU (the `device` tool's H100/H200) runs, one phase per
# device call so each stays under the 10-minute limit. Results go to $OUT
# (the device tool brings them back); commit them to benchmarks/results/.
#
#   bash benchmarks/gpu_session.sh tests        # CUDA tests of the core + transformers tests
#   bash benchmarks/gpu_session.sh core         # bench_core at Llama-3-8B layer shapes
#   bash benchmarks/gpu_session.sh hf-dynamic   # bench_hf, one setup per call:
#   bash benchmarks/gpu_session.sh hf-offloaded
#   bash benchmarks/gpu_session.sh hf-headinfer
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
case "${1:?phase: tests | core | hf-dynamic | hf-offloaded | hf-headinfer}" in
  tests)
    python3 -m pytest -q tests/core tests/hf -p no:cacheprovider 2>&1 | tee "$out/tests.log" ;;
  core)
    python3 benchmarks/bench_core.py --out "$out/core" 2>&1 | tee "$out/core.log" ;;
  hf-*)
    setup=${1#hf-}
    python3 benchmarks/bench_hf.py --setups "$setup" --time-budget 500 --out "$out/hf_$setup" 2>&1 \
      | tee "$out/hf_$setup.log" ;;
  *) echo "unknown phase $1" >&2; exit 2 ;;
esac
