"""The reversible engine: run a sequence of invertible modules so that training keeps no activations.

Any module with `forward(x) -> (y, logdet)` and `inverse(y) -> (x, logdet)` can run through it (see
`revglow.engine.invertible`); modules that also define `inverse_vjp(y, grad_y, grad_logdet)` do their backward
without redundant work, the others get a generic one (invert, then replay the forward under autograd:
revglow.engine.contract). A conditioning input goes to every step: `seq(x, context=c)` calls `step(x, c)` and
`step.inverse(y, c)`, and `inverse_vjp(y, grad_y, grad_logdet, c)` then returns dL/dc as a fourth value.

How it keeps memory constant in depth:
- Forward runs every step under `no_grad` and hands its outputs to one `torch.autograd.Function` per step.
  Nothing is saved but a reference to the sequence's final output (and to the context, shared by all steps).
- Backward, step K first: the step takes its output from the sequence's `_BackwardRelay` (the final output for
  the last step, the input rebuilt by the step above for the others), rebuilds its own input with its
  inverse, computes dL/dinput and its parameters' gradients, and hands the rebuilt input down the relay to
  the step below. Each step's parameter gradients are returned from its own Function, so autograd
  accumulates them into `.grad` as soon as that step is done, and nothing piles up across steps.

What the backward replays from the forward (autocast, the random numbers of every module call, buffers changed
once) is in revglow.engine.replay; the check that the rebuilt input is the real one in
revglow.engine.reconstruction; how tensors a step uses without registering them still get their gradients in
revglow.engine.unregistered.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import nn

from revglow.engine.contract import (StepContractError, call_inverse, call_step, checked_vjp_result,
                                     inverse_vjp_by_replay, replays_forward, step_name)
from revglow.engine.options import MEMORY_MODES, RECONSTRUCTION_CHECKS
from revglow.engine.reconstruction import (Fingerprint, HostCopy, ReconstructionError, ReconstructionWarning,
                                           reconstruction_message, reconstruction_tolerance)
from revglow.engine.replay import BufferChanges, BuffersKept, ForwardState, ModuleCallRng, autocast_dtype
from revglow.engine.unregistered import UnregisteredTensors

__all__ = ["ReversibleSequence"]

Tensor = torch.Tensor


class ReversibleSequence(nn.Module):
    """A sequence of invertible steps, trained with `memory` = "reversible" | "checkpoint" | "autograd".

    forward(x, context=None) -> (y, logdet) and inverse(y, context=None) -> (x, logdet) compose the steps' maps
    and add their logdets; a context, when given, goes to every step. With `logdet=False` they return the tensor
    alone (a reversible classifier or transformer: the steps still return (tensor, logdet), e.g.
    TwoNetworkCoupling's zeros). A sequence is a container like nn.Sequential: len(seq), seq[i] (a step), iteration,
    and seq[i:j], a ReversibleSequence with the same options over those steps (the modules are shared).

    What users of `torch.utils.checkpoint` rely on holds in every mode: under `no_grad` the plain forward runs;
    inputs that don't require grad still give parameter gradients; the autocast state at forward is replayed in
    backward; with `preserve_rng_state=True` (the default) every module call inside a step draws in the backward
    the random numbers it drew in the forward, whatever order the step's inverse calls its modules in (dropout in
    both networks of a TwoNetworkCoupling gets autograd's gradients; see revglow.engine.replay), and the RNG stream
    the caller sees afterwards is the one plain autograd leaves; buffers that a step changes in its forward
    (BatchNorm running statistics) are changed once, as under autograd; a second backward, or a double backward
    (`create_graph=True`), raises a clear error.

    Tensors a step uses without owning them (a module shared with it but not registered as its submodule, a
    tensor reached through a closure, one computed outside from other parameters) get autograd's gradients in
    every mode. The reversible mode looks for them in each step's first reversible forward (a TorchFunctionMode
    over that forward: a few microseconds per operation, once); a step that uses some is watched at every forward
    and its backward takes the generic path (invert, then replay the forward), whatever inverse_vjp it has. A
    step that starts using such a tensor only after its first forward is not seen: register what a step uses.

    `check` ("off" | "warn" | "raise") compares the input rebuilt in backward with the real one (see
    revglow.engine.reconstruction); `tol` is the relative error it accepts: None (the default) picks it from the
    precision the forward ran in, 1e-3 without autocast and a multiple of the autocast dtype's epsilon under
    autocast (revglow.engine.reconstruction.reconstruction_tolerance); a number is used as given.

    Example:
        >>> from revglow.engine.coupling import AffineCoupling
        >>> seq = ReversibleSequence([AffineCoupling(nn.Conv2d(2, 4, 3, padding=1)) for _ in range(3)])
        >>> x = torch.randn(2, 4, 3, 3, requires_grad=True)
        >>> y, logdet = seq(x)
        >>> (y.square().sum() + logdet.sum()).backward()   # rebuilds each step's input from its output
        >>> seq.last_reconstruction_error.shape            # per sample, on the device
        torch.Size([2])
        >>> len(seq), type(seq[0]).__name__, len(seq[1:])
        (3, 'AffineCoupling', 2)
    """

    def __init__(self, steps: Iterable[nn.Module], memory: str = "reversible", check: str = "warn",
                 tol: Optional[float] = None, preserve_rng_state: bool = True, logdet: bool = True):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        if len(self.steps) == 0:
            raise ValueError("ReversibleSequence needs at least one step")
        for i, step in enumerate(self.steps):
            if not (hasattr(step, "inverse") and callable(step.inverse)):
                raise StepContractError(f"{step_name(step, i)} has no inverse(); the reversible engine needs "
                                        f"forward(x) -> (y, logdet) and inverse(y) -> (x, logdet)")
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory={memory!r} is not a known mode; choose one of {MEMORY_MODES}")
        if check not in RECONSTRUCTION_CHECKS:
            raise ValueError(f"check={check!r} is not a known option; choose one of {RECONSTRUCTION_CHECKS}")
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0):
            raise ValueError(f"tol must be a positive number, or None to follow the precision; got {tol!r}")
        for name, flag in (("preserve_rng_state", preserve_rng_state), ("logdet", logdet)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
        self.memory = memory
        self.check = check
        self.tol = None if tol is None else float(tol)
        self.preserve_rng_state = preserve_rng_state
        self.logdet = logdet
        # Per-sample relative error of the input rebuilt by the last reversible backward ([N], on the device),
        # or None before the first one.
        self.last_reconstruction_error: Optional[Tensor] = None
        self._pending_warning: Optional[Tuple[HostCopy, float]] = None
        # What the reversible forwards so far have shown of each step (by index): see _StepNotes.
        self._notes: Dict[int, _StepNotes] = {}

    # ------------------------------------------------------------------------------------ a container
    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.steps)

    def __getitem__(self, index: Union[int, slice]) -> Union[nn.Module, "ReversibleSequence"]:
        if isinstance(index, slice):
            steps = list(self.steps)[index]
            if not steps:
                raise ValueError(f"ReversibleSequence[{index.start}:{index.stop}:{index.step}] selects no step of "
                                 f"{len(self.steps)}")
            return ReversibleSequence(steps, self.memory, self.check, self.tol, self.preserve_rng_state,
                                      self.logdet)
        return self.steps[index]

    # ---------------------------------------------------------------------------------------- the maps
    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if not isinstance(x, Tensor):
            raise TypeError(f"ReversibleSequence expects a tensor input; got {type(x).__name__}")
        if context is not None and not isinstance(context, Tensor):
            raise TypeError(f"ReversibleSequence: context must be a tensor or None; got {type(context).__name__}")
        self._emit_pending_warning()
        if self.memory == "autograd" or not self._needs_graph(x, context):
            y, logdet = self._forward_plain(x, context)
        elif self.memory == "checkpoint":
            y, logdet = self._forward_checkpoint(x, context)
        else:
            y, logdet = self._forward_reversible(x, context)
        return (y, logdet) if self.logdet else y

    def inverse(self, y: Tensor, context: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        logdet = 0
        for index in reversed(range(len(self.steps))):
            y, ld = call_inverse(self.steps[index], index, y, context)
            logdet = logdet + ld
        return (y, logdet) if self.logdet else y

    def _needs_graph(self, x: Tensor, context: Optional[Tensor]) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or (context is not None and context.requires_grad)
                                            or any(p.requires_grad for p in self.parameters()))

    def _forward_plain(self, x, context):
        logdet = 0
        for index, step in enumerate(self.steps):
            x, ld = call_step(step, index, x, context)
            logdet = logdet + ld
        return x, logdet

    def _forward_checkpoint(self, x, context):
        logdet = 0
        for index, step in enumerate(self.steps):
            x, ld = _checkpointed(step, index, x, context, self.preserve_rng_state)
            logdet = logdet + ld
        return x, logdet

    def _forward_reversible(self, x, context):
        tol = self.tol if self.tol is not None else reconstruction_tolerance(autocast_dtype(x.device))
        relay = _BackwardRelay(self, len(self.steps), tol)
        logdet = 0
        for index, step in enumerate(self.steps):
            notes = self._notes.get(index)
            if notes is None or notes.step_id != id(step):   # a step replaced in self.steps is seen anew
                notes = self._notes[index] = _StepNotes(step)
            run = _StepRun(step, index, x, context, self.preserve_rng_state, notes)
            y, ld = _ReversibleStep.apply(run, relay, x, context, *run.params, *run.unregistered)
            if relay.first_live is None and y.requires_grad:
                # the lowest step whose Function gets a backward: the check compares its rebuilt input
                relay.first_live = index
                if self.check != "off":
                    relay.fingerprint = Fingerprint(x)
            x, logdet = y, logdet + ld
        relay.version = x._version
        return x, logdet

    # ----------------------------------------------------------------------------- reconstruction check
    def _report_reconstruction(self, errors: Tensor, tol: float) -> None:
        self.last_reconstruction_error = errors
        if self.check == "raise":
            values = errors.tolist()   # one synchronization: raising needs the answer now
            if not all(e <= tol for e in values):
                raise ReconstructionError(reconstruction_message(values, tol))
        elif self.check == "warn":
            self._pending_warning = (HostCopy(errors), tol)
            self._emit_pending_warning()

    def _emit_pending_warning(self) -> None:
        """Warn about the last backward's errors if they have reached the host; never waits for them."""
        pending = self._pending_warning
        if pending is None or not pending[0].ready():
            return
        self._pending_warning = None
        values, tol = pending[0].values(), pending[1]
        if not all(e <= tol for e in values):
            warnings.warn(reconstruction_message(values, tol), ReconstructionWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------ the engine
class _ReversibleStep(torch.autograd.Function):
    """One step of a reversible sequence. Inputs: (run, relay, x, context, *params, *unregistered tensors);
    outputs (y, logdet), computed by the `_StepRun` beforehand."""

    @staticmethod
    def forward(ctx, run: "_StepRun", relay: "_BackwardRelay", x: Tensor, context: Optional[Tensor],
                *tensors: Tensor) -> Tuple[Tensor, Tensor]:
        ctx.run, ctx.relay = run, relay
        ctx.has_context = context is not None
        if context is not None:
            ctx.save_for_backward(context)   # the same tensor for every step: no memory per step
        y, logdet = run.outputs
        run.outputs = None
        if run.index == relay.num_steps - 1:
            relay.tensor, relay.next_step = y, run.index
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
        run, relay = ctx.run, ctx.relay
        y = relay.take(run.index)
        context = None
        if ctx.has_context:
            context = ctx.saved_tensors[0].detach().requires_grad_(ctx.needs_input_grad[3])
        with run.state.replayed() as rng, torch.enable_grad():
            out = run.inverse_vjp(y, grad_y, grad_logdet, context, rng)
        x, grad_x, param_grads, grad_context = checked_vjp_result(out, run.step, run.index, y, ctx.has_context)
        relay.hand_down(run.index, x.detach())
        if grad_context is not None:
            grad_context = grad_context.to(context.dtype)
        grads = [param_grads.get(p) if p.requires_grad else None for p in run.params]
        grads += [param_grads.get(t) for t in run.unregistered]
        return (None, None, grad_x, grad_context, *grads)


class _StepNotes:
    """What the reversible forwards so far have shown of one step (None: not seen yet): whether it uses tensors that
    require grad without registering them (then every forward looks for them again; see revglow.engine.unregistered)
    and whether it draws random numbers (then every forward records the RNG state per module call; see
    revglow.engine.replay)."""

    __slots__ = ("step_id", "uses_unregistered", "draws_random")

    def __init__(self, step: nn.Module):
        self.step_id = id(step)
        self.uses_unregistered: Optional[bool] = None
        self.draws_random: Optional[bool] = None


class _StepRun:
    """One step's forward in the reversible mode, run before its Function (which only hands the outputs on) so
    that the tensors the step uses without registering them can be among the Function's inputs; and its backward."""

    def __init__(self, step: nn.Module, index: int, x: Tensor, context: Optional[Tensor], preserve_rng_state: bool,
                 notes: _StepNotes):
        self.step, self.index = step, index
        # One walk of the step's modules per forward gives both its parameters and the modules whose buffers to
        # watch (Module.parameters() and .modules() walk them again each: ~20 generator walks a Glow step).
        modules = list(step.modules())
        self.params: List[Tensor] = _parameters_of(modules)
        self.state = ForwardState(step, x.device, preserve_rng_state, per_call_rng=notes.draws_random is not False,
                                  modules=modules)
        finder = None
        if notes.uses_unregistered is not False:
            finder = UnregisteredTensors([x] + ([context] if context is not None else []) + self.params)
        with torch.no_grad():
            with self.state.captured(), (finder or contextlib.nullcontext()):
                self.outputs: Optional[Tuple[Tensor, Tensor]] = call_step(step, index, x, context)
            if self.state.needs_rerun:   # it drew random numbers after all: again, recording them per call
                with self.state.recaptured():
                    self.outputs = call_step(step, index, x, context)
        self.unregistered: List[Tensor] = finder.found if finder is not None else []
        if finder is not None:
            notes.uses_unregistered = bool(self.unregistered)
        if self.state.drew_random_numbers is not None:
            notes.draws_random = self.state.drew_random_numbers

    def inverse_vjp(self, y: Tensor, grad_y: Tensor, grad_logdet: Tensor, context: Optional[Tensor],
                    rng: Optional[ModuleCallRng]):
        step = self.step
        if self.unregistered or replays_forward(step):
            return inverse_vjp_by_replay(step, y, grad_y, grad_logdet, context, rng.new_pass if rng else None,
                                         self.index, extra_inputs=self.unregistered)
        if context is None:
            return step.inverse_vjp(y, grad_y, grad_logdet)
        return step.inverse_vjp(y, grad_y, grad_logdet, context)


def _parameters_of(modules: List[nn.Module]) -> List[Tensor]:
    """What Module.parameters() yields for the module whose .modules() are `modules`: each parameter once, in
    that order."""
    seen, params = set(), []
    for module in modules:
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


class _BackwardRelay:
    """Hands tensors between the per-step Functions of one forward pass, in backward: the last step takes the
    sequence's output, every step leaves its rebuilt input here for the step below, and the lowest step that
    runs a backward checks its rebuilt input against the fingerprint taken at forward."""

    def __init__(self, sequence: ReversibleSequence, num_steps: int, tol: float):
        self.sequence = sequence
        self.num_steps = num_steps
        self.tol = tol                         # of the reconstruction check
        self.first_live: Optional[int] = None  # lowest step whose Function gets a backward
        self.fingerprint: Optional[Fingerprint] = None
        self.tensor: Optional[Tensor] = None
        self.version: Optional[int] = None
        self.next_step: Optional[int] = None   # index of the step whose backward may run next
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
        if self.first_live is not None and index > self.first_live:
            self.tensor, self.version, self.next_step = rebuilt_input, None, index - 1
            return
        self.consumed, self.tensor = True, None
        if self.fingerprint is not None:
            errors = self.fingerprint.relative_error(rebuilt_input)
            self.fingerprint = None
            self.sequence._report_reconstruction(errors, self.tol)


def _checkpointed(step: nn.Module, index: int, x: Tensor, context: Optional[Tensor], preserve_rng_state: bool):
    """One step under torch.utils.checkpoint, whose recomputation repeats the forward call for call (so restoring
    the RNG state once replays every random number); the recomputation leaves the step's buffers as the forward
    left them (running statistics updated once)."""
    changes = BufferChanges(step)
    calls = [0]

    def run(x, context):
        calls[0] += 1
        if calls[0] == 1:
            with changes.watching():
                return call_step(step, index, x, context)
        with BuffersKept(changes.buffers):   # exits also when checkpoint stops the recomputation early
            return call_step(step, index, x, context)

    return torch.utils.checkpoint.checkpoint(run, x, context, use_reentrant=False,
                                             preserve_rng_state=preserve_rng_state)
