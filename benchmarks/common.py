"""What every benchmark script shares: the machine/version record and appending rows to benchmarks/results/."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from typing import Dict, Iterable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str = "cpu") -> Dict[str, object]:
    """Machine, date and versions, recorded beside every measurement."""
    env: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def append_rows(path: str, rows: Iterable[dict]) -> str:
    """Append one JSON line per row to `path` (a bare file name goes to benchmarks/results/)."""
    if os.path.dirname(path) == "":
        path = os.path.join(RESULTS, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def timed_training_step(model, x, device: torch.device) -> float:
    """Seconds of one forward + backward of `model(x).mean()`, gradients cleared first, the device drained on
    both sides (on CUDA) so that the time is the step's own."""
    for p in model.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    model(x).mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def add_problem_flags(parser, results: str, depth: int = 8, hidden: int = 128, batch_size: int = 16,
                      rounds: int = 20, device: str = "cpu") -> None:
    """The flags every Glow step benchmark shares: the model and batch measured, rounds, device, results file."""
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--depth", type=int, default=depth)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--device", default=device)
    parser.add_argument("--results", default=results,
                        help="JSON-lines file to append to (a bare name goes to benchmarks/results/)")


def random_images(args, device: torch.device) -> torch.Tensor:
    """A uint8 batch [batch_size, 3, image_size, image_size] from the global (seeded) generator."""
    return torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8,
                         device=device)
