"""The reversible engine: run a sequence of invertible modules so that training keeps no activations.

Any module with `forward(x) -> (y, logdet)` and `inverse(y) -> (x, logdet)` can run through it (see
`revglow.engine.invertible`); modules that also define `inverse_vjp(y, grad_y, grad_logdet)` do their backward
without redundant work, the others get a generic one (invert, then replay the forward under autograd).
A conditioning input goes to every step: `seq(x, context=c)` calls `step(x, c)` and `step.inverse(y, c)`, and
`inverse_vjp(y, grad_y, grad_logdet, c)` then returns dL/dc as a fourth value.

How it keeps memory constant in depth:
- Forward runs every step under `no_grad`, through one `torch.autograd.Function` per step. Nothing is
  saved but a reference to the sequence's final output (and to the context, shared by all steps).
- Backward, step K first: the step takes its output from the sequence's `_BackwardRelay` (the final output for
  the last step, the input rebuilt by the step above for the others), rebuilds its own input with its
  inverse, computes dL/dinput and its parameters' gradients, and hands the rebuilt input down the relay to
  the step below. Each step's parameter gradients are returned from its own Function, so autograd
  accumulates them into `.grad` as soon as that step is done, and nothing piles up across steps.

What users of `torch.utils.checkpoint` rely on holds here too: under `no_grad` the plain forward runs;
inputs that don't require grad still give parameter gradients; the autocast state at forward is replayed in
backward; with `preserve_rng_state=True` (the default) each step's RNG state at forward (CPU and the input's
CUDA device) is restored around its rebuild and recomputation, so stochastic blocks (dropout) see the masks of
the forward, and the RNG stream the caller sees afterwards is the one plain autograd leaves; buffers that a step
changes in its forward (BatchNorm running statistics) are changed once per step, as under autograd; a second
backward, or a double backward (`create_graph=True`), raises a clear error.

Reconstruction check: affine flows can become numerically non-invertible in training (Behrmann et al.,
2021, "Understanding and mitigating exploding inverses in invertible neural networks"). With `check` "warn" or
"raise" the sequence keeps a small fingerprint of every sample of its input (its norm and about sqrt(D) random
projections, so memory is O(batch) and constant in depth) and compares it with the same fingerprint of the
input rebuilt in backward. The per-sample relative errors stay on the device (`last_reconstruction_error`);
"raise" reads them at once (one host-device sync per sequence and backward) and raises; "warn" reads them only
once they have reached the host without stalling the device (at once on the CPU; on CUDA by the next forward of
the sequence at the latest), so a training step makes no synchronization.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
from torch import nn

from revglow.engine.options import MEMORY_MODES, RECONSTRUCTION_CHECKS
from revglow.engine.replay_reuse import ChildCallMemo, reuses_inverse

__all__ = ["ReversibleSequence", "ReconstructionError", "ReconstructionWarning", "inverse_vjp_by_replay", "vjp",
           "StepContractError"]

Tensor = torch.Tensor
ParamGrads = Dict[nn.Parameter, Tensor]


class ReconstructionError(RuntimeError):
    """The input rebuilt by the reversible backward differs from the real input by more than the tolerance."""


class ReconstructionWarning(RuntimeWarning):
    """Same as ReconstructionError, under check="warn"."""


class StepContractError(TypeError):
    """A step of a sequence broke the contract of `revglow.engine.invertible` (what it returns, or what it offers)."""


# ------------------------------------------------------------------------------------------- contracts
def _step_name(step: nn.Module, index: Optional[int]) -> str:
    return f"step {index} ({type(step).__name__})" if index is not None else f"step ({type(step).__name__})"


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} values"
    return f"{type(value).__name__} {value!r}"[:80]


def _checked_pair(out, step: nn.Module, index: Optional[int], method: str, batch: int) -> Tuple[Tensor, Tensor]:
    """The (tensor, logdet [N]) that forward and inverse must return, or a StepContractError naming the step."""
    expected = f"{_step_name(step, index)}.{method} must return (tensor, logdet) with logdet of shape [{batch}]"
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise StepContractError(f"{expected}; got {_describe(out)}")
    y, logdet = out
    if not isinstance(y, Tensor):
        raise StepContractError(f"{expected}; its first value is {_describe(y)}")
    if not isinstance(logdet, Tensor):
        raise StepContractError(f"{expected}; its logdet is {_describe(logdet)} (return a tensor, e.g. "
                                f"x.new_zeros(x.shape[0]) for a volume-preserving step)")
    if tuple(logdet.shape) != (batch,):
        raise StepContractError(f"{expected}; its logdet has shape {tuple(logdet.shape)}")
    return y, logdet


def _call(step: nn.Module, index: int, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    out = step(x) if context is None else step(x, context)
    return _checked_pair(out, step, index, "forward", x.shape[0])


def _call_inverse(step: nn.Module, index: int, y: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    out = step.inverse(y) if context is None else step.inverse(y, context)
    return _checked_pair(out, step, index, "inverse", y.shape[0])


def _checked_vjp_result(out, step: nn.Module, index: int, y: Tensor, with_context: bool):
    n = 4 if with_context else 3
    expected = (f"{_step_name(step, index)}.inverse_vjp must return (x, grad_x, param_grads"
                f"{', grad_context' if with_context else ''})")
    if not isinstance(out, (tuple, list)) or len(out) != n:
        raise StepContractError(f"{expected}; got {_describe(out)}")
    x, grad_x, param_grads = out[:3]
    if not isinstance(x, Tensor) or not isinstance(grad_x, Tensor) or grad_x.shape != x.shape:
        raise StepContractError(f"{expected} with x and grad_x tensors of one shape; got {_describe(x)} and "
                                f"{_describe(grad_x)}")
    if not isinstance(param_grads, dict):
        raise StepContractError(f"{expected} with param_grads a dict {{parameter: gradient}}; got "
                                f"{_describe(param_grads)}")
    return x, grad_x, param_grads, (out[3] if with_context else None)


# ------------------------------------------------------------------------------- generic backward
def vjp(outputs, grad_outputs, inputs):
    """torch.autograd.grad over the outputs that have a graph (a constant logdet has none); unused inputs get None."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad and g is not None]
    if not pairs:
        return (None,) * len(inputs)
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


def inverse_vjp_by_replay(step: nn.Module, y: Tensor, grad_y: Tensor, grad_logdet: Tensor,
                          context: Optional[Tensor] = None, before_each: Optional[Callable[[], None]] = None,
                          index: Optional[int] = None):
    """Backward of a step that offers only forward and inverse: invert, then replay the forward under autograd.

    Returns (x, dL/dx, {param: dL/dparam}) like `inverse_vjp`, plus dL/dcontext when a context is given; costs
    one inverse and one forward more than a step that computes its backward from the inverse directly, or only
    the inverse when the step sets `reuse_inverse_computations = True` (see revglow.engine.replay_reuse).
    `before_each` runs before the inverse and before the replay (the engine restores the forward's RNG state
    there, so both see the dropout masks of the forward).
    """
    memo = ChildCallMemo(step) if reuses_inverse(step) else None
    if before_each is not None:
        before_each()
    with torch.no_grad(), (memo.recording() if memo else contextlib.nullcontext()):
        x, _ = _checked_pair(step.inverse(y) if context is None else step.inverse(y, context.detach()), step, index,
                             "inverse", y.shape[0])
    x = x.detach().requires_grad_(True)
    if before_each is not None:
        before_each()
    with torch.enable_grad(), (memo.replaying() if memo else contextlib.nullcontext()):
        y_again, logdet = _checked_pair(step(x) if context is None else step(x, context), step, index, "forward",
                                        x.shape[0])
    params = [p for p in step.parameters() if p.requires_grad]
    wants_context = context is not None and context.requires_grad
    inputs = [x] + ([context] if wants_context else []) + params
    result = list(vjp([y_again, logdet], [grad_y, grad_logdet], inputs))
    grad_x = result.pop(0)
    grad_x = grad_x if grad_x is not None else torch.zeros_like(x)
    grad_context = result.pop(0) if wants_context else None
    param_grads = {p: g for p, g in zip(params, result) if g is not None}
    if context is None:
        return x.detach(), grad_x, param_grads
    return x.detach(), grad_x, param_grads, grad_context


inverse_vjp_by_replay.replays_forward = True  # marks the generic path (see _replays_forward)


def _replays_forward(step: nn.Module) -> bool:
    method = getattr(type(step), "inverse_vjp", None)
    return method is None or getattr(method, "replays_forward", False)


# ---------------------------------------------------------------------- state replayed in backward
def _autocast_state() -> List[Tuple[str, torch.dtype]]:
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


class _RngState:
    """The CPU generator's state and, for a CUDA input, that device's: taken at a step's forward, restored
    around its backward so a stochastic step draws the same numbers again (torch.utils.checkpoint does the same)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = (device, torch.cuda.get_rng_state(device)) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])


class _RngReplay:
    """Within the block the generators start from `state`; after it they are back where they were, so the
    backward replay leaves the caller's RNG stream as plain autograd would."""

    def __init__(self, state: Optional[_RngState], device: torch.device):
        self.state, self.device, self.saved = state, device, None

    def __enter__(self):
        if self.state is not None:
            self.saved = _RngState(self.device)
            self.state.restore()
        return self

    def restore_forward_state(self) -> None:
        if self.state is not None:
            self.state.restore()

    def __exit__(self, *exc):
        if self.saved is not None:
            self.saved.restore()
        return False


def _buffer_versions(step: nn.Module) -> List[Tuple[nn.Module, List[int]]]:
    return [(m, [b._version for b in m.buffers(recurse=False)]) for m in step.modules()]


def _changed_buffers(before: List[Tuple[nn.Module, List[int]]]) -> List[Tensor]:
    """Every buffer of each module that changed a buffer in the step's forward (a version counter moved).

    Whole modules, because not every in-place update moves a counter: BatchNorm's kernel updates running_mean
    and running_var without one, and only its num_batches_tracked += 1 shows that it ran in training mode."""
    changed: List[Tensor] = []
    for module, versions in before:
        buffers = list(module.buffers(recurse=False))
        if any(b._version != v for b, v in zip(buffers, versions)):
            changed.extend(buffers)
    return changed


class _BuffersKept:
    """Keeps the values `buffers` have on entry: a recomputation of the forward must not update running
    statistics a second time (autograd updates them once per step, in the forward)."""

    def __init__(self, buffers: Sequence[Tensor]):
        self.buffers = buffers
        self.saved: List[Tensor] = []

    def __enter__(self):
        self.saved = [b.detach().clone() for b in self.buffers]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, value in zip(self.buffers, self.saved):
                b.copy_(value)
        return False


# -------------------------------------------------------------------------------- reconstruction check
class _Fingerprint:
    """Per-sample fingerprint of a tensor [N, ...]: its L2 norm and 2 x M random projections of the sample
    viewed as [M, L] (L the largest divisor of D <= sqrt(D)), each projection over L entries with random signs.

    For an error e of a sample, sum over the 2M projections of (r . e)^2 / 2 is an unbiased estimate of |e|^2
    with about 2M degrees of freedom, exact when the error sits on one entry; the fingerprint costs one
    multiply-add per entry and 2M + 1 numbers per sample.
    """

    _signs_cache: Dict[tuple, Tensor] = {}

    @staticmethod
    def _signs(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        d = math.prod(shape)
        key = (d, dtype, str(device))
        signs = _Fingerprint._signs_cache.get(key)
        if signs is None:
            length = max(k for k in range(1, max(1, math.isqrt(d)) + 1) if d % k == 0)
            # a private generator: the check must not move the caller's RNG stream
            g = torch.Generator().manual_seed(0x5EED)
            bits = torch.randint(0, 2, (2, d // length, length), generator=g)
            with torch.inference_mode(False):
                signs = (bits * 2 - 1).to(dtype=dtype, device=device)
            _Fingerprint._signs_cache[key] = signs
        return signs

    def __init__(self, x: Tensor):
        x = x.detach()
        if not x.is_floating_point():
            x = x.double()
        signs = self._signs(tuple(x.shape[1:]), x.dtype, x.device)
        flat = x.reshape(1, x.shape[0], signs.shape[1], signs.shape[2])
        self.projections = (flat * signs.unsqueeze(1)).sum(-1)   # [2, N, M]
        self.norm = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)   # [N]

    def relative_error(self, rebuilt: Tensor) -> Tensor:
        """Estimated |rebuilt - x| / |x| per sample, [N], on the device; NaN in the rebuilt input gives inf."""
        other = _Fingerprint(rebuilt.to(self.norm.dtype))
        squared = (other.projections - self.projections).square().sum(dim=(0, 2)) / 2
        norm_gap = (other.norm - self.norm).abs()   # a lower bound of |e|, exact for a pure rescaling
        err = torch.maximum(squared.sqrt(), norm_gap) / self.norm.clamp_min(torch.finfo(self.norm.dtype).tiny)
        return torch.nan_to_num(err, nan=math.inf)


class _HostCopy:
    """A small device tensor on its way to the host without stalling the device: a non-blocking copy into
    pinned memory and an event; `ready()` asks the event without waiting. On the CPU it is there at once."""

    def __init__(self, tensor: Tensor):
        if tensor.is_cuda:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tensor.detach(), None

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def values(self) -> list:
        return self.host.tolist()   # a host tensor: no device synchronization


def _reconstruction_message(errors: List[float], tol: float) -> str:
    bad = [i for i, e in enumerate(errors) if not e <= tol]
    worst = max(errors[i] for i in bad)
    which = ", ".join(str(i) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
    return (f"revglow reversible engine: the input rebuilt in backward differs from the real input by relative "
            f"error up to {worst:.3g} (tolerance {tol:g}) in sample(s) {which} of {len(errors)}; the flow has become "
            f"numerically non-invertible there and the gradients are wrong. Lower the learning rate, use additive "
            f"coupling, or train this model with memory='checkpoint'")


# ------------------------------------------------------------------------------------------ the engine
class _BackwardRelay:
    """Hands tensors between the per-step Functions of one forward pass, in backward: the last step takes the
    sequence's output, every step leaves its rebuilt input here for the step below, and the lowest step that
    runs a backward checks its rebuilt input against the fingerprint taken at forward."""

    def __init__(self, sequence: "ReversibleSequence", num_steps: int, first_live: int,
                 fingerprint: Optional[_Fingerprint]):
        self.sequence = sequence
        self.num_steps = num_steps
        self.first_live = first_live          # lowest step whose Function gets a backward
        self.fingerprint = fingerprint
        self.tensor: Optional[Tensor] = None
        self.version: Optional[int] = None
        self.next_step: Optional[int] = None  # index of the step whose backward may run next
        self.consumed = False

    def take(self, index: int) -> Tensor:
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

    def hand_down(self, index: int, rebuilt_input: Tensor) -> None:
        if index > self.first_live:
            self.tensor, self.version, self.next_step = rebuilt_input, None, index - 1
            return
        self.consumed, self.tensor = True, None
        if self.fingerprint is not None:
            errors = self.fingerprint.relative_error(rebuilt_input)
            self.fingerprint = None
            self.sequence._report_reconstruction(errors)


class _ReversibleStep(torch.autograd.Function):
    """One step of a reversible sequence. Inputs: (step, relay, index, x, context, *params); outputs (y, logdet)."""

    @staticmethod
    def forward(ctx, step: nn.Module, relay: _BackwardRelay, index: int, x: Tensor, context: Optional[Tensor],
                *params: Tensor) -> Tuple[Tensor, Tensor]:
        ctx.step, ctx.relay, ctx.index = step, relay, index
        ctx.autocast = _autocast_state()
        ctx.rng = _RngState(x.device) if relay.sequence.preserve_rng_state else None
        versions = _buffer_versions(step)
        with torch.no_grad():
            y, logdet = _call(step, index, x, context)
        ctx.changed_buffers = _changed_buffers(versions)
        ctx.has_context = context is not None
        if context is not None:
            ctx.save_for_backward(context)   # the same tensor for every step: no memory per step
        if index == relay.num_steps - 1:
            relay.tensor, relay.next_step = y, index
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_logdet: Tensor) -> Tuple[Optional[Tensor], ...]:
        # Autograd runs the steps' backwards from the last step down: step i's backward needs dL/dy_i, which
        # only step i + 1's backward produces (y_i is its input). The relay relies on that order: the tensor
        # step i + 1 leaves behind is the output step i needs.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "revglow reversible engine: double backward (create_graph=True) is not supported in "
                "memory='reversible'; use memory='autograd' for higher-order gradients")
        relay, step, index = ctx.relay, ctx.step, ctx.index
        y = relay.take(index)
        context = None
        if ctx.has_context:
            context = ctx.saved_tensors[0].detach().requires_grad_(ctx.needs_input_grad[4])
        with _BuffersKept(ctx.changed_buffers), _RngReplay(ctx.rng, y.device) as rng, torch.enable_grad(), \
                _AutocastReplay(ctx.autocast):
            if _replays_forward(step):
                out = inverse_vjp_by_replay(step, y, grad_y, grad_logdet, context, rng.restore_forward_state, index)
            elif context is None:
                out = step.inverse_vjp(y, grad_y, grad_logdet)
            else:
                out = step.inverse_vjp(y, grad_y, grad_logdet, context)
        x, grad_x, param_grads, grad_context = _checked_vjp_result(out, step, index, y, ctx.has_context)
        x = x.detach()
        relay.hand_down(index, x)
        if grad_context is not None:
            grad_context = grad_context.to(context.dtype)
        grads = tuple(param_grads.get(p) if p.requires_grad else None for p in step.parameters())
        return (None, None, None, grad_x, grad_context) + grads


def _checkpointed(step: nn.Module, index: int, x: Tensor, context: Optional[Tensor], preserve_rng_state: bool):
    """One step under torch.utils.checkpoint; its recomputation in backward leaves the step's buffers as the
    forward left them (running statistics updated once)."""
    changed: List[Tensor] = []
    calls = [0]

    def run(x, context):
        calls[0] += 1
        if calls[0] == 1:
            versions = _buffer_versions(step)
            out = _call(step, index, x, context)
            changed.extend(_changed_buffers(versions))
            return out
        with _BuffersKept(changed):   # exits also when checkpoint stops the recomputation early
            return _call(step, index, x, context)

    return torch.utils.checkpoint.checkpoint(run, x, context, use_reentrant=False,
                                             preserve_rng_state=preserve_rng_state)


class ReversibleSequence(nn.Module):
    """A sequence of invertible steps, trained with `memory` = "reversible" | "checkpoint" | "autograd".

    forward(x, context=None) -> (y, logdet) and inverse(y, context=None) -> (x, logdet) compose the steps' maps
    and add their logdets; a context, when given, goes to every step.

    Example:
        >>> from revglow.engine.coupling import AffineCoupling
        >>> seq = ReversibleSequence([AffineCoupling(nn.Conv2d(2, 4, 3, padding=1)) for _ in range(3)])
        >>> x = torch.randn(2, 4, 3, 3, requires_grad=True)
        >>> y, logdet = seq(x)
        >>> (y.square().sum() + logdet.sum()).backward()   # rebuilds each step's input from its output
        >>> seq.last_reconstruction_error.shape            # per sample, on the device
        torch.Size([2])
    """

    def __init__(self, steps: Iterable[nn.Module], memory: str = "reversible", check: str = "warn",
                 tol: float = 1e-3, preserve_rng_state: bool = True):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        if len(self.steps) == 0:
            raise ValueError("ReversibleSequence needs at least one step")
        for i, step in enumerate(self.steps):
            if not (hasattr(step, "inverse") and callable(step.inverse)):
                raise StepContractError(f"{_step_name(step, i)} has no inverse(); the reversible engine needs "
                                        f"forward(x) -> (y, logdet) and inverse(y) -> (x, logdet)")
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory={memory!r} is not a known mode; choose one of {MEMORY_MODES}")
        if check not in RECONSTRUCTION_CHECKS:
            raise ValueError(f"check={check!r} is not a known option; choose one of {RECONSTRUCTION_CHECKS}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"tol must be a positive number; got {tol!r}")
        if not isinstance(preserve_rng_state, bool):
            raise TypeError(f"preserve_rng_state must be a bool; got {type(preserve_rng_state).__name__}")
        self.memory = memory
        self.check = check
        self.tol = float(tol)
        self.preserve_rng_state = preserve_rng_state
        # Per-sample relative error of the input rebuilt by the last reversible backward ([N], on the device),
        # or None before the first one.
        self.last_reconstruction_error: Optional[Tensor] = None
        self._pending_warning: Optional[_HostCopy] = None

    def _needs_graph(self, x: Tensor, context: Optional[Tensor]) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or (context is not None and context.requires_grad)
                                            or any(p.requires_grad for p in self.parameters()))

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"ReversibleSequence expects a tensor input; got {type(x).__name__}")
        if context is not None and not isinstance(context, Tensor):
            raise TypeError(f"ReversibleSequence: context must be a tensor or None; got {type(context).__name__}")
        self._emit_pending_warning()
        if self.memory == "autograd" or not self._needs_graph(x, context):
            return self._forward_plain(x, context)
        if self.memory == "checkpoint":
            return self._forward_checkpoint(x, context)
        return self._forward_reversible(x, context)

    def _forward_plain(self, x, context):
        logdet = 0
        for index, step in enumerate(self.steps):
            x, ld = _call(step, index, x, context)
            logdet = logdet + ld
        return x, logdet

    def _forward_checkpoint(self, x, context):
        logdet = 0
        for index, step in enumerate(self.steps):
            x, ld = _checkpointed(step, index, x, context, self.preserve_rng_state)
            logdet = logdet + ld
        return x, logdet

    def _forward_reversible(self, x, context):
        # The lowest step whose Function will get a backward: the first one with an input that requires grad
        # (from there on every output does). Its input is what the reconstruction check fingerprints.
        context_grad = context is not None and context.requires_grad
        first_live = len(self.steps) - 1
        for index, step in enumerate(self.steps):
            if index == 0 and x.requires_grad or context_grad or any(p.requires_grad for p in step.parameters()):
                first_live = index
                break
        relay = _BackwardRelay(self, len(self.steps), first_live, None)
        logdet = 0
        for index, step in enumerate(self.steps):
            if index == first_live and self.check != "off":
                relay.fingerprint = _Fingerprint(x)
            x, ld = _ReversibleStep.apply(step, relay, index, x, context, *step.parameters())
            logdet = logdet + ld
        relay.version = x._version
        return x, logdet

    def inverse(self, y: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        logdet = 0
        for index in reversed(range(len(self.steps))):
            y, ld = _call_inverse(self.steps[index], index, y, context)
            logdet = logdet + ld
        return y, logdet

    # ----------------------------------------------------------------------------- reconstruction check
    def _report_reconstruction(self, errors: Tensor) -> None:
        self.last_reconstruction_error = errors
        if self.check == "raise":
            values = errors.tolist()   # one synchronization: raising needs the answer now
            if not all(e <= self.tol for e in values):
                raise ReconstructionError(_reconstruction_message(values, self.tol))
        elif self.check == "warn":
            self._pending_warning = _HostCopy(errors)
            self._emit_pending_warning()

    def _emit_pending_warning(self) -> None:
        """Warn about the last backward's errors if they have reached the host; never waits for them."""
        pending = self._pending_warning
        if pending is None or not pending.ready():
            return
        self._pending_warning = None
        values = pending.values()
        if not all(e <= self.tol for e in values):
            warnings.warn(_reconstruction_message(values, self.tol), ReconstructionWarning, stacklevel=3)
