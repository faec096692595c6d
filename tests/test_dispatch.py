"""Choosing the torch reference or the Triton kernels for a fused op."""
import pytest
import torch

from revglow.ops.dispatch import resolve_backend


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
