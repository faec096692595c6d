# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each installs what it needs (into the active environment if it has torch, else into ./.venv).
.PHONY: demo test bench bench-ops env clean

PY = $(shell bash scripts/ensure_env.sh)

# The main job: train a small reversible Glow on scikit-learn's bundled digits (the digits preset of
# revglow/training/presets.py, about three minutes on 2 CPU cores), print its test bits/dim beside a per-pixel baseline,
# then draw a grid of samples.
# One thread per process: the 8x8 model's ops are too small to share out, and when anything else wants the cores,
# OpenMP's spinning threads wait for each other. `revglow train --preset digits --max-steps 100` on a shared 2-core
# machine (load 4 to 7), interleaved, 3 runs each: --threads 1 took 22, 29 and 28 s; --threads 2 took 163, 254 and
# 354 s.
demo:
	@py="$(PY)"; set -e; \
	"$$py" -m revglow train --preset digits --out runs/demo --overwrite --threads 1; \
	"$$py" -m revglow sample --checkpoint runs/demo/checkpoint.pt --n 64 --temperature 0.7 --out runs/demo/samples.png \
	    --threads 1

# One pytest worker per core (pytest-xdist): each test runs single-threaded (tests/conftest.py), so one process
# would leave the other cores idle.
test:
	@py="$(PY)"; "$$py" -m pytest -q -n auto --dist worksteal

# The CPU benchmarks: memory against depth (resident set), step time of the memory modes, and the sweeps with
# their plots (benchmarks/sweeps.py all: memory against K, resolution and batch, step time per mode, sampling
# latency at 256x256). Each runs even if one before it missed a target; the exit status says whether all met theirs.
bench:
	@py="$(PY)"; status=0; \
	"$$py" benchmarks/memory_vs_depth.py || status=1; \
	"$$py" benchmarks/step_time.py || status=1; \
	"$$py" benchmarks/sweeps.py all || status=1; \
	exit $$status

# Micro-benchmarks (pytest-benchmark) of each fused op, a flow step and a Glow training step, on CUDA when
# available, else the CPU. Each run is saved under benchmarks/results/micro/DEVICE/ (machine info included) for
# `pytest-benchmark compare`. BENCH_ARGS adds pytest options: BENCH_ARGS='-m "not glow256"' leaves out the
# 256x256 cases (about 4 minutes on 2 CPU cores), BENCH_ARGS='-k actnorm' keeps one op.
bench-ops:
	@py="$(PY)"; set -e; \
	dev=$$("$$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"); \
	"$$py" -m pytest benchmarks/test_ops.py -p no:cacheprovider --bench-device $$dev --benchmark-autosave \
	    --benchmark-storage=benchmarks/results/micro/$$dev --benchmark-group-by=group \
	    --benchmark-columns=min,median,max,iqr,rounds $(BENCH_ARGS)

env:
	@echo "$(PY)"

clean:
	rm -rf runs .pytest_cache build *.egg-info
