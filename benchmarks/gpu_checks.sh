#!/usr/bin/env bash
# Every check that needs a GPU, prepared as one call for a short device lease (about 8 minutes in all):
#   1. the kernel and whole-model kernel tests on CUDA (the same tests CI runs under the Triton interpreter);
#   2. benchmarks/kernels.py: per-op Triton vs eager, GB/s against a copy, the 256x256 training step;
#   3. step time and activation memory of the memory modes on the GPU, kernels triton vs torch.
# Logs and JSON rows go to $OUT (the device tool's output folder) or benchmarks/results/gpu/.
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
# kernels/ is installed as revglow.kernels: an editable install, offline (no dependencies fetched)
"$py" -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }

status=0
echo "== kernel tests on CUDA"
REVGLOW_TEST_DEVICE=cuda timeout 240 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_actnorm_conv1x1.py \
    tests/test_kernels_coupling_affine.py tests/test_model_kernels.py 2>&1 | tee "$out/tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernel benchmark"
timeout 300 "$py" benchmarks/kernels.py --results "$out/kernels.jsonl" 2>&1 | tee "$out/kernels.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== step time of the memory modes (CUDA)"
for k in torch triton; do
  timeout 90 "$py" benchmarks/step_time.py --device cuda --kernels "$k" --image-size 64 --depth 16 --hidden 256 \
      --batch-size 32 --rounds 10 --results "$out/step_time.jsonl" 2>&1 | tee "$out/step_time_$k.log" | tail -6
done

echo "== activation memory vs depth (CUDA)"
timeout 120 "$py" benchmarks/memory_vs_depth.py --device cuda --depths 4 32 --results "$out/memory_vs_depth.jsonl" \
    2>&1 | tee "$out/memory.log" | tail -8
exit $status
