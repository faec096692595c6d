"""The four ways of training a Glow model that the memory sweeps compare, and one measurement of each.

- "reversible", "checkpoint", "autograd": GlowConfig.memory, the engine's own modes (checkpoint: every flow step
  under torch.utils.checkpoint, so each step's input is stored and the step recomputed in backward);
- "segment": a BASELINE that revglow does not offer. Each level's K steps run through
  torch.utils.checkpoint.checkpoint_sequential in round(sqrt(K)) segments: the input of every segment but the
  last is stored, a segment's activations are rebuilt by running it again in backward, and the last segment
  is plain autograd (checkpoint_sequential's own rule). The classic O(sqrt(K)) memory trade-off.

Memory is counted by revglow.memory.profile's LiveStorageTracker: the tensor storage one training step allocates above
parameters, gradients and Adam state, exact and the same on every device (`activation`, the measurement of
`revglow profile` without its timing and device peak, on a model built here).

    >>> from revglow import GlowConfig
    >>> cfg = GlowConfig(image_shape=(3, 8, 8), levels=2, depth=4, hidden=8)
    >>> models = build_models(cfg, ("reversible", "segment"), batch=2)
    >>> [m.config.memory for m in models.values()]
    ['reversible', 'autograd']
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from revglow import Glow, GlowConfig, ReversibleSequence
from revglow.memory.live_storage import LiveStorageTracker

__all__ = ["MODES", "SegmentCheckpointed", "build_glow", "build_models", "example_images", "activation",
           "segments_for"]

MODES = ("reversible", "checkpoint", "segment", "autograd")
MiB = float(2 ** 20)


def segments_for(depth: int) -> int:
    """round(sqrt(K)) segments, at least one."""
    return max(1, round(math.sqrt(depth)))


class _Carry(nn.Module):
    """A flow step on (x, logdet), the single value checkpoint_sequential hands from module to module."""

    def __init__(self, step: nn.Module):
        super().__init__()
        self.step = step

    def forward(self, carry):
        x, logdet = carry
        y, ld = self.step(x)
        return y, logdet + ld


class SegmentCheckpointed(nn.Module):
    """A ReversibleSequence's steps trained through checkpoint_sequential in `segments` segments (default
    round(sqrt(K))); inverse is the sequence's own. Unconditional steps only (no context)."""

    def __init__(self, flow: ReversibleSequence, segments: Optional[int] = None):
        super().__init__()
        self.flow = flow
        self.flow.memory = "autograd"      # its own forward (no grad: sampling, initialization) stays plain
        self.segments = segments or segments_for(len(flow.steps))
        self.carries = nn.ModuleList(_Carry(step) for step in flow.steps)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None):
        if context is not None:
            raise NotImplementedError("the segment-checkpointing baseline takes no context")
        if not torch.is_grad_enabled():
            return self.flow(x)
        logdet = x.new_zeros(x.shape[0])
        return checkpoint_sequential(list(self.carries), self.segments, (x, logdet), use_reentrant=False)

    def inverse(self, y: torch.Tensor, context: Optional[torch.Tensor] = None):
        return self.flow.inverse(y, context)


def engine_mode(mode: str) -> str:
    """The GlowConfig.memory a mode runs its ReversibleSequences in."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    return "autograd" if mode == "segment" else mode


def build_glow(config: GlowConfig, mode: str) -> Glow:
    """A Glow model of `config` trained in `mode` (one of MODES). Not initialized."""
    model = Glow(replace(config, memory=engine_mode(mode)))
    if mode == "segment":
        # Level is the module Glow calls; the model's flows (and its state_dict keys) stay as they are.
        for level in model.levels:
            level.flow = SegmentCheckpointed(level.flow)
    return model


def example_images(config: GlowConfig, batch: int, seed: int = 0) -> torch.Tensor:
    c, h, w = config.image_shape
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, c, h, w), generator=g, dtype=torch.uint8)


def build_models(config: GlowConfig, modes: Sequence[str], batch: int, device: str = "cpu") -> Dict[str, Glow]:
    """One model per mode with identical weights, ActNorm initialized on one batch of random images."""
    models: Dict[str, Glow] = {}
    state = None
    for mode in modes:
        model = build_glow(config, mode).to(device)
        if state is None:
            model.initialize(example_images(config, max(2, batch)).to(device))
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        models[mode] = model
    return models


def _line(points: Sequence[Tuple[int, float]]) -> Tuple[float, float]:
    """Least-squares (intercept, slope) of memory against batch; through the origin for a single point."""
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    mean_b = sum(b for b, _ in points) / len(points)
    mean_m = sum(m for _, m in points) / len(points)
    slope = (sum((b - mean_b) * (m - mean_m) for b, m in points) / sum((b - mean_b) ** 2 for b, _ in points))
    return mean_m - slope * mean_b, slope


def activation(model: Glow, mode: str, batch_sizes: Sequence[int], device: str = "cpu", top: int = 3,
               labels: bool = False) -> Dict:
    """Activation memory of one training step (forward, backward of the mean bits/dim, Adam) of `model` in
    `mode`, counted by LiveStorageTracker after a warm-up step, as revglow.memory.profile does
    (parameters, gradients and Adam state exist before the counted step and are not in the count).

    Returns activation_mib (at the largest batch), points [{batch, activation_mib}], activation_mib_per_sample
    and activation_mib_fixed (the line through the points), params_mib, grads_mib, optimizer_mib and the
    largest tensors alive at the peak (`labels`: with the module that made them, which costs time per op)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(x):
        optimizer.zero_grad(set_to_none=False)
        model(x).mean().backward()
        optimizer.step()

    points, at_peak = [], []
    for i, batch in enumerate(sorted(batch_sizes)):
        x = example_images(model.config, batch).to(device)
        if i == 0:
            # Warm-up, once: gradients, Adam state and the engine's caches (keyed by the sample's shape, not the
            # batch's) exist from here on, so larger batches count the same (checked against profile()).
            step(x)
        with LiveStorageTracker(model if labels else None, top=top) as tracker:
            step(x)
        points.append({"batch": batch, "activation_mib": tracker.peak / MiB})
        at_peak = [{"mib": n / MiB, "tensor": label} for n, label in tracker.at_peak]
    intercept, slope = _line([(p["batch"], p["activation_mib"]) for p in points])
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts) / MiB  # noqa: E731
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"mode": mode, "activation_mib": points[-1]["activation_mib"], "points": points,
            "activation_mib_per_sample": slope, "activation_mib_fixed": intercept if len(points) > 1 else None,
            "params_mib": size(params), "grads_mib": size([p.grad for p in params if p.grad is not None]),
            "optimizer_mib": size(state), "live_at_peak": at_peak}
