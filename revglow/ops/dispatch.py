"""Choosing between the pure-PyTorch reference and the Triton kernels for a fused op.

`kernels="auto"` takes Triton on a device only after the kernels have passed a self-check there
(`revglow.ops.verify.verify_triton_kernels`), run once per device and process on first use; a failure warns
once (`KernelFallbackWarning`) and that device runs the torch reference from then on. The environment
variable REVGLOW_KERNELS ("torch" or "triton") overrides every `kernels=` choice.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch

__all__ = ["resolve_backend", "triton_available", "triton_unavailable_reason", "KernelFallbackWarning", "ENV_VAR", "treat_as_kernel_device"]

ENV_VAR = "REVGLOW_KERNELS"
_CHOICES = ("auto", "torch", "triton")
_ENV_CHOICES = ("torch", "triton")


class KernelFallbackWarning(RuntimeWarning):
    """kernels="auto" found the Triton kernels failing on a device and uses the torch reference there."""


def triton_available() -> bool:
    """Whether Triton and the revglow.kernels launchers import (`triton_unavailable_reason` says why not)."""
    return triton_unavailable_reason() is None


def triton_unavailable_reason() -> Optional[str]:
    """None when Triton and revglow.kernels import; else why the Triton path is unavailable, in a sentence."""
    return _import_failure()[1]


def _import_failure() -> Tuple[Optional[str], Optional[str]]:
    """(what fails to import, "triton" or "kernels", or None; why)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that fails at import on this machine
        return "triton", f"Triton does not import ({type(exc).__name__}: {exc})"
    try:
        import revglow.kernels  # noqa: F401
    except Exception as exc:
        return "kernels", (f"Triton imports but revglow's kernels do not ({type(exc).__name__}: {exc}); "
                           f"revglow.kernels is the repository's kernels/ folder, installed by `pip install .` "
                           f"(or -e), or found beside the revglow/ folder of a checkout on sys.path")
    return None, None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# REVGLOW_KERNELS is read on every call (so a test, or a process that sets it late, is obeyed), but validated
# once per distinct value: raw value -> the override it means (None: no override).
_ENV_OVERRIDES: Dict[Optional[str], Optional[str]] = {None: None, "": None}


def _env_override() -> Optional[str]:
    raw = os.environ.get(ENV_VAR)
    try:
        return _ENV_OVERRIDES[raw]
    except KeyError:
        pass
    if raw not in _ENV_CHOICES:
        raise ValueError(f"environment variable {ENV_VAR}={raw!r} is not a known option; set it to 'torch' (the "
                         f"reference everywhere) or 'triton' (the kernels everywhere), or unset it")
    _ENV_OVERRIDES[raw] = raw
    return raw


# The backend kernels="auto" chose per device, decided on first use and then only looked up: the self-check
# and any warning happen once per device and process, and the per-call cost after that is one dict lookup.
_AUTO_BACKEND: Dict[torch.device, str] = {}
# Devices other than CUDA ones that kernels="auto" treats as kernel devices (tests, under the interpreter),
# and the kernels module to check on each of them (None: revglow.kernels). Set by treat_as_kernel_device.
_KERNEL_DEVICES: Dict[torch.device, object] = {}
_AUTO_LOCK = threading.Lock()  # two threads meeting a new device run the check once between them


def _decide_auto(device: torch.device) -> str:
    with _AUTO_LOCK:
        if device in _AUTO_BACKEND:
            return _AUTO_BACKEND[device]
        kernel_device = device.type == "cuda" or device in _KERNEL_DEVICES
        failing, reason = _import_failure() if kernel_device else (None, None)
        if not kernel_device:
            backend = "torch"
        elif failing is not None:
            backend = "torch"
            # No Triton installed is a supported set-up, not a failure: no warning. Triton without revglow's
            # kernels is a broken installation, which would otherwise go unnoticed.
            if failing == "kernels":
                warnings.warn(f"revglow: kernels='auto' uses the torch reference on {device}: {reason}",
                              KernelFallbackWarning, stacklevel=3)
        else:
            from revglow.ops.verify import verify_triton_kernels
            ok, reason = verify_triton_kernels(device, _KERNEL_DEVICES.get(device))
            backend = "triton" if ok else "torch"
            if not ok:
                warnings.warn(
                    f"revglow: the Triton kernels failed their self-check on {device} ({reason}); kernels='auto' "
                    f"uses the torch reference on {device} from now on in this process. {ENV_VAR}=torch skips "
                    f"the kernels (and this check); {ENV_VAR}=triton forces them.",
                    KernelFallbackWarning, stacklevel=3)
        _AUTO_BACKEND[device] = backend
        return backend


def resolve_backend(kernels: str, tensor: torch.Tensor) -> str:
    """Map a `GlowConfig.kernels` choice and the tensor it will run on to "torch" or "triton".

    "auto" takes Triton when the tensor is float32 on CUDA, Triton imports, and the kernels passed their
    self-check on that device (run on first use, once per device and process; on failure a
    KernelFallbackWarning names the op and the error, and the device keeps the torch reference); else the
    torch reference (the kernels keep flow tensors in float32: a float64 model runs the reference).
    "triton" forces Triton (on the CPU only under TRITON_INTERPRET=1); "torch" never uses Triton.
    The environment variable REVGLOW_KERNELS=torch|triton overrides `kernels`.

    Example:
        >>> resolve_backend("auto", torch.zeros(2, 4, 3, 3, dtype=torch.float64))
        'torch'
    """
    if kernels not in _CHOICES:
        raise ValueError(f"kernels={kernels!r} is not a known option; choose 'auto', 'torch' or 'triton'")
    kernels = _env_override() or kernels
    if kernels == "torch":
        return "torch"
    if kernels == "auto":
        if tensor.dtype != torch.float32:
            return "torch"
        device = tensor.device
        backend = _AUTO_BACKEND.get(device)
        return backend if backend is not None else _decide_auto(device)
    reason = triton_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"kernels='triton' was asked for, but the Triton path is unavailable: {reason}")
    if not tensor.is_cuda and not _interpreting():
        raise RuntimeError(
            "kernels='triton' was asked for with CPU tensors: Triton runs on the CPU only under the "
            "interpreter (set TRITON_INTERPRET=1 before importing triton), or use kernels='torch'/'auto'")
    return "triton"


@contextlib.contextmanager
def treat_as_kernel_device(device, kernels_module=None) -> Iterator[None]:
    """Within the block, kernels="auto" treats `device` as it treats a CUDA device, checking `kernels_module`
    (default revglow.kernels) there on first use.

    For tests: with device "cpu" under TRITON_INTERPRET=1 the whole auto path (self-check, warning, fallback,
    cache) runs on a machine without a GPU; a CUDA device with a deliberately broken kernels module tests the
    fallback on a GPU. The device's cached decision is forgotten on entry and on exit.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _AUTO_LOCK:
        _KERNEL_DEVICES[device] = kernels_module
        _AUTO_BACKEND.pop(device, None)
    try:
        yield
    finally:
        with _AUTO_LOCK:
            _KERNEL_DEVICES.pop(device, None)
            _AUTO_BACKEND.pop(device, None)
