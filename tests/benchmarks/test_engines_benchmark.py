"""benchmarks/engines.py: every installed engine's gradients equal plain autograd's (float64) on both problems (a
conv stack, a transformer stack split on features), and the script runs end to end on tiny problems (its speed and
memory numbers are for the full-size run). Peers that are not installed (memcnn, revlib) are skipped."""
import json
import sys

import pytest

from test_benchmarks import _load

pytestmark = pytest.mark.long(5)


@pytest.fixture(scope="module")
def engines():
    return _load("engines")


@pytest.mark.parametrize("case", ["conv", "transformer"])
def test_every_engine_matches_autograd(engines, case):
    present = [e for e in engines.ENGINES if engines.available(e) is None]
    assert {"autograd", "revglow", "revglow-generic", "revglow-generic-reuse", "revglow-checkpoint"} <= set(present)
    errors = engines.check_gradients(present, case=case)
    assert all(err < 1e-12 for err in errors.values()), errors


def test_the_transformer_problem_is_a_stack_of_attention_and_mlp_split_on_features(engines):
    problem = engines.Problem("transformer", batch=2, channels=8, size=5, hidden=16, heads=2)
    assert problem.shape() == (2, 5, 8) and problem.split_dim == -1
    f, g = problem.networks(1)
    assert isinstance(f, engines.Attention) and f.qkv.in_features == 4 and g[1].out_features == 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory measurement needs /proc")
def test_engines_script_runs(engines, tmp_path, capsys):
    # The transformer case only: the conv case runs through the same code (run_case), and every engine a case
    # measures costs a fresh process (about 2 s of the suite).
    results = tmp_path / "engines.jsonl"
    assert engines.main(["--cases", "transformer", "--transformer-depths", "2", "--engines", "autograd", "revglow",
                         "--tokens", "8", "--width", "8", "--heads", "2", "--transformer-batch", "2", "--rounds", "1",
                         "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["case"], r["engine"]) for r in rows) == [("transformer", "autograd"), ("transformer", "revglow")]
    assert all(r["activation_mib"] >= 0 and r["step_s"] > 0 and r["grad_rel_err"] < 1e-12 for r in rows)
    assert all(r["channels"] == 16 and r["size"] == 8 and r["depth"] == 2 for r in rows)
    out = capsys.readouterr().out
    assert "parameter gradients against plain autograd (transformer" in out
    assert "transformer: D coupling blocks on tokens [2, 8, 16]" in out
