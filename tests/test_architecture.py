"""The package layout is the architecture: each package imports only the packages below it.

    cli -> training, memory -> glow -> engine -> ops -> kernels

The engine imports nothing from revglow but itself and revglow.ops, so any model can use it; Glow knows nothing of
training; ops know nothing of the layers above them. The check reads every module's import statements (top-level
and inside functions), so an import that only runs late still counts.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "revglow"

# What each package may import from revglow, besides itself. Top-level helper modules (errors, config_fields,
# _checkout_kernels) belong to no layer above the engine and are open to glow and everything above it.
ALLOWED = {
    "engine": {"ops"},
    "ops": {"kernels"},
    "glow": {"engine", "ops", "kernels", "errors", "config_fields"},
    "training": {"glow", "engine", "ops", "kernels", "errors", "config_fields"},
    "memory": {"glow", "engine", "ops", "kernels", "errors", "config_fields"},
}


def _revglow_imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: a relative import; revglow imports by absolute names")
            names = [node.module or ""]
            if node.module == "revglow":
                names = [f"revglow.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "revglow" and len(parts) > 1:
                yield node.lineno, parts[1]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package):
    wrong = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for line, target in _revglow_imports(path):
            if target != package and target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports revglow.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_way_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from revglow.training.trainer import Trainer\n    import revglow.glow.model\n")
    assert [target for _, target in _revglow_imports(bad)] == ["training", "glow"]
