#!/usr/bin/env bash
# Make sure a Python with torch and revglow's test/demo dependencies exists; print its path.
# Uses the active environment when it already has torch; otherwise creates .venv here and installs torch
# into it (torch==2.13.0, the CPU build, on a machine without a GPU; the default build where nvidia-smi sees one).
# The common case (all there already) costs one import of revglow (and so torch); the other dependencies are
# only looked up, not imported (scikit-learn brings scipy: most of a second).
set -euo pipefail
cd "$(dirname "$0")/.."

ready() {   # revglow imports from this checkout, and every test/demo dependency is installed
  "$1" - >/dev/null 2>&1 <<PYEOF
import importlib.util, os, revglow, revglow.kernels
missing = [m for m in ("sklearn", "PIL", "tqdm", "pytest", "xdist", "triton", "matplotlib")
           if importlib.util.find_spec(m) is None]
assert not missing, missing
assert os.path.realpath(os.path.dirname(revglow.__file__)) == os.path.realpath("revglow")
PYEOF
}

if python3 -c "import torch" >/dev/null 2>&1; then
  py=$(command -v python3)
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv >&2
  fi
  py=$PWD/.venv/bin/python
fi
if ! ready "$py"; then
  if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "installing torch into $(dirname "$(dirname "$py")") ..." >&2
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "$py" -m pip install -q torch >&2
    else
      "$py" -m pip install -q torch==2.13.0 >&2
    fi
  fi
  echo "installing revglow and its test dependencies ..." >&2
  "$py" -m pip install -q -e ".[test]" >&2
fi
echo "$py"
