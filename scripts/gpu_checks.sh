#!/usr/bin/env bash
# Every GPU-only check in one call, for a CUDA machine (e.g. the lent H100/H200):
#   1. pytest -m gpu (QLoRA on CUDA, sdpa vs eager log-probs, FSDP2 wrap/save/resume in one process)
#   2. bench/orpo_bench.py on CUDA: orpo_dist vs TRL, Qwen2.5-0.5B-/1.5B-shaped models, with MFU
# and writes a table to ${OUT:-bench/results}/gpu_checks.md.
# Wheels the GPU image lacks (trl, deepspeed, bitsandbytes, datasets, ...) can be carried in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} HF_HUB_OFFLINE=1 WANDB_MODE=disabled TRL_EXPERIMENTAL_SILENCE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -m gpu tests/test_gpu.py -q -rA 2>&1 | tee "$out/gpu_pytest.log"
pytest_rc=${PIPESTATUS[0]}
python3 bench/orpo_bench.py --device cuda --out "$out" 2>&1 | tee "$out/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
{
  echo "# GPU checks ($(head -n1 "$out/gpu.txt"))"
  echo
  echo "| check | result |"
  echo "|---|---|"
  echo "| pytest -m gpu | exit $pytest_rc: $(tail -n1 "$out/gpu_pytest.log") |"
  echo "| bench/orpo_bench.py --device cuda | exit $bench_rc (table below) |"
  echo
  cat "$out"/cuda*.md 2>/dev/null
} > "$out/gpu_checks.md"
cat "$out/gpu_checks.md"
