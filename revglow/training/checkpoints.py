"""Checkpoints: atomic writes, validated reads, RNG states as plain data, rotation of old copies.

A checkpoint is a plain dict that `torch.load(path, weights_only=True)` accepts: tensors, dicts,
lists, tuples, ints, floats, strings, bools and None only. It carries FORMAT_KEY = FORMAT_NAME and a
version so that a foreign file is recognised as such.

Writing is atomic (`save_checkpoint`, and `atomic_writer` for any file of a run): a temporary file in the
same folder is written, flushed and fsynced, then renamed over the target with `os.replace`, and the folder
is fsynced. A crash at any point leaves either the old file or the new one, never a torn one (and a
temporary file that `remove_stale_temp_files` clears at the start of the next run). The file gets the
mode the umask gives new files (0666 & ~umask), as one written with open() would.

Reading is verified (`load_checkpoint`): `torch.save` writes a zip container with a CRC-32 per member,
which `torch.load` never checks; every member is read and its CRC compared before the file is
unpickled, so a file with flipped or overwritten bytes is refused instead of loading garbage weights.
The format version, the step and the run id (when present) must be ones revglow writes.

Example:
    >>> import tempfile, torch, os
    >>> folder = tempfile.mkdtemp()
    >>> path = save_checkpoint({"step": 3, "model": {"w": torch.ones(2)}}, os.path.join(folder, "c.pt"))
    >>> load_checkpoint(path)["step"]
    3
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from revglow.errors import RevglowError

__all__ = [
    "FORMAT_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RUN_ID_KEY",
    "CheckpointError",
    "atomic_writer",
    "is_run_id",
    "save_checkpoint",
    "load_checkpoint",
    "link_or_copy_atomic",
    "step_checkpoint_path",
    "prune_step_checkpoints",
    "remove_stale_temp_files",
    "verify_checkpoint_file",
    "capture_rng_state",
    "restore_rng_state",
]

PathLike = Union[str, os.PathLike]

FORMAT_KEY = "format"
FORMAT_NAME = "revglow-checkpoint"
FORMAT_VERSION = 1
# The key of the run id (uuid4 hex, see revglow.training.run_folder) that a trainer's checkpoints carry.
RUN_ID_KEY = "run_id"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_STEP_FILE = re.compile(r"^checkpoint-(\d+)\.pt$")
# Temporary names of the atomic writers: `.NAME.XXXXXXXX.tmp` (atomic_writer), `.NAME.PID.tmp` (links), for the
# files a run writes this way: its checkpoints, metrics.jsonl and run.json.
_TEMP_FILE = re.compile(r"^\.(checkpoint(-\d+)?\.pt|metrics\.jsonl|run\.json)\..+\.tmp$")
_CRC_CHUNK = 1 << 22


class CheckpointError(RevglowError, ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a revglow checkpoint."""


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(target: Path, tmp_path: Path):
    """Run the body that writes `tmp_path`, then rename it over `target` and fsync the folder; on any failure
    remove the temporary file and leave `target` as it was."""
    try:
        yield
        os.replace(tmp_path, target)
    except BaseException:
        try:
            tmp_path.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(target.parent if str(target.parent) else Path("."))


def _create_temp_file(folder: Path, name: str) -> Tuple[Path, BinaryIO]:
    """A new file `.NAME.XXXXXXXX.tmp` in `folder`, open for binary writing.

    Created with mode 0666, which the kernel reduces by the umask, as open() does: tempfile's files are 0600
    whatever the umask, which left checkpoints unreadable to the group that the umask meant to share them with.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp_path = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp_path, flags, 0o666)
        except FileExistsError:
            continue
        return tmp_path, os.fdopen(fd, "wb")
    raise FileExistsError(f"{folder}: could not create a temporary file for {name} (100 names taken)")


@contextlib.contextmanager
def atomic_writer(path: PathLike) -> Iterator[BinaryIO]:
    """A binary handle whose contents replace `path` atomically when the block ends without an error.

    The data go to a temporary file beside `path`, which is fsynced and renamed over `path` (os.replace: a
    symbolic link at `path` is replaced itself, its target is never written), then the folder is fsynced. On
    any error the temporary file is removed and `path` is left as it was.

    Example:
        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "run.json")
        >>> with atomic_writer(target) as handle:
        ...     _ = handle.write(b"{}")
        >>> open(target).read()
        '{}'
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    tmp_path, handle = _create_temp_file(folder, path.name)
    with _replacing(path, tmp_path), handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(state: Dict, path: PathLike) -> Path:
    """Write `state` to `path` atomically (temporary file, fsync, os.replace, fsync of the folder), with the
    mode the umask gives new files.

    The FORMAT_KEY/version entries are added. On any failure the temporary file is removed and the
    previous file at `path`, if any, is left as it was.
    """
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint expects a dict; got {type(state).__name__}")
    payload = dict(state)
    payload[FORMAT_KEY] = FORMAT_NAME
    payload["format_version"] = FORMAT_VERSION
    with atomic_writer(path) as handle:
        torch.save(payload, handle)
    return Path(path)


def is_run_id(value: object) -> bool:
    """Whether `value` is a run id as revglow writes them: 32 lowercase hex digits (uuid4().hex).

        >>> is_run_id("0123456789abcdef0123456789abcdef"), is_run_id("../x"), is_run_id(None)
        (True, False, False)
    """
    return isinstance(value, str) and _RUN_ID.match(value) is not None


def link_or_copy_atomic(source: PathLike, target: PathLike) -> Path:
    """Make `target` a copy of `source` atomically: a hard link (no extra I/O) or, failing that, a copy."""
    source, target = Path(source), Path(target)
    tmp_path = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with _replacing(target, tmp_path):
        try:
            os.link(source, tmp_path)
        except OSError:
            shutil.copyfile(source, tmp_path)
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
    return target


def verify_checkpoint_file(path: PathLike) -> None:
    """Raise CheckpointError unless `path` is a zip container whose every member matches its stored CRC-32.

    torch.save writes such a container; torch.load reads it without checking the CRCs, so corruption that
    keeps the length (overwritten bytes in a tensor) would otherwise load as wrong weights.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    while member.read(_CRC_CHUNK):   # zipfile raises BadZipFile at the end on a CRC mismatch
                        pass
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path}: the checkpoint is corrupt ({exc}); it was not loaded. Use an earlier "
                              f"checkpoint-STEP.pt from the same folder") from exc
    except (OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint: truncated or corrupt, or not a PyTorch file "
                              f"({type(exc).__name__}: {exc})") from exc


def load_checkpoint(path: PathLike, map_location: Optional[Union[str, torch.device]] = "cpu",
                    required: Iterable[str] = ()) -> Dict:
    """Read a checkpoint written by `save_checkpoint` with torch.load(weights_only=True).

    Every member's CRC-32 is checked first (`verify_checkpoint_file`). Raises CheckpointError naming the
    file and the problem: missing, truncated/corrupt, holding more than plain data, not a revglow
    checkpoint, or lacking one of the `required` keys.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty")
    if zipfile.is_zipfile(path):
        verify_checkpoint_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            why = "it holds objects other than plain data (not loadable with weights_only=True)"
        else:
            why = "truncated or corrupt, or not a PyTorch file"
        raise CheckpointError(f"{path}: cannot read the checkpoint: {why} ({type(exc).__name__}: {text})") from exc
    if not isinstance(state, dict) or state.get(FORMAT_KEY) != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a revglow checkpoint (a PyTorch file without {FORMAT_KEY}={FORMAT_NAME!r})")
    _check_header(path, state)
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def _check_header(path: Path, state: Dict) -> None:
    """Refuse a format version, step or run id that revglow never writes (a crafted or damaged file)."""
    version = state.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:       # type(), not isinstance: True is no version
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this revglow "
                              f"understands ({FORMAT_VERSION})")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not one revglow writes (an int "
                              f"from 1 to {FORMAT_VERSION})")
    step = state.get("step", 0)
    if type(step) is not int or step < 0:
        raise CheckpointError(f"{path}: the checkpoint's step {step!r} is not a count of steps (an int >= 0)")
    run_id = state.get(RUN_ID_KEY)
    if run_id is not None and not is_run_id(run_id):
        raise CheckpointError(f"{path}: the checkpoint's {RUN_ID_KEY} {str(run_id)[:40]!r} is not a run id "
                              f"(32 lowercase hex digits)")


def step_checkpoint_path(folder: PathLike, step: int) -> Path:
    """folder/checkpoint-STEP.pt (STEP zero-padded to 8 digits, so names sort by step)."""
    return Path(folder) / f"checkpoint-{int(step):08d}.pt"


def prune_step_checkpoints(folder: PathLike, keep: int) -> List[Path]:
    """Delete all but the `keep` newest checkpoint-STEP.pt files in `folder`; returns the deleted paths."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0; got {keep}")
    found = []
    for entry in Path(folder).iterdir():
        match = _STEP_FILE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    found.sort()
    doomed = [p for _, p in found[: max(0, len(found) - keep)]]
    for path in doomed:
        path.unlink()
    return doomed


def remove_stale_temp_files(folder: PathLike) -> List[Path]:
    """Delete temporary files that killed checkpoint writes left in `folder`; returns the deleted paths.

    Call it only when no other process writes checkpoints into `folder` (at the start of a run).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if _TEMP_FILE.match(entry.name) and entry.is_file():
            entry.unlink()
            removed.append(entry)
    return removed


# ----------------------------------------------------------------------------------------------- RNG

def capture_rng_state(generators: Optional[Dict[str, torch.Generator]] = None) -> Dict:
    """The torch (CPU and every CUDA device), numpy and python RNG states, as weights_only-safe data; with
    `generators`, the states of those torch.Generators too (under "generators", by name)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    if generators:
        state["generators"] = {name: generator.get_state() for name, generator in generators.items()}
    return state


def restore_rng_state(state: Dict, generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    """Set the RNGs back to a state from `capture_rng_state` (CUDA ones only where present on both sides), and
    each of `generators` to the state saved under its name (one the checkpoint lacks, from before it was
    saved, keeps its state)."""
    try:
        torch.set_rng_state(state["torch"].cpu())
        numpy_state = state["numpy"]
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                             numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        python_state = state["python"]
        random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the checkpoint's RNG state is malformed ({type(exc).__name__}: {exc})") from exc
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for device in range(count):
            torch.cuda.set_rng_state(cuda_states[device].cpu(), device)
    saved_generators = state.get("generators") or {}
    for name, generator in (generators or {}).items():
        if name in saved_generators:
            try:
                generator.set_state(saved_generators[name].cpu())
            except (TypeError, RuntimeError, AttributeError) as exc:
                raise CheckpointError(f"the checkpoint's state of the {name!r} generator is malformed "
                                      f"({type(exc).__name__}: {exc})") from exc
