"""ActNorm (paper, section 3.1): a per-channel affine map y = s * x + b with data-dependent initialization."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist
from torch import nn

from revglow.glow.config import check_logscale_factor
from revglow.errors import RevglowError
from revglow.engine.invertible import InvertibleModule
from revglow.glow.layers.pixelwise import logdet_per_sample
from revglow.ops.actnorm_conv1x1 import actnorm_inverse_reference, actnorm_reference

__all__ = ["ActNorm", "DegenerateInitError"]


class DegenerateInitError(RevglowError, ValueError):
    """Data-dependent init saw a batch that cannot set a scale: one value per channel, or zero variance."""


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the processes of an initialized torch.distributed group (identity without one), so that every
    rank initializes from the statistics of the whole global batch."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ActNorm(InvertibleModule):
    """y = exp(f * log_scale) * x + bias, per channel; logdet = H * W * f * sum(log_scale), f = `logscale_factor`.

    The log-scale is stored divided by `logscale_factor` (the reference implementation uses 3): the map and its
    initialization are the same for every factor, only the size of the steps an optimizer takes on it changes.

    On its first forward (or on `initialize_from(x)`) the scale and bias are set so that the output has zero
    mean and unit variance per channel on that batch; inside an initialized torch.distributed process group the
    statistics are those of the batches of all ranks together. Whether that has happened is the buffer
    `initialized`, which lives in the state_dict, so a loaded model never re-initializes; a Python copy of it
    (`is_initialized`) is what the forward reads, so a training step never waits on the device for it.

    Example:
        >>> layer = ActNorm(3)
        >>> y, logdet = layer(torch.randn(4, 3, 5, 5) * 2 + 1)
        >>> layer.is_initialized
        True
    """

    def __init__(self, channels: int, eps: float = 1e-6, logscale_factor: float = 1.0):
        super().__init__()
        self.logscale_factor = check_logscale_factor("ActNorm: logscale_factor", logscale_factor, allow_none=False)
        self.channels = channels
        self.eps = eps
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._is_initialized = False

    @property
    def is_initialized(self) -> bool:
        # True is final (kept in step with the buffer by initialize_from and state_dict loading). While False,
        # the buffer is asked: DDP may have broadcast rank 0's initialized buffer into this module.
        if not self._is_initialized and bool(self.initialized):
            self._is_initialized = True
        return self._is_initialized

    def reset_initialization(self) -> None:
        """Forget the data-dependent init: the next forward (or initialize_from) sets scale and bias again."""
        self.initialized.fill_(False)
        self._is_initialized = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_initialized = bool(self.initialized)

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        """Data-dependent init: zero mean, unit variance per channel of the output on this batch (all ranks')."""
        x = x.detach().to(torch.float64)
        stats = torch.stack([x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3)),
                             torch.full((x.shape[1],), x.shape[0] * x.shape[2] * x.shape[3], dtype=x.dtype,
                                        device=x.device)])
        total, total_sq, count = _all_reduce_sum(stats)
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
        n = int(count[0])
        if n < 2:
            raise DegenerateInitError(
                f"ActNorm({self.channels}) data-dependent init saw one value per channel (batch of {x.shape[0]} at "
                f"{x.shape[2]}x{x.shape[3]}): it cannot set a scale from that. Initialize on a larger batch "
                f"(model.initialize(x) with more images; on the command line, --init-batch-size)")
        flat = std <= 1e-6
        if bool(flat.any()):
            raise DegenerateInitError(
                f"ActNorm({self.channels}) data-dependent init saw zero variance in channel(s) "
                f"{flat.nonzero().flatten().tolist()[:8]} over {n} values: its scale would be 1/eps. Initialize on "
                f"a larger or more varied batch (model.initialize(x); on the command line, --init-batch-size)")
        log_scale = -torch.log(std + self.eps)
        self.log_scale.copy_((log_scale / self.logscale_factor).to(self.log_scale.dtype))
        self.bias.copy_((-mean * torch.exp(log_scale)).to(self.bias.dtype))
        self.initialized.fill_(True)
        self._is_initialized = True

    def effective_log_scale(self) -> torch.Tensor:
        """The log-scale of the map, logscale_factor * log_scale (the parameter holds it divided by the factor)."""
        return self.log_scale * self.logscale_factor

    def scale(self) -> torch.Tensor:
        return torch.exp(self.effective_log_scale())

    def logdet_per_pixel(self) -> torch.Tensor:
        return self.effective_log_scale().sum()

    def parameter_grads(self, grad_scale: torch.Tensor, grad_bias: torch.Tensor,
                        grad_logdet_per_pixel: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
        """{parameter: gradient} given dL/d scale(), dL/d bias and dL/d logdet_per_pixel(), in closed form
        (scale = exp(f * log_scale), logdet_per_pixel = f * sum(log_scale)): what autograd through those three
        would give, without a graph. The reversible backward of a flow step calls it once per step; a nested
        autograd call cost about as much as the rest of the step's flow arithmetic."""
        with torch.no_grad():
            scale = self.scale()
            grad_log_scale = (grad_scale.to(scale.dtype) * scale + grad_logdet_per_pixel.to(scale.dtype)) \
                * self.logscale_factor
        grads = {}
        if self.log_scale.requires_grad:
            grads[self.log_scale] = grad_log_scale.to(self.log_scale.dtype)
        if self.bias.requires_grad:
            grads[self.bias] = grad_bias.to(self.bias.dtype)
        return grads

    # The unfused reference map. Glow never calls these: its FlowStep fuses ActNorm with the channel mixing
    # (revglow.ops.actnorm_conv1x1, built on the same actnorm_reference) and uses only initialize_from, scale(),
    # bias and logdet_per_pixel(). Tests compare the fused step against ActNorm followed by the mixing.

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.initialize_from(x)
        return actnorm_reference(x, self.scale(), self.bias), logdet_per_sample(self.logdet_per_pixel(), x)

    def inverse(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            raise RuntimeError("ActNorm is not initialized: run a forward pass on data (or Glow.initialize) first")
        return actnorm_inverse_reference(y, self.scale(), self.bias), logdet_per_sample(self.logdet_per_pixel(), y)
