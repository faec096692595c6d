"""Held-out bits/dim of a model (and its class head's predictions), and loading a trained model from a checkpoint (EMA weights when present).

Example:
    >>> model = load_model("runs/digits/checkpoint.pt", torch.device("cpu"))         # doctest: +SKIP
    >>> bpd = evaluate_bits_per_dim(model, load_dataset("digits").test, 256, torch.device("cpu"))  # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
from typing import Dict, Tuple, Union

import torch

from revglow.training.checkpoints import CheckpointError, load_checkpoint
from revglow.glow.config import GlowConfig
from revglow.errors import ConfigError
from revglow.glow.layers.classifier import class_bits
from revglow.glow.model import Glow
from revglow.training.loaders import make_eval_loader

__all__ = ["evaluate_bits_per_dim", "evaluate_class_head", "standard_error", "load_model"]


@torch.no_grad()
def evaluate_bits_per_dim(model: Glow, dataset, batch_size: int, device: torch.device, draws: int = 1,
                          seed: int = 0, workers: int = 0) -> torch.Tensor:
    """Per-image test bits/dim [N] (float64, on the CPU), averaged over `draws` dequantization draws.

    The dequantization noise comes from a generator of its own seeded with `seed` (on the CPU the stream the
    global RNG gives after torch.manual_seed(seed)), so evaluation never touches the global RNGs.
    """
    if draws < 1:
        raise ConfigError(f"draws must be >= 1; got {draws}")
    conditional = model.config.num_classes > 0
    was_training = model.training
    model.eval()
    results = []
    try:
        generator = torch.Generator(device).manual_seed(seed)
        for draw in range(draws):
            per_image = []
            for x, y in make_eval_loader(dataset, batch_size, workers):
                x = x.to(device)
                y = y.to(device) if conditional else None
                per_image.append(model.bits_per_dim(model.preprocess(x, generator=generator), y).double().cpu())
            results.append(torch.cat(per_image))
    finally:
        model.train(was_training)
    return torch.stack(results).mean(dim=0)


@torch.no_grad()
def evaluate_class_head(model: Glow, dataset, batch_size: int, device: torch.device,
                        workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image of a labelled data set: the class head's cross-entropy of the true class in bits, and whether
    its most likely class is the true one (1.0 or 0.0); both [N] float64 on the CPU. The head sees each image
    without dequantization noise (`Glow.predict_class`)."""
    was_training = model.training
    model.eval()
    bits, correct = [], []
    try:
        for x, y in make_eval_loader(dataset, batch_size, workers):
            logits = model.predict_class(x.to(device))
            y = torch.as_tensor(y).to(device)
            bits.append(class_bits(logits.double(), y).cpu())
            correct.append((logits.argmax(dim=1) == y).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(bits), torch.cat(correct)


def load_model(state: Union[Dict, str, os.PathLike], device: torch.device, use_ema: bool = True) -> Glow:
    """A Glow built from a checkpoint's config and weights (the EMA weights when present and use_ema).

    `state` is a checkpoint path (read with `load_checkpoint`, which verifies it) or a dict it returned.
    Weights that are not finite are refused: a finished revglow run never saves them.
    """
    if not isinstance(state, dict):
        state = load_checkpoint(state, required=("model", "glow_config"))
    model = Glow(GlowConfig.from_dict(state["glow_config"]))
    model.load_state_dict(state["model"])
    ema = state.get("ema")
    if use_ema and ema and ema.get("shadow"):
        missing = set(ema["shadow"]) - set(dict(model.named_parameters()))
        if missing:
            raise CheckpointError(f"the checkpoint's EMA weights name unknown parameters {sorted(missing)[:3]}")
        model.load_state_dict(ema["shadow"], strict=False)
    bad = [name for name, value in model.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(f"the checkpoint's weights are not finite ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                              f"it is corrupt or was not written by revglow train")
    return model.to(device).eval()


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of `values` (nan for fewer than two)."""
    n = values.numel()
    return float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
