"""Choosing the torch reference or the Triton kernels for a fused op: the choice, REVGLOW_KERNELS, and the
self-check that kernels="auto" runs before it trusts the kernels on a device."""
import os
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

try:
    from kernel_utils import kernel_device
except ImportError:  # tests/ imported as a package
    from tests.kernel_utils import kernel_device

from revglow.ops.dispatch import (KernelFallbackWarning, resolve_backend, treat_as_kernel_device,
                                  triton_unavailable_reason)
from revglow.ops.verify import ELEMENTWISE_TOL, LAUNCHERS, verify_triton_kernels


def test_torch_is_always_torch_and_auto_is_torch_on_the_cpu():
    x = torch.randn(2, 4, 3, 3)
    assert resolve_backend("torch", x) == "torch"
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("auto", x.double()) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    x = torch.randn(2, 4, 3, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_takes_triton_for_float32_cuda_tensors_only():
    x = torch.randn(2, 4, 3, 3, device="cuda")
    assert resolve_backend("auto", x) == "triton"
    assert resolve_backend("auto", x.double()) == "torch"


def test_unknown_choice():
    with pytest.raises(ValueError, match="kernels='cuda'"):
        resolve_backend("cuda", torch.zeros(1))


# ----------------------------------------------------------------------------------------------------------
# REVGLOW_KERNELS


def test_environment_variable_overrides_the_choice(monkeypatch):
    pytest.importorskip("triton")
    x = torch.randn(2, 4, 3, 3)
    monkeypatch.setenv("REVGLOW_KERNELS", "torch")
    assert resolve_backend("triton", x) == "torch"
    assert resolve_backend("auto", x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("REVGLOW_KERNELS", "triton")
    assert resolve_backend("torch", x) == "triton"
    assert resolve_backend("auto", x) == "triton"
    # Forced Triton keeps the errors of kernels="triton".
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("torch", x)
    monkeypatch.setenv("REVGLOW_KERNELS", "")  # set but empty: no override
    assert resolve_backend("torch", x) == "torch"


@pytest.mark.parametrize("value", ["cuda", "auto", "Torch", " torch"])
def test_unknown_environment_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("REVGLOW_KERNELS", value)
    with pytest.raises(ValueError, match=f"REVGLOW_KERNELS={value!r}"):
        resolve_backend("torch", torch.zeros(1))
    # Still refused on the next call: a bad value is not cached as "no override".
    with pytest.raises(ValueError, match="REVGLOW_KERNELS"):
        resolve_backend("auto", torch.zeros(1))


# ----------------------------------------------------------------------------------------------------------
# The self-check of kernels="auto", run on the CPU under the Triton interpreter (on CUDA when the kernel tests
# run there), with the real kernels and with deliberately broken ones.


@pytest.fixture
def device():
    return kernel_device()


def _kernels(**replaced):
    """A kernels module: the real launchers of revglow.kernels, with `replaced` swapped in, each call counted."""
    import revglow.kernels

    calls = Counter()

    def counted(name, fn):
        def launcher(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return launcher

    module = SimpleNamespace(**{name: counted(name, replaced.get(name, getattr(revglow.kernels, name)))
                                for name in LAUNCHERS})
    module.calls = calls
    return module


def _broken_kernels():
    """Test-only Triton kernels with a defect: one computes a wrong result, one fails to compile."""
    import triton
    import triton.language as tl

    @triton.jit
    def coupling_forward_without_shift_kernel(
        XA,  # [N, Ca, H, W] float32, contiguous
        H,  # [N, 2*Ca, H, W] contiguous
        YA,  # [N, Ca, H, W] float32 out
        NUMEL,  # Ca * H * W
        BLOCK: tl.constexpr,
    ):
        # The defect: ya = xa * s, the shift half of h is never added.
        n = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < NUMEL
        xa = tl.load(XA + n * NUMEL + offs, mask=mask, other=0.0)
        raw = tl.load(H + n * 2 * NUMEL + NUMEL + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(YA + n * NUMEL + offs, xa * tl.sigmoid(raw + 2.0), mask=mask)

    def coupling_forward_without_shift(xa, h, out=None):
        xa, h = xa.contiguous(), h.contiguous()
        ya = torch.empty_like(xa)
        numel = xa[0].numel()
        coupling_forward_without_shift_kernel[(triton.cdiv(numel, 64), xa.shape[0])](xa, h, ya, numel, BLOCK=64)
        logdet = torch.nn.functional.logsigmoid(h[:, xa.shape[1]:].float() + 2.0).flatten(1).sum(1)
        if out is not None:
            ya = out.copy_(ya)
        return ya, logdet

    @triton.jit
    def not_compiling_kernel(X, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)  # the defect: BLOCK = 12, and tl.arange needs a power of two
        tl.store(X + offs, tl.load(X + offs) * 2.0)

    def actnorm_backward_not_compiling(y, grad_y, scale, bias, weight, weight_inv, return_input=True):
        not_compiling_kernel[(1,)](y, BLOCK=12)
        raise AssertionError("the kernel above must not compile")

    return coupling_forward_without_shift, actnorm_backward_not_compiling


def test_self_check_reports_a_wrong_result_and_a_failed_compile(device):
    wrong, not_compiling = _broken_kernels()
    ok, reason = verify_triton_kernels(device, _kernels(coupling_affine_forward_launch=wrong))
    assert not ok
    assert reason.startswith("coupling_affine forward (h float32) ya: normwise relative error"), reason

    ok, reason = verify_triton_kernels(device, _kernels(actnorm_conv1x1_reversible_backward_launch=not_compiling))
    assert not ok
    assert reason.startswith("actnorm_conv1x1 reversible backward (C=6) raised"), reason
    assert "power of 2" in reason


def test_self_check_sees_an_error_in_one_element(device):
    import revglow.kernels

    def off_in_the_last_pixel(x, scale, bias, weight):
        y = revglow.kernels.actnorm_conv1x1_forward_launch(x, scale, bias, weight)
        # 3e-4 of the largest value, in one of 420 elements: the normwise error stays below its bound.
        y[-1, -1, -1, -1] += 3e-4 * y.abs().max()
        return y

    ok, reason = verify_triton_kernels(device, _kernels(actnorm_conv1x1_forward_launch=off_in_the_last_pixel))
    assert not ok
    assert reason.startswith("actnorm_conv1x1 forward (C=6) y: element (1, 5, 4, 6) off by 3.0"), reason
    assert f"> {ELEMENTWISE_TOL:.0e}" in reason


def test_real_kernels_pass_the_self_check_which_leaves_rng_autocast_and_grad_mode_alone(device):
    state = torch.get_rng_state()
    with torch.enable_grad():
        ok, reason = verify_triton_kernels(device)
        assert torch.is_grad_enabled()
    assert ok, reason
    assert "15 checks passed" in reason
    assert torch.equal(torch.get_rng_state(), state)


def test_auto_uses_kernels_that_pass(device):
    kernels = _kernels()
    x = torch.randn(2, 4, 3, 3, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no KernelFallbackWarning, nor any other
        with treat_as_kernel_device(device, kernels):
            assert resolve_backend("auto", x) == "triton"
            checked = sum(kernels.calls.values())
            assert checked > 0
            assert resolve_backend("auto", torch.randn(1, 48, 4, 4, device=device)) == "triton"
            assert resolve_backend("auto", x.double()) == "torch"
            assert sum(kernels.calls.values()) == checked  # checked once, not per call


@pytest.mark.parametrize("defect", ["wrong result", "compile error"])
def test_auto_falls_back_to_torch_once_per_device(device, defect):
    from revglow.glow.layers.flowstep import FlowStep

    wrong, not_compiling = _broken_kernels()
    kernels = (_kernels(coupling_affine_forward_launch=wrong) if defect == "wrong result"
               else _kernels(actnorm_conv1x1_reversible_backward_launch=not_compiling))
    x = torch.randn(2, 4, 3, 3, device=device)
    with treat_as_kernel_device(device, kernels):
        with pytest.warns(KernelFallbackWarning) as record:
            assert resolve_backend("auto", x) == "torch"
        assert len(record) == 1
        message = str(record[0].message)
        expected = ("coupling_affine forward (h float32) ya: normwise relative error" if defect == "wrong result"
                    else "actnorm_conv1x1 reversible backward (C=6) raised")
        assert f"self-check on {device} ({expected}" in message, message
        assert "REVGLOW_KERNELS=torch" in message
        checked = sum(kernels.calls.values())

        # From now on: the torch reference, with neither a second check nor a second warning.
        step = FlowStep(4, hidden=8, kernels="auto").to(device)
        reference = FlowStep(4, hidden=8, kernels="torch").to(device)
        reference.load_state_dict(step.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert resolve_backend("auto", x) == "torch"
            y, logdet = step(x)
        y_ref, logdet_ref = reference(x)
        assert torch.equal(y, y_ref) and torch.equal(logdet, logdet_ref)  # bit for bit: the same torch ops
        assert sum(kernels.calls.values()) == checked
    # Leaving the block forgets the device: the CPU is no kernel device for "auto" again.
    if device.type == "cpu":
        assert resolve_backend("auto", x) == "torch"


def test_environment_override_skips_the_self_check(device, monkeypatch):
    wrong, _ = _broken_kernels()
    kernels = _kernels(coupling_affine_forward_launch=wrong)
    monkeypatch.setenv("REVGLOW_KERNELS", "torch")
    with treat_as_kernel_device(device, kernels), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", torch.randn(2, 4, 3, 3, device=device)) == "torch"
    assert sum(kernels.calls.values()) == 0


# ----------------------------------------------------------------------------------------------------------
# Where revglow.kernels comes from


def test_a_checkout_used_without_installation_finds_its_kernels(tmp_path):
    # revglow/ and kernels/ copied as a checkout has them, put on sys.path by PYTHONPATH alone: revglow.kernels must
    # be the copy's kernels/ (not the folder an installation of this repository maps the name to).
    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[2]
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("revglow", "kernels"):
        shutil.copytree(repo / folder, tmp_path / folder, ignore=ignore)
    code = ("import torch, revglow.kernels\n"
            "from revglow.kernels.actnorm_conv1x1 import actnorm_conv1x1_forward_launch\n"
            "from revglow.ops.dispatch import resolve_backend, triton_unavailable_reason\n"
            "print(revglow.__file__); print(revglow.kernels.__file__); print(triton_unavailable_reason())\n"
            "print(resolve_backend('triton', torch.zeros(1)))\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    package, kernels, reason, backend = run.stdout.split("\n")[:4]
    assert package == str(tmp_path / "revglow" / "__init__.py")
    assert kernels == str(tmp_path / "kernels" / "__init__.py")
    assert (reason, backend) == ("None", "triton")


def test_auto_says_why_when_the_kernels_do_not_import(monkeypatch):
    # Triton imports but revglow.kernels does not (a broken installation): kernels="auto" warns with the reason
    # instead of running torch silently, and kernels="triton" names it too.
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "revglow.kernels", None)   # `import revglow.kernels` now fails
    reason = triton_unavailable_reason()
    assert reason is not None and "revglow's kernels do not" in reason and "kernels/" in reason
    x = torch.randn(2, 4, 3, 3)
    with treat_as_kernel_device("cpu"):
        with pytest.warns(KernelFallbackWarning, match="revglow's kernels do not"):
            assert resolve_backend("auto", x) == "torch"
    with pytest.raises(RuntimeError, match="revglow's kernels do not"):
        resolve_backend("triton", x)
