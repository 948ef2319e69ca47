#!/usr/bin/env bash
# Runs tk's GPU tests (tests/gpu) on this machine. Tests that need what the machine lacks skip and say why:
# no CUDA -> all skip; one GPU -> the 2-GPU tests skip; no TK_GPU_7B -> the 7B tests skip.
#
#   bash tools/run_gpu_tests.sh [--make-7b DIR] [pytest args, e.g. tests/gpu/test_multi_gpu.py]
#
# --make-7b DIR writes a Llama-2-7B-shape model with random weights to DIR (once) and sets TK_GPU_7B.
# Output: $OUT (default ./gpu_out)/gpu_tests.log and gpu_results.jsonl (one line per check: losses,
# peak memory, tokens/s). NVLink multicast stays off (shared multi-GPU hosts).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TK_GPU_RESULTS="$OUT/gpu_results.jsonl"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--make-7b" ]; then
  export TK_GPU_7B="$2"
  shift 2
  [ -f "$TK_GPU_7B/config.json" ] || python3 tools/baselines/make_random_model.py "$TK_GPU_7B" 7b || exit 1
fi
[ $# -gt 0 ] || set -- tests/gpu
python3 -c 'import torch; print("torch", torch.__version__, "GPUs:", torch.cuda.device_count(),
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
python3 -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}
echo "GPU checks:"; cat "$TK_GPU_RESULTS" 2>/dev/null
exit "$status"
