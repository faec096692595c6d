"""The optimizers `revglow train` offers (`TrainConfig.optimizer`): PyTorch's Adam, and the Adamax of the Glow
authors' reference code (`ReferenceAdamax`), which differs from `torch.optim.Adamax`.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = ReferenceAdamax([w], lr=1e-3, betas=(0.9, reference_beta2(steps_per_epoch=100)))
    >>> w.grad = torch.tensor([1.0, -2.0, 0.5])
    >>> opt.step()
    >>> [round(v, 6) for v in w.tolist()]
    [0.9999, 1.0001, 0.9999]
"""
from __future__ import annotations

import math
from typing import Iterable, Tuple

import torch

from revglow.training.config import OPTIMIZERS, TrainConfig
from revglow.errors import ConfigError, ConfigTypeError

__all__ = ["ReferenceAdamax", "reference_beta2", "make_optimizer"]


def reference_beta2(steps_per_epoch: int, polyak_epochs: float = 1.0) -> float:
    """The reference's beta2: 1 - 1 / (steps per epoch x polyak_epochs) (openai/glow optim.py: `beta2 =
    1-1./(hps.train_its*hps.polyak_epochs)`, polyak_epochs 1 by default), so the running maximum forgets
    over about one epoch whatever the data set's size."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ConfigError(f"reference_beta2: steps_per_epoch must be an int >= 1; got {steps_per_epoch!r}")
    if not isinstance(polyak_epochs, (int, float)) or not math.isfinite(polyak_epochs) or polyak_epochs <= 0:
        raise ConfigError(f"reference_beta2: polyak_epochs must be a positive number; got {polyak_epochs!r}")
    return max(0.0, 1.0 - 1.0 / (steps_per_epoch * polyak_epochs))


class ReferenceAdamax(torch.optim.Optimizer):
    """Adamax exactly as openai/glow's `optim.adamax` updates a weight w with gradient g at step t = 1, 2, ...:

        m  = beta1 * m + (1 - beta1) * g
        u  = max(beta2 * u, |g|)
        w  = w - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (u + eps)

    It is not `torch.optim.Adamax`: the reference multiplies the step size by sqrt(1 - beta2**t), a correction
    that belongs to Adam's second moment (its `adam` has the same line) and that makes the first steps short
    (with beta2 = 1 - 1/782, CIFAR-10 at batch 64, the first step is 3.6% of lr); and its eps is added after
    the maximum, not inside it. The reference's `weight_decay` (a multiplier of w, 1.0 = off by default) is
    left out. Step size and corrections are computed in double precision (the reference: float32).
    `reference_beta2` gives the beta2 the reference derives from the steps per epoch.

    The state per parameter is {"step": int, "exp_avg": m, "exp_inf": u}; `state_dict()`/`load_state_dict()`
    round-trip it exactly, so a resumed run continues bit for bit.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ConfigError(f"ReferenceAdamax: lr must be a non-negative number; got {lr!r}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigTypeError(f"ReferenceAdamax: betas must be a pair (beta1, beta2); got {betas!r}")
        for name, beta in zip(("beta1", "beta2"), betas):
            if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
                raise ConfigError(f"ReferenceAdamax: {name} must lie in [0, 1); got {beta!r}")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError(f"ReferenceAdamax: eps must be a positive number; got {eps!r}")
        super().__init__(params, dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=float(eps)))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("ReferenceAdamax does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                grad = p.grad
                exp_avg, exp_inf = state["exp_avg"], state["exp_inf"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                torch.maximum(exp_inf.mul_(beta2), grad.abs(), out=exp_inf)
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                p.addcdiv_(exp_avg, exp_inf + group["eps"], value=-step_size)
        return loss


def make_optimizer(config: TrainConfig, params: Iterable, steps_per_epoch: int) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names, at `config.lr`: "adam" is torch.optim.Adam with its defaults
    (what revglow always trained with); "adamax" is ReferenceAdamax with beta1 0.9 and the reference's beta2
    for `steps_per_epoch` (openai/glow train.py: --optimizer adamax, --beta1 .9, --polyak_epochs 1)."""
    if not isinstance(config, TrainConfig):
        raise ConfigTypeError(f"make_optimizer expects a TrainConfig; got {type(config).__name__}")
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "adamax":
        return ReferenceAdamax(params, lr=config.lr, betas=(0.9, reference_beta2(steps_per_epoch)))
    raise ConfigError(f"TrainConfig.optimizer={config.optimizer!r} is not a known option; choose one of {OPTIMIZERS}")
