# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each installs what it needs (into the active environment if it has torch, else into ./.venv).
.PHONY: demo test test-fast bench env clean

PY = $(shell bash scripts/ensure_env.sh)

# The main job: train a small reversible Glow on scikit-learn's bundled digits (~1 minute on 2 CPU cores),
# print its test bits/dim beside a per-pixel baseline, then draw a grid of samples.
demo:
	@py="$(PY)"; set -e; \
	"$$py" -m revglow train --out runs/demo --lr 3e-3 --max-steps 1200; \
	"$$py" -m revglow sample --checkpoint runs/demo/checkpoint.pt --n 64 --temperature 0.7 --out runs/demo/samples.png

test:
	@py="$(PY)"; "$$py" -m pytest -q

bench:
	@py="$(PY)"; set -e; \
	"$$py" benchmarks/memory_vs_depth.py; \
	"$$py" benchmarks/step_time.py

env:
	@echo "$(PY)"

clean:
	rm -rf runs .pytest_cache build *.egg-info
