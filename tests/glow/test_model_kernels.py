"""The whole model with kernels="triton" against kernels="torch": same log_prob and gradients, in the
reversible and autograd memory modes (CPU tensors under the Triton interpreter, or CUDA when
REVGLOW_TEST_DEVICE=cuda / a GPU is present)."""
import pytest
import torch

from flow_checks import flat_grads, perturb_
from kernel_utils import kernel_device, rel_err
from revglow import Glow, GlowConfig


def _pair(memory, coupling, device):
    models = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = GlowConfig(image_shape=(3, 8, 8), levels=2, depth=2, hidden=16, coupling=coupling,
                         memory=memory, kernels=kernels)
        models[kernels] = Glow(cfg).to(device)
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, device=device)
    models["torch"].initialize(x)
    perturb_(models["torch"].cpu(), std=0.05)
    models["torch"].to(device)
    models["triton"].load_state_dict(models["torch"].state_dict())
    return models, x


@pytest.mark.parametrize("memory,coupling", [("reversible", "affine"), ("autograd", "affine"),
                                             ("reversible", "additive")])
def test_model_triton_matches_torch(memory, coupling):
    device = kernel_device()
    models, x = _pair(memory, coupling, device)
    results = {}
    for kernels, model in models.items():
        torch.manual_seed(1)
        xc = model.preprocess(x)
        log_prob = model.log_prob(xc)
        log_prob.mean().backward()
        results[kernels] = (log_prob.detach(), flat_grads(model), model.decode(model.encode(xc)), xc)
    lp_t, g_t, rec_t, xc_t = results["triton"]
    lp_r, g_r, rec_r, _ = results["torch"]
    assert rel_err(lp_t, lp_r) < 1e-5
    assert rel_err(g_t, g_r) < 1e-4
    assert rel_err(rec_t, xc_t) < 1e-5


def test_model_triton_under_bf16_autocast_matches_torch():
    """Coupling networks in bf16, flow state in float32: the kernels read bf16 h and compute in float32."""
    device = kernel_device()
    models, x = _pair("reversible", "affine", device)
    results = {}
    for kernels, model in models.items():
        torch.manual_seed(1)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x).mean()
        loss.backward()
        results[kernels] = (loss.detach(), flat_grads(model))
    assert rel_err(results["triton"][0], results["torch"][0]) < 1e-4
    assert rel_err(results["triton"][1], results["torch"][1]) < 1e-3


def test_coupling_writes_its_output_in_place_outside_autograd():
    """Under no_grad the Triton path writes ya into the output tensor instead of concatenating."""
    from revglow.glow.layers.coupling import Coupling

    device = kernel_device()
    torch.manual_seed(0)
    layer = Coupling(6, 8, "affine", kernels="triton").to(device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    reference = Coupling(6, 8, "affine", kernels="torch").to(device)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 5, 3, device=device)
    with torch.no_grad():
        y, logdet = layer(x)
        y_ref, logdet_ref = reference(x)
        x_back, _ = layer.inverse(y)
    assert y.is_contiguous()
    assert rel_err(y, y_ref) < 1e-6 and rel_err(logdet, logdet_ref) < 1e-6
    assert rel_err(x_back, x) < 1e-6
