"""Re-using the inverse's network calls in the generic reversible backward (opt-in per block).

The generic backward of a block with only `forward` and `inverse` inverts (running the block's networks once),
then replays the forward under autograd (running them again) and differentiates. For a coupling block the
replay calls each network on exactly the tensors the inverse already called it on (x_b = y_b, or y1 in a
two-network block), so the second run is waste. A block that sets the class attribute

    reuse_inverse_computations = True

lets the engine record, during the inverse, the calls of its direct child modules with autograd on (inputs as
leaves); when the replayed forward calls the same child again, its n-th call gets the n-th recorded output,
handed back through `_ReusedCall`, whose backward differentiates the recorded graph. Each network then runs once
in the backward, as in a block with a hand-written `inverse_vjp`.

What opting in promises: the forward calls each child on the values the inverse called it on, in the same
order per child (true of coupling blocks, whose networks see the untouched half). Calls are matched by child
and order with shapes and dtypes checked, not values (comparing values would wait on the device); a call with
keyword arguments, non-tensor inputs or outputs, or another shape simply runs as usual.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["ChildCallMemo", "reuses_inverse"]

Tensor = torch.Tensor


def reuses_inverse(step: nn.Module) -> bool:
    return bool(getattr(step, "reuse_inverse_computations", False))


class _Record:
    __slots__ = ("inputs", "output", "params", "used")

    def __init__(self, inputs: List[Tensor], output: Tensor, params: List[nn.Parameter]):
        self.inputs, self.output, self.params, self.used = inputs, output, params, False


class _ReusedCall(torch.autograd.Function):
    """Output of a recorded child call, attached to the replay's inputs and the child's parameters."""

    @staticmethod
    def forward(ctx, record: _Record, *inputs_and_params):
        ctx.record = record
        return record.output.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        record = ctx.record
        wanted = record.inputs + record.params
        grads = torch.autograd.grad(record.output, wanted, grad_output, allow_unused=True)
        return (None,) + tuple(grads)


class ChildCallMemo:
    """`with memo.recording():` runs the inverse; `with memo.replaying():` runs the forward replay."""

    def __init__(self, step: nn.Module):
        self.children = [child for _, child in step.named_children()]
        self.records: Dict[int, List[_Record]] = {}
        self._saved: List[Tuple[nn.Module, object]] = []

    # Instance-level forward overrides: nn.Module.__call__ looks `forward` up on the instance first.
    def _patch(self, make_forward) -> None:
        for child in self.children:
            original = child.forward
            self._saved.append((child, child.__dict__.get("forward")))
            child.forward = make_forward(child, original)

    def _unpatch(self) -> None:
        for child, previous in reversed(self._saved):
            if previous is None:
                del child.forward
            else:
                child.forward = previous
        self._saved = []

    def recording(self):
        memo = self

        def make_forward(child, original):
            def forward(*args, **kwargs):
                if kwargs or not args or not all(isinstance(a, Tensor) and a.is_floating_point() for a in args):
                    return original(*args, **kwargs)
                leaves = [a.detach().requires_grad_(True) for a in args]
                with torch.enable_grad():
                    out = original(*leaves)
                if not isinstance(out, Tensor) or not out.requires_grad:
                    return out.detach() if isinstance(out, Tensor) else out
                params = [p for p in child.parameters() if p.requires_grad]
                memo.records.setdefault(id(child), []).append(_Record(leaves, out, params))
                return out.detach()
            return forward

        return _Patched(self, make_forward)

    def replaying(self):
        memo = self

        def make_forward(child, original):
            def forward(*args, **kwargs):
                record = None if kwargs else memo._find(child, args)
                if record is None:
                    return original(*args, **kwargs)
                record.used = True
                return _ReusedCall.apply(record, *args, *record.params)
            return forward

        return _Patched(self, make_forward)

    def _find(self, child: nn.Module, args) -> Optional[_Record]:
        # By child and order, shapes and dtypes checked: comparing values would wait on the device, and would
        # miss on purpose-built matches (y1 rebuilt as (y1 - f) + f differs from y1 in its last bits).
        for record in self.records.get(id(child), ()):
            if record.used:
                continue
            if len(record.inputs) == len(args) and all(
                    isinstance(a, Tensor) and a.shape == r.shape and a.dtype == r.dtype
                    for a, r in zip(args, record.inputs)):
                return record
            return None
        return None


class _Patched:
    def __init__(self, memo: ChildCallMemo, make_forward):
        self.memo, self.make_forward = memo, make_forward

    def __enter__(self):
        self.memo._patch(self.make_forward)
        return self.memo

    def __exit__(self, *exc):
        self.memo._unpatch()
        return False
