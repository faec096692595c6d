"""Loading a checkpoint's model for the commands that generate or evaluate (eval, sample, interpolate, manipulate):
the seed and the label checked, the device resolved, and weights that do not fit the checkpoint's own configuration
refused with one line."""
from __future__ import annotations

import argparse
from typing import Dict, Optional

import torch

from revglow.cli.checks import CommandError
from revglow.glow.checks import ConfigMismatchError
from revglow.training.checkpoints import load_checkpoint
from revglow.training.config import MAX_SEED

__all__ = ["load_for_generation", "label_tensor"]


def load_for_generation(args: argparse.Namespace):
    """(checkpoint state, model in eval mode on its device, device, label or None) for args.checkpoint, with the
    global RNG seeded with args.seed."""
    from revglow.training.devices import resolve_device

    if not 0 <= args.seed <= MAX_SEED:
        raise CommandError(f"--seed must be between 0 and 2**32 - 1 = {MAX_SEED}; got {args.seed}")
    state = load_checkpoint(args.checkpoint, required=("model", "glow_config"))
    device = resolve_device(args.device)
    model = _load_model(state, device, args)
    torch.manual_seed(args.seed)
    label = None   # one class for every image generated (an int), or None
    k = model.config.num_classes
    if args.label is not None:
        if k == 0:
            raise CommandError(f"--label {args.label}: the model in {args.checkpoint} is not class-conditional")
        if not 0 <= args.label < k:
            raise CommandError(f"--label must lie in [0, {k - 1}]; got {args.label}")
        label = args.label
    elif k > 0 and args.command in ("interpolate", "manipulate"):
        raise CommandError(f"the model in {args.checkpoint} is class-conditional ({k} classes): pass --label")
    return state, model, device, label


def _load_model(state: Dict, device: torch.device, args: argparse.Namespace):
    """The checkpoint's Glow; weights of another configuration than its glow_config (a checkpoint edited or put
    together by hand) are one line naming what differs, not torch's list of every tensor."""
    from revglow.training.evaluation import load_model

    try:
        return load_model(state, device, use_ema=args.ema)
    except ConfigMismatchError as exc:
        raise CommandError(f"{args.checkpoint}: its weights are of a Glow with {exc.stored}, its glow_config says "
                           f"{exc.expected}") from exc
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" not in str(exc):
            raise
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        raise CommandError(f"{args.checkpoint}: its weights do not fit its glow_config: "
                           f"{details[0] if details else exc}{more}") from exc


def label_tensor(label: Optional[int], n: int, device) -> Optional[torch.Tensor]:
    """`label` for each of n images, or None."""
    return None if label is None else torch.full((n,), label, dtype=torch.long, device=device)
