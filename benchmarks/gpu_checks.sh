#!/usr/bin/env bash
# Every check that needs a GPU, prepared as one call for a short device lease (about 8 minutes in all; each step
# has a timeout, and the steps run in order of importance, so a lease that ends early still returns the first):
#   1. the kernel, whole-model kernel and dispatch tests on CUDA (the same tests CI runs under the Triton
#      interpreter), and the time of kernels="auto"'s self-check;
#   2. benchmarks/kernels.py: per-op Triton vs eager, GB/s against a copy, the 256x256 training step;
#   3. step time and activation memory of the memory modes on the GPU, kernels triton vs torch;
#   4. the pytest-benchmark micro-benchmarks (benchmarks/test_ops.py, as `make bench-ops`), saved under
#      $OUT/micro/ in the format `pytest-benchmark compare` reads; copy them to benchmarks/results/micro/cuda/;
#   5. torch.compile against eager (benchmarks/compile_step.py) on CUDA.
# Right after the tests: a training step of each memory mode under torch.cuda.set_sync_debug_mode("error"), which
# raises on any host-device synchronization (the CPU test can only count them).
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
    tests/test_kernels_coupling_affine.py tests/test_model_kernels.py tests/test_dispatch.py 2>&1 \
    | tee "$out/tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== self-check of kernels='auto' (a fresh process; Triton's disk cache is warm from the tests above)"
timeout 60 "$py" - <<'PY' 2>&1 | tee "$out/verify.log"
import time
from revglow.ops.verify import verify_triton_kernels
for call in ("first", "second"):
    t = time.perf_counter()
    ok, reason = verify_triton_kernels("cuda")
    print(f"{call} call: {time.perf_counter() - t:.3f} s, ok={ok}: {reason}")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== no host-device synchronization in a training step (CUDA, kernels torch and auto)"
timeout 120 "$py" - <<'PY' 2>&1 | tee "$out/syncs.log"
import torch
from revglow import Glow, GlowConfig
x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
for kernels in ("torch", "auto"):
    for memory in ("reversible", "checkpoint", "autograd"):
        model = Glow(GlowConfig(levels=3, depth=8, hidden=128, memory=memory, kernels=kernels)).cuda()
        model.initialize(x)
        model(x).mean().backward()               # warm-up (and the kernels' self-check under auto)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x).mean().backward()
            result = "no synchronization"
        except RuntimeError as exc:
            result = f"SYNCHRONIZES: {str(exc).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"kernels={kernels} memory={memory}: {result}")
PY
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

# Last: the newest and least critical step. About 90 op cases at 0.1 s each plus warm-ups, and the flow-step and
# model-level cases at a fixed few rounds (benchmarks/test_ops.py); the timeout bounds it if compiles are slow.
echo "== micro-benchmarks (pytest-benchmark), saved under $out/micro"
timeout 120 "$py" -m pytest -q -p no:cacheprovider benchmarks/test_ops.py --bench-device cuda --benchmark-autosave \
    --benchmark-storage="$out/micro" --benchmark-group-by=group --benchmark-columns=min,median,max,iqr,rounds \
    --benchmark-max-time=0.1 2>&1 | tee "$out/micro.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== revglow profile on CUDA (64x64, L=3, K=16, width 256; the planner for an 80 GiB budget)"
timeout 120 "$py" -m revglow profile --device cuda --image-shape 3 64 64 --levels 3 --depth 16 --hidden 256 \
    --batch-sizes 8 16 --budget 80GiB --json 2>&1 | tee "$out/profile.jsonl" | tail -3

echo "== torch.compile against eager (CUDA; the first compiled step includes the compilation)"
timeout 180 "$py" benchmarks/compile_step.py --device cuda --kernels torch --batch-size 32 --rounds 10 \
    --results "$out/compile_step.jsonl" 2>&1 | tee "$out/compile.log" | tail -6
exit $status
