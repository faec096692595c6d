"""The conditional-flow example (a toy super-resolution flow on digits) runs end to end (tiny settings)."""
import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_conditional_digits.py"


def test_conditional_digits_example_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_conditional_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--steps", "2", "--batch-size", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test bits/dim, conditional:" in out and "test bits/dim, unconditional:" in out
    assert (tmp_path / "super_resolution.png").stat().st_size > 0
