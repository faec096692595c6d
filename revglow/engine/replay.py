"""What a step's backward replays from its forward: the autocast settings, the random numbers, the buffers.

The reversible backward runs a step's networks again (its inverse, and the replayed forward of the generic path),
later and possibly in another order than the forward did. torch.utils.checkpoint restores one RNG state before
its recomputation, which is enough when the recomputation repeats the forward call for call; an inverse does not:
TwoNetworkCoupling's runs g before f, so g would draw the dropout mask f drew in the forward. So the engine records
the RNG state before every module call inside the step's forward (a global forward pre-hook: hooks on the modules
themselves would switch off layers that take a fused path only when they carry none; keyed by the module and how
many times it was called before in the step), and in the backward restores, before the n-th call of a
module, the state recorded before its n-th call in the forward. Every module then draws the numbers it drew in the
forward, whatever order the inverse calls them in. What it covers: random numbers drawn inside module calls (a
module called several times is matched call by call, in order; a backward that calls it more often than the
forward cycles through its states, as a hand-written inverse_vjp that inverts and then replays does); numbers
drawn by the step's own code outside its submodules follow the step's state at forward, as in checkpoint.

Cost: only a step that draws random numbers pays for the states per call. Every step reads the RNG state at the
start and at the end of its forward (a 5 kB CPU state, and a CUDA device's 16 bytes) and compares them, which tells
whether it drew any: about 6 us of CPU a step in all, against ~2.5 ms for a small Glow step's forward and backward.
The sequence remembers the answer per step: a step seen to draw, or not seen yet, records a state before each module
call (~4 us a call with the global hook's overhead, one state kept per call until its backward); a step seen not to
draw records nothing more, and its backward installs no hook. When such a step draws after all (its dropout switched
on, a p raised from 0), its forward runs once more from the start state with the recording on (same random numbers,
same outputs; the buffers it changed keep the first run's values), so the replay stays exact, and the step is
recorded from then on. Recording only the calls that draw would need the same read before every call to know which
ones do; so the choice is per step, learned.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

__all__ = ["autocast_state", "autocast_dtype", "AutocastReplay", "RngState", "ModuleCallRng", "BufferChanges",
           "BuffersKept", "ForwardState"]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- autocast
def autocast_state() -> List[Tuple[str, torch.dtype]]:
    """The autocast settings of every device type that has it enabled, to replay in backward."""
    state = []
    for device_type in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device_type):
                state.append((device_type, torch.get_autocast_dtype(device_type)))
        except (RuntimeError, TypeError):  # device type unknown to this build
            continue
    return state


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs the networks in on `device` now, or None when autocast is off there."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (RuntimeError, TypeError):  # device type unknown to this build
        pass
    return None


class AutocastReplay:
    """Re-enters the autocast settings `autocast_state()` returned."""

    def __init__(self, state: Sequence[Tuple[str, torch.dtype]]):
        self.contexts = [torch.autocast(device_type=d, dtype=dt) for d, dt in state]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)
        return False


# ------------------------------------------------------------------------------------------------- RNG
def _same_state(a: Tensor, b: Tensor) -> bool:
    try:   # as bytes: ~4x faster than torch.equal on the 5 kB CPU state
        return a.numpy().tobytes() == b.numpy().tobytes()
    except (RuntimeError, TypeError):   # no numpy
        return torch.equal(a, b)


class RngState:
    """The CPU generator's state and, for a CUDA device, that device's."""

    __slots__ = ("cpu", "cuda", "device")

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def same_as(self, other: "RngState") -> bool:
        return _same_state(self.cpu, other.cpu) and (self.cuda is None or _same_state(self.cuda, other.cuda))


class ModuleCallRng:
    """The RNG states of one step's forward: at its start, and (with `per_call`) before each module call inside it
    (see the module docstring). `recording()` wraps the forward and sets `drew`; `replaying()` wraps the backward,
    whose `new_pass()` restores the start state and starts the call counts again (before the inverse, and before
    a replayed forward)."""

    def __init__(self, device: torch.device, per_call: bool):
        self.device = device
        self.per_call = per_call
        self.start = RngState(device)
        self.drew: Optional[bool] = None   # whether the forward drew random numbers (known after recording)
        self.calls: Dict[nn.Module, List[RngState]] = {}
        self._counts: Dict[nn.Module, int] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator["ModuleCallRng"]:
        handle = None
        if self.per_call:
            thread = threading.get_ident()

            def record(module: nn.Module, args) -> None:
                if threading.get_ident() == thread:   # the hook is global: other threads' modules are not ours
                    self.calls.setdefault(module, []).append(RngState(self.device))

            handle = register_module_forward_pre_hook(record)
        try:
            yield self
        finally:
            if handle is not None:
                handle.remove()
        self.drew = not RngState(self.device).same_as(self.start)
        if not self.drew:
            self.calls = {}   # nothing to replay call by call

    def recorded_again(self) -> "contextlib.AbstractContextManager[ModuleCallRng]":
        """For a forward that drew without recording per call: run it again inside this, from the start state."""
        self.per_call, self.calls = True, {}
        self.start.restore()
        return self.recording()

    def new_pass(self) -> None:
        self.start.restore()
        self._counts = {}

    @contextlib.contextmanager
    def replaying(self) -> Iterator["ModuleCallRng"]:
        """Restores the start state, and before each module call the state of its call in the forward; on exit the
        generators are back where they were on entry (the caller's RNG stream is not disturbed)."""
        caller = RngState(self.device)
        handle = None
        if self.calls:
            thread = threading.get_ident()

            def restore(module: nn.Module, args) -> None:
                states = self.calls.get(module)
                if states and threading.get_ident() == thread:
                    n = self._counts.get(module, 0)
                    self._counts[module] = n + 1
                    states[n % len(states)].restore()

            handle = register_module_forward_pre_hook(restore)
        self.new_pass()
        try:
            yield self
        finally:
            if handle is not None:
                handle.remove()
            caller.restore()


# --------------------------------------------------------------------------------------------- buffers
class BufferChanges:
    """Which buffers a step's forward changes: every buffer of each module that changed a buffer (a version counter
    moved). Whole modules, because not every in-place update moves a counter: BatchNorm's kernel updates
    running_mean and running_var without one, and only its num_batches_tracked += 1 shows that it ran in training
    mode. `with changes.watching():` around the forward; then `changes.buffers`."""

    def __init__(self, step: nn.Module, modules: Optional[Sequence[nn.Module]] = None):
        self.step = step
        self.modules = modules   # step.modules(), when the caller has walked them already
        self.buffers: List[Tensor] = []

    @contextlib.contextmanager
    def watching(self) -> Iterator["BufferChanges"]:
        # The modules' _buffers dicts directly: Module.buffers() walks named_members per module, about 30 us a
        # step for a Glow flow step, against 5 here.
        modules = self.modules if self.modules is not None else self.step.modules()
        before = [(m, [b._version for b in m._buffers.values() if b is not None]) for m in modules if m._buffers]
        yield self
        for module, versions in before:
            buffers = [b for b in module._buffers.values() if b is not None]
            if any(b._version != v for b, v in zip(buffers, versions)):
                self.buffers.extend(buffers)


class BuffersKept:
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


# ------------------------------------------------------------------------------------------ all of it
class ForwardState:
    """Everything a step's backward replays from its forward. `with state.captured():` around the forward (under
    the caller's autocast); if `state.needs_rerun` then, `with state.recaptured():` around the same forward again;
    `with state.replayed() as rng:` around the backward, where `rng.new_pass()` (rng is None when the RNG is not
    preserved) restores the forward's random numbers before each pass over the step. `per_call_rng`: record the RNG
    state before every module call (for a step that draws random numbers, or may). `modules`: step.modules(), when
    the caller has walked them already."""

    def __init__(self, step: nn.Module, device: torch.device, preserve_rng_state: bool, per_call_rng: bool = True,
                 modules: Optional[Sequence[nn.Module]] = None):
        self.autocast = autocast_state()
        self.rng = ModuleCallRng(device, per_call_rng) if preserve_rng_state else None
        self.changes = BufferChanges(step, modules)

    @contextlib.contextmanager
    def captured(self) -> Iterator["ForwardState"]:
        with self.changes.watching(), (self.rng.recording() if self.rng else contextlib.nullcontext()):
            yield self

    @property
    def drew_random_numbers(self) -> Optional[bool]:
        """Whether the forward drew random numbers; None when the RNG is not preserved (nobody looked)."""
        return None if self.rng is None else self.rng.drew

    @property
    def needs_rerun(self) -> bool:
        """The forward drew random numbers without recording the states per call."""
        return self.rng is not None and bool(self.rng.drew) and not self.rng.per_call

    @contextlib.contextmanager
    def recaptured(self) -> Iterator["ForwardState"]:
        with BuffersKept(self.changes.buffers), self.rng.recorded_again():
            yield self

    @contextlib.contextmanager
    def replayed(self) -> Iterator[Optional[ModuleCallRng]]:
        with BuffersKept(self.changes.buffers), \
                (self.rng.replaying() if self.rng else contextlib.nullcontext()), \
                AutocastReplay(self.autocast):
            yield self.rng
