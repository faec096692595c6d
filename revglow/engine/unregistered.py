"""Tensors a step uses without owning them: what the reversible backward would otherwise leave without a gradient.

The reversible engine passes a step's parameters to its autograd Function, so autograd routes their gradients;
a tensor that requires grad but is not among them (a module shared with the step without being registered as its
submodule, a tensor the step's code reaches through a closure or a plain attribute, a tensor computed outside the
step from other parameters) would get no gradient from the reversible backward, silently. The engine finds such
tensors in the step's forward and hands them to the Function as extra inputs, so they get autograd's gradients.

How they are found: the engine's forward runs without grad, where every tensor an operation creates has
requires_grad False; so a tensor that requires grad and reaches an operation inside the step's forward came from
outside it: the step's input, its context, its parameters, or one of these. A TorchFunctionMode sees the arguments
of every operation (only while it watches: it costs a few microseconds per operation).
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["UnregisteredTensors"]

Tensor = torch.Tensor


class UnregisteredTensors(TorchFunctionMode):
    """`with UnregisteredTensors(known) as finder:` around a step's no-grad forward; then `finder.found`, the tensors
    that require grad and reached an operation but are neither in `known` (the step's input, context and
    parameters) nor created inside the forward, in the order they were first used.

    Example:
        >>> w = torch.ones(3, requires_grad=True)
        >>> layer = torch.nn.Linear(3, 3)
        >>> with torch.no_grad(), UnregisteredTensors(layer.parameters()) as finder:
        ...     _ = layer(torch.randn(2, 3)) * w
        >>> [tuple(t.shape) for t in finder.found]
        [(3,)]
    """

    def __init__(self, known: Iterable[Tensor]):
        super().__init__()
        self.known = {id(t) for t in known}
        self.created: List[Tensor] = []   # tensors made inside that require grad (a forward may enable grad)
        self._found: Dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.compiler.is_compiling():   # inside a graph dynamo traces: nothing to note, nothing to trace
            return out
        used = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        for t in used:
            if t.requires_grad and id(t) not in self.known:
                self._found.setdefault(id(t), t)
        used_ids = {id(t) for t in used}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.requires_grad and id(t) not in self.known and id(t) not in used_ids:
                # made here (held, so that its id stays its own): not a tensor from outside
                self.created.append(t)
                self.known.add(id(t))
                self._found.pop(id(t), None)
        return out

    @property
    def found(self) -> List[Tensor]:
        return list(self._found.values())
