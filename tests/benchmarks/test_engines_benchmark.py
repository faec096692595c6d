"""benchmarks/engines.py: every installed engine's gradients equal plain autograd's (float64), and the script
runs end to end on a tiny problem (its speed and memory numbers are for the full-size run)."""
import json
import sys

import pytest

from test_benchmarks import _load

pytestmark = pytest.mark.long(3)


@pytest.fixture(scope="module")
def engines():
    return _load("engines")


def test_every_engine_matches_autograd(engines):
    present = [e for e in engines.ENGINES if engines.available(e) is None]
    assert {"autograd", "revglow", "revglow-generic", "revglow-generic-reuse", "revglow-checkpoint"} <= set(present)
    errors = engines.check_gradients(present)
    assert all(err < 1e-12 for err in errors.values()), errors


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory measurement needs /proc")
def test_engines_script_runs(engines, tmp_path, capsys):
    results = tmp_path / "engines.jsonl"
    assert engines.main(["--depths", "2", "--engines", "autograd", "revglow", "--image-size", "8", "--hidden", "8",
                         "--batch-size", "2", "--rounds", "1", "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["engine"] for r in rows) == ["autograd", "revglow"]
    assert all(r["activation_mib"] >= 0 and r["step_s"] > 0 and r["grad_rel_err"] < 1e-12 for r in rows)
    assert "parameter gradients against plain autograd" in capsys.readouterr().out
