"""torch.compile for the work inside a flow step, while the reversible engine stays eager.

The compiled units are pure functions of tensors (the coupling network with its weights as arguments, the
elementwise coupling, the fused ActNorm + 1x1 references), never modules: dynamo then guards on shapes,
dtypes and grad mode only, so the K steps of a level share one compiled graph instead of compiling once per
module instance (which is what hits the recompile limit when a whole Glow is compiled). Shapes are
"automatic dynamic": a unit compiles for the first shape it sees, and a second shape recompiles it once with
dynamic sizes, which then serves every level and batch size.

REVGLOW_COMPILE_BACKEND picks the torch.compile backend (default "inductor"; the tests use "eager", which
traces the same graphs without generating code).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

import torch

__all__ = ["compiled", "maybe_compiled", "compile_backend"]

_COMPILED: Dict[Tuple[Callable, str], Callable] = {}


def compile_backend() -> str:
    return os.environ.get("REVGLOW_COMPILE_BACKEND", "inductor")


def compiled(fn: Callable) -> Callable:
    """`fn` under torch.compile, one compiled wrapper per function and backend for the whole process."""
    key = (fn, compile_backend())
    wrapper = _COMPILED.get(key)
    if wrapper is None:
        wrapper = _without_grad_flags(torch.compile(fn, backend=key[1], dynamic=None, fullgraph=True))
        _COMPILED[key] = wrapper
    return wrapper


def _without_grad_flags(compiled_fn: Callable) -> Callable:
    """Outside grad mode, hand the compiled function detached tensors: whether an input requires grad is
    guarded on, and in the engine's no-grad forward the first step's input does not while the others do, which
    would otherwise compile the same work twice for nothing."""

    def call(*args):
        if not torch.is_grad_enabled():
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        return compiled_fn(*args)

    return call


def maybe_compiled(fn: Callable, enabled: bool) -> Callable:
    return compiled(fn) if enabled else fn
