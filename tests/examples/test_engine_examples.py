"""The engine's own examples (a reversible transformer, a RevNet) train on the digits at a small size: they print a
test accuracy well above chance (10 classes) and the activation memory of each memory mode, reversible below
autograd. They run in this process, through their main(argv), as `python examples/<name>.py ...` would run them,
without a second interpreter and torch import."""
import importlib.util
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = {
    "reversible_transformer": ["--steps", "80", "--depth", "2", "--width", "32", "--lr", "5e-3"],
    "revnet": ["--steps", "40", "--channels", "8", "--blocks", "1", "--lr", "5e-3"],
}


def _run(name, argv, capsys, monkeypatch) -> str:
    monkeypatch.syspath_prepend(str(EXAMPLES))   # as `python examples/<name>.py` has it: digits_classifier beside it
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.long(4)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_engine_example_learns_and_reports_memory_in_each_mode(name, capsys, monkeypatch):
    out = _run(name, SMALL[name], capsys, monkeypatch)
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", out).group(1))
    assert accuracy > 0.3, out   # chance is 0.1
    memory = dict(re.findall(r"activation memory, memory='(\w+)': (\d+\.\d+) MiB", out))
    assert sorted(memory) == ["autograd", "checkpoint", "reversible"], out
    assert 0 < float(memory["reversible"]) < float(memory["autograd"]), out
