"""The reversible engine: run a sequence of invertible modules so that training keeps no activations.

Any module with `forward(x) -> (y, logdet)` and `inverse(y) -> (x, logdet)` can run through it (see
`revglow.layers.base`); modules that also define `inverse_vjp(y, grad_y, grad_logdet)` do their backward
without redundant work, the others get a generic one (invert, then replay the forward under autograd).

How it keeps memory constant in depth:
- Forward runs every step under `no_grad`, through one `torch.autograd.Function` per step. Nothing is
  saved but a reference to the sequence's final output.
- Backward, step K first: the step takes its output from a slot shared by the sequence (the final output for
  the last step, the input rebuilt by the step above for the others), rebuilds its own input with its
  inverse, computes dL/dinput and its parameters' gradients, and leaves the rebuilt input in the slot for
  the step below. Each step's parameter gradients are returned from its own Function, so autograd
  accumulates them into `.grad` as soon as that step is done, and nothing piles up across steps.

What users of `torch.utils.checkpoint` rely on holds here too: under `no_grad` the plain forward runs;
inputs that don't require grad still give parameter gradients; the autocast state at forward is replayed in
backward; the RNG state is not touched; a second backward, or a double backward (`create_graph=True`),
raises a clear error.

Reconstruction check: affine flows can become numerically non-invertible in training (Behrmann et al.,
2021, "Understanding and mitigating exploding inverses in invertible neural networks"). With `check`
"warn" or "raise", the sequence keeps a copy of the first sample of its input (one sample per sequence, so
memory stays constant in depth) and compares the input rebuilt in backward with it; a relative error above
`tol` warns or raises with the error it saw, so wrong gradients are never silent.
"""
from __future__ import annotations

import warnings
from typing import Iterable, List, Optional

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["ReversibleSequence", "ReconstructionError", "ReconstructionWarning", "MEMORY_MODES", "inverse_vjp_by_replay",
           "vjp"]

MEMORY_MODES = ("reversible", "checkpoint", "autograd")


class ReconstructionError(RuntimeError):
    """The input rebuilt by the reversible backward differs from the real input by more than the tolerance."""


class ReconstructionWarning(RuntimeWarning):
    """Same as ReconstructionError, under check="warn"."""


def _autocast_state():
    """The autocast settings of every device type that has it enabled, to replay in backward."""
    state = []
    for device_type in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device_type):
                state.append((device_type, torch.get_autocast_dtype(device_type)))
        except (RuntimeError, TypeError):  # device type unknown to this build
            continue
    return state


class _AutocastReplay:
    def __init__(self, state):
        self.contexts = [torch.autocast(device_type=d, dtype=dt) for d, dt in state]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)
        return False


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


class _Slot:
    """State shared by the per-step Functions of one forward pass of a sequence."""

    def __init__(self, num_steps: int, check: str, tol: float, reference: Optional[torch.Tensor]):
        self.num_steps = num_steps
        self.check = check
        self.tol = tol
        self.reference = reference      # first sample of the sequence input, for the reconstruction check
        self.tensor: Optional[torch.Tensor] = None
        self.version: Optional[int] = None
        self.next_step: Optional[int] = None  # index of the step whose backward may run next
        self.consumed = False

    def take(self, index: int) -> torch.Tensor:
        if self.consumed or self.tensor is None:
            raise RuntimeError(
                "revglow reversible engine: backward through this forward pass ran already (its rebuilt "
                "activations are gone). A second backward is not supported in memory='reversible'; run the "
                "forward again, or use memory='autograd' if you need retain_graph")
        if index != self.next_step:
            raise RuntimeError(
                f"revglow reversible engine: step {index} ran backward out of order (expected step "
                f"{self.next_step}); partial or repeated backward passes are not supported in memory='reversible'")
        if self.version is not None and self.tensor._version != self.version:
            raise RuntimeError(
                "revglow reversible engine: the output of a reversible sequence was modified in place after the "
                "forward pass, so its inputs cannot be rebuilt; clone it before modifying it")
        tensor, self.tensor = self.tensor, None
        return tensor

    def put(self, index: int, tensor: torch.Tensor) -> None:
        self.tensor, self.version, self.next_step = tensor, None, index - 1

    def finish(self, rebuilt_input: torch.Tensor) -> None:
        self.consumed = True
        self.tensor = None
        if self.reference is None or self.check == "off":
            return
        err = _relative_error(rebuilt_input[:1], self.reference)
        self.reference = None
        if not err <= self.tol:  # also catches NaN
            msg = (f"revglow reversible engine: the input rebuilt in backward differs from the real input by "
                   f"relative error {err:.3g} (tolerance {self.tol:g}); the flow has become numerically "
                   f"non-invertible and the gradients are wrong. Lower the learning rate, use additive coupling, "
                   f"or train this model with memory='checkpoint'")
            if self.check == "raise":
                raise ReconstructionError(msg)
            warnings.warn(msg, ReconstructionWarning, stacklevel=2)


class _ReversibleStep(torch.autograd.Function):
    """One step of a reversible sequence. Inputs: (step, slot, index, x, *params); outputs: (y, logdet)."""

    @staticmethod
    def forward(ctx, step, slot, index, x, *params):
        ctx.step, ctx.slot, ctx.index, ctx.params = step, slot, index, params
        ctx.autocast = _autocast_state()
        with torch.no_grad():
            y, logdet = step(x)
        if index == slot.num_steps - 1:
            slot.tensor, slot.next_step = y, index
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "revglow reversible engine: double backward (create_graph=True) is not supported in "
                "memory='reversible'; use memory='autograd' for higher-order gradients")
        slot = ctx.slot
        y = slot.take(ctx.index)
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0])
        step = ctx.step
        with torch.enable_grad(), _AutocastReplay(ctx.autocast):
            if hasattr(step, "inverse_vjp"):
                x, grad_x, param_grads = step.inverse_vjp(y, grad_y, grad_logdet)
            else:
                x, grad_x, param_grads = inverse_vjp_by_replay(step, y, grad_y, grad_logdet)
        x = x.detach()
        if ctx.index == 0:
            slot.finish(x)
        else:
            slot.put(ctx.index, x)
        grads = tuple(param_grads.get(p) if p.requires_grad else None for p in ctx.params)
        return (None, None, None, grad_x) + grads


def vjp(outputs, grad_outputs, inputs):
    """torch.autograd.grad over the outputs that have a graph (a constant logdet has none); unused inputs get None."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad and g is not None]
    if not pairs:
        return (None,) * len(inputs)
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


def inverse_vjp_by_replay(step, y, grad_y, grad_logdet):
    """Backward of a step that offers only forward and inverse: invert, then replay the forward under autograd.

    Returns (x, dL/dx, {param: dL/dparam}) like `inverse_vjp`; costs one inverse and one forward more than a
    step that computes its backward from the inverse directly.
    """
    with torch.no_grad():
        x, _ = step.inverse(y)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y_again, logdet = step(x)
    params = [p for p in step.parameters() if p.requires_grad]
    result = vjp([y_again, logdet], [grad_y, grad_logdet], [x] + params)
    grad_x = result[0] if result[0] is not None else torch.zeros_like(x)
    return x.detach(), grad_x, {p: g for p, g in zip(params, result[1:]) if g is not None}


class ReversibleSequence(nn.Module):
    """A sequence of invertible steps, trained with `memory` = "reversible" | "checkpoint" | "autograd".

    forward(x) -> (y, logdet) and inverse(y) -> (x, logdet) compose the steps' maps and add their logdets.

    Example:
        >>> from revglow.layers import FlowStep
        >>> seq = ReversibleSequence([FlowStep(4, hidden=8) for _ in range(3)], memory="reversible")
        >>> x = torch.randn(2, 4, 3, 3, requires_grad=True)
        >>> y, logdet = seq(x)
        >>> (y.square().sum() + logdet.sum()).backward()   # rebuilds each step's input from its output
    """

    def __init__(self, steps: Iterable[nn.Module], memory: str = "reversible", check: str = "warn",
                 tol: float = 1e-3):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        if len(self.steps) == 0:
            raise ValueError("ReversibleSequence needs at least one step")
        for i, step in enumerate(self.steps):
            if not (hasattr(step, "inverse") and callable(step.inverse)):
                raise TypeError(f"step {i} ({type(step).__name__}) has no inverse(); the reversible engine needs one")
        self.memory = memory
        self.check = check
        self.tol = tol
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory={memory!r} is not a known mode; choose one of {MEMORY_MODES}")
        if check not in ("off", "warn", "raise"):
            raise ValueError(f"check={check!r} is not a known option; choose 'off', 'warn' or 'raise'")

    def _needs_graph(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward(self, x: torch.Tensor):
        if self.memory == "autograd" or not self._needs_graph(x):
            return self._forward_plain(x)
        if self.memory == "checkpoint":
            return self._forward_checkpoint(x)
        return self._forward_reversible(x)

    def _forward_plain(self, x):
        logdet = 0
        for step in self.steps:
            x, ld = step(x)
            logdet = logdet + ld
        return x, logdet

    def _forward_checkpoint(self, x):
        logdet = 0
        for step in self.steps:
            x, ld = torch.utils.checkpoint.checkpoint(step, x, use_reentrant=False)
            logdet = logdet + ld
        return x, logdet

    def _forward_reversible(self, x):
        reference = x[:1].detach().clone() if self.check != "off" else None
        slot = _Slot(len(self.steps), self.check, self.tol, reference)
        logdet = 0
        for index, step in enumerate(self.steps):
            x, ld = _ReversibleStep.apply(step, slot, index, x, *step.parameters())
            logdet = logdet + ld
        slot.version = x._version
        return x, logdet

    def inverse(self, y: torch.Tensor):
        logdet = 0
        for step in reversed(self.steps):
            y, ld = step.inverse(y)
            logdet = logdet + ld
        return y, logdet
