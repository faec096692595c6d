"""Choosing between the pure-PyTorch reference and the Triton kernels for a fused op."""
from __future__ import annotations

import os

import torch

__all__ = ["resolve_backend", "triton_available"]

_TRITON_IMPORT_ERROR: Exception | None = None


def triton_available() -> bool:
    """Whether Triton and the revglow.kernels launchers import."""
    global _TRITON_IMPORT_ERROR
    try:
        import triton  # noqa: F401
        import revglow.kernels  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that fails at import on this machine
        _TRITON_IMPORT_ERROR = exc
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(kernels: str, tensor: torch.Tensor) -> str:
    """Map a `GlowConfig.kernels` choice and the tensor it will run on to "torch" or "triton".

    "auto" takes Triton when the tensor is float32 on CUDA and Triton imports (the kernels keep flow tensors
    in float32; a float64 model runs the reference), else the torch reference;
    "triton" forces Triton (on the CPU only under TRITON_INTERPRET=1); "torch" never uses Triton.
    """
    if kernels == "torch":
        return "torch"
    if kernels == "auto":
        return "triton" if tensor.is_cuda and tensor.dtype == torch.float32 and triton_available() else "torch"
    if kernels == "triton":
        if not triton_available():
            raise RuntimeError(f"kernels='triton' was asked for, but Triton does not import: {_TRITON_IMPORT_ERROR}")
        if not tensor.is_cuda and not _interpreting():
            raise RuntimeError(
                "kernels='triton' was asked for with CPU tensors: Triton runs on the CPU only under the "
                "interpreter (set TRITON_INTERPRET=1 before importing triton), or use kernels='torch'/'auto'")
        return "triton"
    raise ValueError(f"kernels={kernels!r} is not a known option; choose 'auto', 'torch' or 'triton'")
