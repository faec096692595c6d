"""The README and docs/ run as written: their Python blocks run, their links, paths, module names and commands exist.

- Every ```python block of a page runs, the page's blocks in order in one namespace (as a reader pastes them), in a
  temporary folder; the suite's single torch thread keeps them fast.
- Every relative link or image (Markdown or HTML) points to an existing file, and its #anchor to a heading there.
- Every `revglow.x.y` name imports (the longest importable module, then attributes), and every repository path a page
  cites (revglow/..., tests/..., benchmarks/..., ...) exists.
- Every `revglow` command parses with the real command-line parser: in shell blocks in full (subcommand, flags and
  values), in inline code the subcommand and flag names (prose puts placeholders where the values go). Scripts of
  benchmarks/ and examples/ exist and define the flags given to them; `make` targets exist in the Makefile.
"""
import argparse
import importlib
import importlib.util
import pkgutil
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# Seconds of CPU the pages whose Python blocks take more than about 1 s need (the first page a process runs also
# pays about 1 s of first calls: importing Triton, the kernels' dispatch); the others are not long tests.
PAGE_SECONDS = {"README.md": 3, "memory.md": 2}

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|\b(?:src|href)=\"([^\"]+)\"")
MODULE_NAME = re.compile(r"(?<![\w.])revglow(?:\.\w+)+")
REPO_PATH = re.compile(r"(?<![\w./-])((?:revglow|kernels|tests|benchmarks|examples|scripts|docs|\.ci)/[\w./-]*)")
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# Outputs the docs name that a run writes (a GPU run has not written kernels.jsonl yet).
NOT_YET_WRITTEN = {"benchmarks/results/kernels.jsonl"}


def _page_id(page: Path) -> str:
    return page.name


def _without_code(text: str) -> str:
    """The prose of a page: fenced blocks and inline code removed."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _python_blocks(text: str):
    return [(text[:m.start()].count("\n") + 2, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == "python"]


def _pages_with_python():
    pages = [p for p in PAGES if _python_blocks(p.read_text())]
    return [pytest.param(p, id=_page_id(p), marks=[pytest.mark.long(PAGE_SECONDS[p.name])] if p.name in PAGE_SECONDS
                         else []) for p in pages]


@pytest.mark.parametrize("page", _pages_with_python())
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # a block that writes files writes them here
    namespace = {"__name__": f"docs_{page.stem}"}
    for line, code in _python_blocks(page.read_text()):
        exec(compile(code, f"{page.relative_to(ROOT)}, block at line {line}", "exec"), namespace)


# ------------------------------------------------------------------------------------------ links and headings
def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: formatting dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set:
    seen, anchors = {}, set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_slug_follows_github():
    assert _slug("Memory: what fits, in which mode (`revglow profile`)") == \
        "memory-what-fits-in-which-mode-revglow-profile"
    assert _slug("n-bit images and bits/dim") == "n-bit-images-and-bitsdim"
    assert _slug("The reference implementation's network") == "the-reference-implementations-network"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_point_to_files_and_headings(page):
    broken = []
    for match in LINK.finditer(_without_code(page.read_text())):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):     # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.name}:\n" + "\n".join(broken)


# ------------------------------------------------------------------------------------ module names and paths
def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:   # a parent is not a package
            found = False
        if found:
            thing = importlib.import_module(module_name)
            for attribute in parts[cut:]:
                if not hasattr(thing, attribute):
                    return False
                thing = getattr(thing, attribute)
            return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_revglow_names_exist(page):
    missing = [n for n in sorted(set(MODULE_NAME.findall(page.read_text()))) if not _resolves(n)]
    assert not missing, f"{page.name} names modules or attributes that do not exist: {missing}"


def _cited_paths(text: str):
    for match in REPO_PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if path.startswith("benchmarks/results/"):
            # outputs: only the rows and plots a page names outright (no NAME / DEVICE placeholders) must exist
            if not re.search(r"\.(png|jsonl)$", path) or re.search(r"[A-Z]", path) or path in NOT_YET_WRITTEN:
                continue
        yield path


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_cited_repository_paths_exist(page):
    missing = sorted({p for p in _cited_paths(page.read_text()) if not (ROOT / p).exists()})
    assert not missing, f"{page.name} cites paths that do not exist: {missing}"


# ---------------------------------------------------------------------------------------------------- commands
def _build_parser() -> argparse.ArgumentParser:
    """revglow's real parser, wherever the command line keeps build_parser (a module revglow.cli, or a package)."""
    cli = importlib.import_module("revglow.cli")
    if hasattr(cli, "build_parser"):
        return cli.build_parser()
    for info in pkgutil.iter_modules(getattr(cli, "__path__", []), "revglow.cli."):
        module = importlib.import_module(info.name)
        if hasattr(module, "build_parser"):
            return module.build_parser()
    raise AssertionError("no build_parser in revglow.cli")


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def _join_negative_values(args):
    """As the command line does: `--alphas -1,0,1` is one value, not a flag."""
    out = []
    for arg in args:
        if out and out[-1] == "--alphas" and arg[:1] == "-" and (arg[1:2].isdigit() or arg[1:2] == "."):
            out[-1] = f"--alphas={arg}"
        else:
            out.append(arg)
    return out


def _commands(line: str):
    """The simple commands of a shell line (split at && || ; |), environment assignments dropped."""
    command = []
    for token in shlex.split(line, comments=True) + [";"]:
        if token in ("&&", "||", ";", "|"):
            while command and re.match(r"^\w+=", command[0]):
                command.pop(0)
            if command:
                yield command
            command = []
        else:
            command.append(token)


def _revglow_args(command):
    if command[0] == "revglow":
        return command[1:]
    for i, token in enumerate(command[:-1]):
        if token == "-m" and command[i + 1] == "revglow":
            return command[i + 2:]
    return None


def _shell_lines(text: str):
    """(line, full): commands of shell blocks (full: values are real), `$ ` lines of output blocks, and inline
    code that starts with a command (names only: prose puts placeholders where the values go)."""
    for match in FENCE.finditer(text):
        language, body = match.group(1), re.sub(r"\\\n\s*", " ", match.group(2))
        if language == "python":
            continue
        for line in body.splitlines():
            if language in SHELL_LANGUAGES:
                yield line.removeprefix("$ "), True
            elif line.startswith("$ "):
                yield line[2:], True
    for match in INLINE_CODE.finditer(FENCE.sub("", text)):
        code = " ".join(match.group(2).split())
        if re.match(r"(revglow|python|torchrun|make|bash) ", code):
            yield code, False


def _check_revglow(args, full: bool, parser, subparsers):
    if not args and not full:     # prose naming the program: `python -m revglow` works too
        return None
    if not args or args[0] not in subparsers:
        return f"not a revglow command: {args[:1]}"
    if full:
        try:
            parser.parse_args(_join_negative_values(args))
        except SystemExit as exit_:
            return None if exit_.code == 0 else f"does not parse: revglow {' '.join(args)}"
        return None
    known = subparsers[args[0]]._option_string_actions
    unknown = [a.split("=")[0] for a in args[1:] if a.startswith("--") and a.split("=")[0] not in known]
    return f"unknown flags of revglow {args[0]}: {unknown}" if unknown else None


def _check_script(command):
    """A benchmarks/ or examples/ script run by the command exists and defines the flags given to it."""
    scripts = [t for t in command if re.match(r"(benchmarks|examples|scripts)/.*\.(py|sh)$", t)]
    if not scripts:
        return None
    script = ROOT / scripts[0]
    if not script.exists():
        return f"no script {scripts[0]}"
    if script.suffix != ".py":
        return None
    sources = script.read_text() + (ROOT / "benchmarks/common.py").read_text()
    sources += (ROOT / "benchmarks/paper/runs.py").read_text() if "paper/" in scripts[0] else ""
    flags = [t.split("=")[0] for t in command[command.index(scripts[0]) + 1:] if t.startswith("--")]
    unknown = [f for f in flags if f'"{f}"' not in sources and f != "--help"]
    return f"{scripts[0]} has no flags {unknown}" if unknown else None


def _check_make(command):
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    wanted = [t for t in command[1:] if "=" not in t and not t.startswith("-")]
    return f"no make target {wanted}" if not set(wanted) <= targets else None


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_commands_parse(page):
    parser = _build_parser()
    subparsers = _subparsers(parser)
    problems = []
    for line, full in _shell_lines(page.read_text()):
        for command in _commands(line):
            args = _revglow_args(command)
            if args is not None:
                problem = _check_revglow(args, full, parser, subparsers)
            elif command[0] == "make":
                problem = _check_make(command)
            else:
                problem = _check_script(command)
            if problem:
                problems.append(f"{line!r}: {problem}")
    assert not problems, f"{page.name}:\n" + "\n".join(problems)


def test_the_command_check_sees_a_wrong_flag():
    parser = _build_parser()
    subparsers = _subparsers(parser)
    assert _check_revglow(["train", "--no-such-flag", "1"], True, parser, subparsers)
    assert _check_revglow(["train", "--no-such-flag"], False, parser, subparsers)
    assert _check_revglow(["trian"], False, parser, subparsers)
    assert _check_revglow(["manipulate", "--checkpoint", "c.pt", "--labels", "a.csv", "--attribute", "x", "--image",
                           "x.png", "--alphas", "-1,0,1", "--out", "o.png"], True, parser, subparsers) is None
    assert _check_script(["python", "benchmarks/sweeps.py", "depth", "--no-such-flag"])
