"""Property checks shared by the layer and model tests: round trips, brute-force log-determinants, gradients."""
from __future__ import annotations

import torch


def perturb_(module: torch.nn.Module, std: float = 0.1, seed: int = 1) -> torch.nn.Module:
    """Move every parameter away from its (often identity-like) init, so the checks see a generic map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| per sample of fn: [N, ...] -> [N, ...] (samples independent), from the full autograd Jacobian."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]

        def flat(v, shape=xi.shape):
            return fn(v.view(shape)).flatten()

        jac = torch.autograd.functional.jacobian(flat, xi.flatten())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def param_grads(module: torch.nn.Module):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([g.flatten() for g in param_grads(module)])


def autograd_vjp(outputs, inputs, grad_outputs):
    """torch.autograd.grad that skips outputs without a graph (e.g. the constant logdet of a permutation)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
