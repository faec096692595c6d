"""Sample grids of a training run: at each of SAMPLE_TEMPERATURES, the same latents' images side by side.

Example:
    >>> from revglow import Glow, GlowConfig
    >>> model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8))
    >>> model.initialize(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
    >>> import tempfile
    >>> paths, grids = write_sample_grids(model, tempfile.mkdtemp(), step=0, n=4, seed=0, device=torch.device("cpu"))
    >>> [p.name for p in paths]
    ['step-00000000-t0.5.png', 'step-00000000-t0.7.png', 'step-00000000-t1.0.png']
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from revglow.glow.model import Glow
from revglow.training.images import make_grid, save_grid

__all__ = ["SAMPLE_TEMPERATURES", "sample_labels", "write_sample_grids"]

SAMPLE_TEMPERATURES = (0.5, 0.7, 1.0)


def sample_labels(model: Glow, n: int, device: torch.device) -> Optional[torch.Tensor]:
    """Labels 0, 1, ..., k-1, 0, 1, ... for n samples of a class-conditional model; None for an unconditional one."""
    k = model.config.num_classes
    return torch.arange(n, device=device) % k if k > 0 else None


def write_sample_grids(model: Glow, folder: Union[str, Path], step: int, n: int, seed: int,
                       device: torch.device) -> Tuple[List[Path], Dict[str, torch.Tensor]]:
    """A grid of n samples per temperature of SAMPLE_TEMPERATURES, written to folder/step-STEP-tT.png, every
    grid from the same latents (a generator seeded with `seed`). Returns the paths and the grids by name
    ("samples/tT", for the metrics log)."""
    folder = Path(folder)
    paths, grids = [], {}
    with torch.no_grad():
        model.eval()
        for temperature in SAMPLE_TEMPERATURES:
            generator = torch.Generator(device).manual_seed(seed)
            labels = sample_labels(model, n, device)
            images = model.sample(n, temperature=temperature, y=labels, generator=generator)
            paths.append(save_grid(images, folder / f"step-{step:08d}-t{temperature:.1f}.png"))
            grids[f"samples/t{temperature:.1f}"] = make_grid(images)
        model.train()
    return paths, grids
