"""Measuring the activation memory of one training step, for real.

The measurement runs in a fresh subprocess: after a warm-up step (so parameters, gradients and optimizer-free
buffers exist), the device's own peak during one more forward + backward, above what was held just before it, is
the step's activation memory, read by the meters of revglow.memory.device_meters: on the CPU the peak resident set
(`ResidentSet`: the kernel's peak-resident-set counter reset through /proc/self/clear_refs, glibc's mmap threshold
pinned low so freed tensors go back to the kernel at once and the resident size tracks live memory), on CUDA
torch.cuda.max_memory_allocated (`CudaPeak`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List, Optional, Sequence

from revglow.glow.config import GlowConfig

__all__ = ["training_step_memory_mib", "training_steps_memory_mib"]

_CHILD = r"""
import gc, json, sys, torch
from revglow import Glow, GlowConfig
from revglow.memory.device_meters import device_peak

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
device = torch.device(args["device"])
results = []
for config in args["configs"]:   # one after another: with the mmap threshold low from the start, the heap never
    torch.manual_seed(0)         # holds a freed large block, so each measurement starts as clean as the first
    model = Glow(GlowConfig.from_dict(config)).to(device)
    c, h, w = model.config.image_shape
    x = torch.randint(0, 256, (args["batch"], c, h, w), dtype=torch.uint8, device=device)
    model.initialize(x)
    model(x).mean().backward()          # warm-up: allocates .grad for every parameter
    for p in model.parameters():
        p.grad.zero_()
    meter = device_peak(device)         # CUDA's peak allocation, or the CPU's peak resident set
    if meter is None:
        raise RuntimeError("no memory meter for " + str(device))
    with meter:
        model(x).mean().backward()
    before, activation = meter.before / 2**20, meter.peak / 2**20
    results.append({"before_mib": before, "peak_mib": before + activation, "activation_mib": activation})
    del model, x
    gc.collect()
print(json.dumps(results))
"""


def training_step_memory_mib(config: GlowConfig, batch_size: int, device: str = "cpu",
                             threads: Optional[int] = None) -> dict:
    """Peak memory of one forward + backward of `Glow(config)` above what the model already held, in MiB.

    Returns {"before_mib", "peak_mib", "activation_mib"}, measured in a fresh Python process.

    Example (not run as a doctest: tests/memory/test_memory.py makes this measurement and holds its results to the
    memory modes' claims):
        >>> cfg = GlowConfig(image_shape=(3, 16, 16), levels=2, depth=4, hidden=32)
        >>> training_step_memory_mib(cfg, batch_size=4)["activation_mib"] > 0  # doctest: +SKIP
        True
    """
    return training_steps_memory_mib([config], batch_size, device, threads)[0]


def training_steps_memory_mib(configs: Sequence[GlowConfig], batch_size: int, device: str = "cpu",
                              threads: Optional[int] = None) -> List[dict]:
    """`training_step_memory_mib` of each config, measured one after another in one fresh Python process (one
    interpreter start instead of one per config; glibc's mmap threshold is low from that process's start, so no
    measurement inherits freed memory from the one before)."""
    configs = list(configs)
    for config in configs:
        if not isinstance(config, GlowConfig):
            raise TypeError(f"config must be a GlowConfig; got {type(config).__name__}")
    if device == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("measuring CPU memory needs Linux's /proc/self/clear_refs")
    env = dict(os.environ)
    # Freed blocks above 64 KiB go straight back to the kernel, so the resident size is live memory.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    args = {"configs": [c.to_dict() for c in configs], "batch": batch_size, "device": device,
            "threads": threads or 1}
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
