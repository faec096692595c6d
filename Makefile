# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each installs what it needs (into the active environment if it has torch, else into ./.venv).
.PHONY: demo test test-fast bench env clean

PY = $(shell bash scripts/ensure_env.sh)

demo:
	@py="$(PY)"; set -e; \
	"$$py" examples/train_digits.py --out runs/demo

test:
	@py="$(PY)"; "$$py" -m pytest -q tests

bench:
	@py="$(PY)"; set -e; \
	"$$py" benchmarks/memory_vs_depth.py; \
	"$$py" benchmarks/step_time.py

env:
	@echo "$(PY)"

clean:
	rm -rf runs .pytest_cache build *.egg-info
