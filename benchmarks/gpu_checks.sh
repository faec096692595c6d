#!/usr/bin/env bash
# Every check that needs a GPU, prepared for a short device lease. Each step has a timeout, and the steps run in
# order of importance, so a lease that ends early still returns the first. Two sections:
#
#   bash benchmarks/gpu_checks.sh memory   # memory and speed, at most 8 minutes in all (a deadline caps the timeouts):
#       a. benchmarks/kernels.py --quick: per-op Triton vs eager, GB/s, the 256x256 training step;
#       b. revglow profile at 256x256 (CelebA-HQ: L=6, K=32, width 512, additive, 5 bits), batch 2 and 4, every
#          memory mode, the planner for 24 GiB and --verify: one real step at the planned batch on the device;
#       c. benchmarks/headline_256.py on the device: the tracker's count per mode (it should equal the CPU's) and
#          one real reversible step (time, peak allocated);
#       d. benchmarks/sweeps.py time: step time of reversible / checkpoint / segment / autograd, ratios;
#       e. benchmarks/step_time.py with --memory-format contiguous, then channels_last (what GlowConfig's "auto"
#          picks on CUDA, unmeasured until this runs): each mode's step time;
#       f. benchmarks/sweeps.py sample: sampling latency at batch 1, 64 to 256 pixels.
#   bash benchmarks/gpu_checks.sh checks   # the older checks (longer; each step's timeout bounds it):
#       1. the kernel, whole-model kernel and dispatch tests on CUDA (the same tests CI runs under the Triton
#          interpreter), and the time of kernels="auto"'s self-check;
#       2. a training step of each memory mode under torch.cuda.set_sync_debug_mode("error"), which raises on any
#          host-device synchronization (the CPU test can only count them);
#       3. benchmarks/kernels.py in full; 4. step time and activation memory of the memory modes, kernels triton
#          vs torch; 5. the pytest-benchmark micro-benchmarks (benchmarks/test_ops.py, as `make bench-ops`), saved
#          under $OUT/micro/ in the format `pytest-benchmark compare` reads (copy them to
#          benchmarks/results/micro/cuda/); 6. torch.compile against eager (benchmarks/compile_step.py).
#   bash benchmarks/gpu_checks.sh          # both: checks, then memory (without its quick kernel benchmark)
#
# Logs, JSON rows and plots go to $OUT (the device tool's output folder) or benchmarks/results/gpu/.
# Without a CUDA device it stops at once, with a message, and exit status 2.
set -uo pipefail
cd "$(dirname "$0")/.."
section=${1:-all}
case "$section" in
  all|checks|memory) ;;
  *) echo "usage: bash benchmarks/gpu_checks.sh [memory|checks|all]" >&2; exit 2 ;;
esac
out=${OUT:-benchmarks/results/gpu}
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_checks.sh: needs a CUDA GPU, and torch.cuda.is_available() is False here (or $py has no torch):" \
       "nothing was run. On the CPU, run make bench." >&2
  exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
# kernels/ is installed as revglow.kernels: an editable install, offline (no dependencies fetched)
"$py" -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }

run_checks() {
  echo "== kernel tests on CUDA"
  REVGLOW_TEST_DEVICE=cuda timeout 240 "$py" -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_actnorm_conv1x1.py \
      tests/kernels/test_kernels_coupling_affine.py tests/glow/test_model_kernels.py tests/ops/test_dispatch.py 2>&1 \
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

  echo "== torch.compile against eager (CUDA; the first compiled step includes the compilation)"
  timeout 180 "$py" benchmarks/compile_step.py --device cuda --kernels torch --batch-size 32 --rounds 10 \
      --results "$out/compile_step.jsonl" 2>&1 | tee "$out/compile.log" | tail -6
}

# The memory section: a deadline caps the whole section at 8 minutes; `cap N` is N seconds or what is
# left before it, and a step with less than 15 s left is skipped (and says so).
run_memory() {
  local deadline=$((SECONDS + 470)) quick_kernels=$1
  cap() { local left=$((deadline - SECONDS)); [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }
  step() {   # step SECONDS NAME COMMAND...: run under timeout, log to $out/NAME.log, show the tail
    local limit name=$2; limit=$(cap "$1"); shift 2
    if [ "$limit" -lt 15 ]; then echo "   skipped: the 8-minute deadline is near"; status=1; return; fi
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    [ "$rc" -eq 0 ] || { echo "   $name: exit status $rc (124: timed out after $limit s)"; status=1; }
  }
  local glow256=(--image-shape 3 256 256 --levels 6 --depth 32 --hidden 512 --coupling additive --n-bits 5)
  if [ "$quick_kernels" = yes ]; then
    echo "== kernel benchmark (--quick)"
    step 100 kernels_quick "$py" benchmarks/kernels.py --quick --results "$out/kernels.jsonl"
  fi
  echo "== revglow profile at 256x256 (CelebA-HQ), every memory mode, planner for 24 GiB verified on the device"
  step 150 profile_256 "$py" -m revglow profile --device cuda "${glow256[@]}" --batch-sizes 2 4 --rounds 3 \
      --budget 24GiB --verify --top 3
  echo "== benchmarks/headline_256.py on the device (the tracker's count per mode; one real reversible step)"
  step 90 headline_256 "$py" benchmarks/headline_256.py --device cuda --results "$out/headline_256.jsonl"
  echo "== step time per mode (CUDA): reversible, checkpoint, segment (checkpoint_sequential), autograd"
  step 60 sweep_time "$py" benchmarks/sweeps.py time --device cuda --image-size 64 --values 8 32 --hidden 256 \
      --batch-size 32 --rounds 10 --results "$out/sweep_time.jsonl" --plot "$out/sweep_time.png"
  echo "== memory_format on CUDA: step time of each mode, channels_last against contiguous (auto picks channels_last)"
  for format in contiguous channels_last; do
    step 30 "step_time_$format" "$py" benchmarks/step_time.py --device cuda --image-size 64 --hidden 256 \
        --batch-size 32 --rounds 10 --memory-format "$format" --results "$out/step_time.jsonl"
  done
  echo "== sampling latency at batch 1 (CUDA), CelebA-HQ architecture at 64, 128 and 256 pixels"
  step 45 sweep_sample "$py" benchmarks/sweeps.py sample --device cuda --rounds 5 \
      --results "$out/sweep_sample.jsonl" --plot "$out/sweep_sample.png"
  echo "memory section: $((SECONDS - deadline + 470)) s"
}

status=0
case "$section" in
  memory) run_memory yes ;;
  checks) run_checks ;;
  all) run_checks; run_memory no ;;
esac
exit $status
