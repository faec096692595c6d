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
    "cli": {"training", "memory", "glow", "engine", "ops", "kernels", "errors", "config_fields"},
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


# ---------------------------------------------------------------------------------------------------- unit sizes
# Units a newcomer reads once: no module of revglow/ or kernels/ over 450 lines, no class over 200, no function
# (method included) over 70. Tests and benchmarks are exempt. Measured with ast: a module is its number of lines, a
# class or function runs from its `class`/`def` line to its last line (end_lineno - lineno + 1).
SIZE_LIMITS = {"module": 450, "class": 200, "function": 70}
SIZED_ROOTS = (PACKAGE, PACKAGE.parent / "kernels")


def _oversized_units(path: pathlib.Path):
    source = path.read_text()
    lines = len(source.splitlines())
    if lines > SIZE_LIMITS["module"]:
        yield f"module of {lines} lines"
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.ClassDef):
            kind = "class"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kind = "function"
        else:
            continue
        size = node.end_lineno - node.lineno + 1
        if size > SIZE_LIMITS[kind]:
            yield f"{kind} {node.name} (line {node.lineno}) of {size} lines"


def test_modules_classes_and_functions_stay_within_their_limits():
    wrong = [f"{path.relative_to(PACKAGE.parent)}: {unit}"
             for root in SIZED_ROOTS for path in sorted(root.rglob("*.py")) for unit in _oversized_units(path)]
    assert not wrong, f"over the limits {SIZE_LIMITS}:\n" + "\n".join(wrong)


def test_the_size_check_sees_each_kind_of_oversized_unit(tmp_path):
    at_the_limits = tmp_path / "at_the_limits.py"      # a class of 200 lines, a function of 70, 450 lines in all
    at_the_limits.write_text("class Small:\n" + "    x = 1\n" * 199 + "\n\ndef f():\n" + "    pass\n" * 69
                             + "x = 1\n" * 178)
    assert list(_oversized_units(at_the_limits)) == []
    over = tmp_path / "over.py"                         # one line more of each
    over.write_text("class Big:\n" + "    x = 1\n" * 200 + "\n\ndef f():\n" + "    pass\n" * 70 + "x = 1\n" * 177)
    assert list(_oversized_units(over)) == ["module of 451 lines", "class Big (line 1) of 201 lines",
                                            "function f (line 204) of 71 lines"]
