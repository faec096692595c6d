"""Multi-scale Glow (paper, section 3 and Figure 2b): L levels of squeeze, K flow steps and split, a learned
top prior, n-bit images, bits per dimension, temperature sampling.

The steps of each level run through `ReversibleSequence`, so `GlowConfig.memory` chooses how they train.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from revglow.glow.checks import (check_inputs, check_latents, check_raw_images, check_sample_request,
                                 register_config_check, require_class_head, require_initialized)
from revglow.glow.config import GlowConfig
from revglow.glow.layers.flowstep import FlowStep
from revglow.glow.layers.prior import SplitPrior, TopPrior
from revglow.glow.layers.squeeze import squeeze2d, unsqueeze2d
from revglow.glow.layers.actnorm import ActNorm
from revglow.glow.layers.classifier import ClassHead, class_bits
from revglow.engine.sequence import ReversibleSequence

__all__ = ["Glow", "GlowLosses", "Level"]

_LOG_2PI = math.log(2 * math.pi)


def _standard_normal_log_prob(eps: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (eps * eps + _LOG_2PI)).flatten(1).sum(1)


def _bits_per_dim(log_prob: torch.Tensor, num_dims: int, n_bins: int) -> torch.Tensor:
    """Bits/dim of the discrete images from the log density of their dequantized values (see Glow.bits_per_dim)."""
    return -(log_prob - num_dims * math.log(n_bins)) / (num_dims * math.log(2.0))


def _build_levels(config: GlowConfig) -> Tuple[List[ReversibleSequence], List[SplitPrior], List[Tuple[int, int, int]],
                                               List[Tuple[int, int]]]:
    """(flows, split priors, latent shapes, step sizes) of config's levels, bottom first: each level's
    ReversibleSequence of `depth` flow steps, the split prior of every level but the top, the shape (C, H, W) of
    each level's latent (the last: the top level's), and the (H, W) at which each level's steps run. The modules are
    built level by level, steps before split, which fixes the order of their random initial weights."""
    c, h, w = config.image_shape
    flows, splits, latent_shapes, level_sizes = [], [], [], []
    seed = 0
    for level in range(config.levels):
        c, h, w = 4 * c, h // 2, w // 2
        level_sizes.append((h, w))
        steps = []
        for _ in range(config.depth):
            steps.append(FlowStep(c, config.hidden, config.coupling, config.permutation, config.kernels, seed,
                                  context_channels=config.context_channels, compile=config.compile,
                                  nn_actnorm=config.nn_actnorm, edge_padding=config.edge_padding,
                                  zero_logscale_factor=config.zero_logscale_factor,
                                  actnorm_logscale_factor=config.actnorm_logscale_factor,
                                  memory_format=config.memory_format))
            seed += 1
        flows.append(ReversibleSequence(steps, config.memory, config.check_reconstruction, config.reconstruction_tol))
        if level < config.levels - 1:
            split = SplitPrior(c, config.edge_padding, config.zero_logscale_factor)
            splits.append(split)
            latent_shapes.append((c - split.kept, h, w))
            c = split.kept
    latent_shapes.append((c, h, w))
    return flows, splits, latent_shapes, level_sizes


def _level_contexts(context: Optional[torch.Tensor], model: "Glow") -> List[Optional[torch.Tensor]]:
    """The context resized to each level's spatial size (model.level_sizes), in the model's dtype: area average
    when shrinking, bilinear when growing."""
    if context is None:
        return [None] * len(model.level_sizes)
    context = context.to(model._param_dtype())
    out = []
    for h, w in model.level_sizes:
        if context.shape[2] >= h and context.shape[3] >= w:
            out.append(F.adaptive_avg_pool2d(context, (h, w)))
        else:
            out.append(F.interpolate(context, size=(h, w), mode="bilinear", align_corners=False))
    return out


class GlowLosses(NamedTuple):
    """What `Glow.losses` returns, per sample: `bits_x` the bits/dim of the images (the training loss of an
    unconditional model); for a model with a class head, `bits_y` the head's cross-entropy of the true class in bits
    and `class_logits` [N, num_classes] (both None otherwise)."""

    bits_x: torch.Tensor
    bits_y: Optional[torch.Tensor] = None
    class_logits: Optional[torch.Tensor] = None


class Level(nn.Module):
    """One scale of the multi-scale architecture (paper, Figure 2b): squeeze, K flow steps, and (except at the
    top) a split that factors out half of the channels as this level's latent.

    `forward(x, context) -> (z, eps, logdet)` and `inverse(z, eps, context) -> x` are exact inverses: z is what the
    next level takes, `eps` this level's latent (None for the top level, which has no split). `context` is
    already resized to this level (`size`).
    """

    def __init__(self, flow: ReversibleSequence, split: Optional[SplitPrior], size) -> None:
        super().__init__()
        self.flow = flow
        self.split = split
        self.size = tuple(size)     # (H, W) at which the steps run

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None):
        z, logdet = self.flow(squeeze2d(x), context)
        if self.split is None:
            return z, None, logdet
        z, eps, ld = self.split(z)
        return z, eps, logdet + ld

    def inverse(self, z: torch.Tensor, eps: Optional[torch.Tensor], context: Optional[torch.Tensor] = None):
        if self.split is not None:
            z, _ = self.split.inverse(z, eps)
        z, _ = self.flow.inverse(z, context)
        return unsqueeze2d(z)


class Glow(nn.Module):
    """The Glow model. `model(x)` is the training loss: per-sample bits per dimension of images x.

    Example:
        >>> model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=16))
        >>> x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
        >>> bpd = model(x)                  # initializes ActNorm from this batch on the first call
        >>> bpd.shape
        torch.Size([4])
        >>> model.sample(2, temperature=0.7).shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(self, config: GlowConfig):
        super().__init__()
        if not isinstance(config, GlowConfig):
            raise TypeError(f"Glow expects a GlowConfig; got {type(config).__name__}")
        self.config = config
        flows, splits, self.latent_shapes, self.level_sizes = _build_levels(config)
        self.flows = nn.ModuleList(flows)
        self.splits = nn.ModuleList(splits)
        c, h, w = self.latent_shapes[-1]
        self.top_prior = TopPrior((c, h, w), config.learn_top, config.num_classes, config.zero_logscale_factor)
        self.class_head = (ClassHead(c, config.num_classes, config.zero_logscale_factor)
                           if config.num_classes > 0 and config.class_head else None)
        # The levels share their modules with `flows` and `splits`, which own them: the state_dict keys (and the EMA
        # names in checkpoints) stay flows.L.* and splits.L.*. A plain list, so nothing is registered twice.
        self._levels = [Level(flow, self.splits[i] if i < len(self.splits) else None, size)
                        for i, (flow, size) in enumerate(zip(self.flows, self.level_sizes))]
        self._actnorms = [m for m in self.modules() if isinstance(m, ActNorm)]   # a plain list: not submodules
        register_config_check(self)   # its state dicts carry the config; loading another config's is refused

    @property
    def levels(self) -> List[Level]:
        """The L levels, bottom (full resolution) first."""
        return list(self._levels)

    @property
    def n_bins(self) -> int:
        return 2 ** self.config.n_bits

    @property
    def is_initialized(self) -> bool:
        return all(m.is_initialized for m in self._actnorms)

    def _param_dtype(self):
        return next(self.parameters()).dtype

    def reconstruction_errors(self) -> List[Optional[torch.Tensor]]:
        """Per level, the per-sample relative error of the input the last reversible backward rebuilt ([N], on
        the device; None before the first reversible backward or with check_reconstruction='off')."""
        return [flow.last_reconstruction_error for flow in self.flows]

    # ------------------------------------------------------------------------------------ data <-> xc
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Images (uint8 0..255, or float in [0, 1] read as 8-bit values) -> integers 0..2**n_bits - 1, as float."""
        if x.dtype == torch.uint8:
            x8 = x.to(self._param_dtype())
        else:
            x8 = torch.round(x.to(self._param_dtype()) * 255.0)
        return torch.floor(x8 / 2 ** (8 - self.config.n_bits))

    def preprocess(self, x: torch.Tensor, noise: bool = True,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reduce to n_bits, scale to [-0.5, 0.5], add uniform dequantization noise of one bin's width, drawn from
        `generator` (a torch.Generator on x's device; None: the global RNG)."""
        check_raw_images(x, self.config, "preprocess")
        return self._dequantize(x, noise, generator)

    def _dequantize(self, x: torch.Tensor, noise: bool = True,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        xc = self.quantize(x) / self.n_bins - 0.5
        if noise:
            u = (torch.rand_like(xc) if generator is None else
                 torch.rand(xc.shape, generator=generator, dtype=xc.dtype, device=xc.device))
            xc = xc + u / self.n_bins
        return xc

    def postprocess(self, xc: torch.Tensor) -> torch.Tensor:
        """Inverse of preprocess up to the noise: values in [-0.5, 0.5] -> images as floats in [0, 1] on the n-bit grid."""
        xq = torch.clamp(torch.floor((xc + 0.5) * self.n_bins), 0, self.n_bins - 1)
        return xq / (self.n_bins - 1)

    # --------------------------------------------------------------------------------- the bijection
    def _through_levels(self, xc: torch.Tensor, context=None):
        """-> (z_top, latents, logdet): the top level's output (before its prior), the split latents below it, and
        the levels' log|det|."""
        logdet = torch.zeros(xc.shape[0], dtype=xc.dtype, device=xc.device)
        latents: List[torch.Tensor] = []
        z = xc
        for level, level_context in zip(self._levels, _level_contexts(context, self)):
            z, eps, ld = level(z, level_context)
            logdet = logdet + ld
            if eps is not None:
                latents.append(eps)
        return z, latents, logdet

    def _encode(self, xc: torch.Tensor, y, context=None):
        """-> (latents, logdet, z_top): the standardized latents of every level, log|det|, and the top level's
        output before its prior (what the class head reads)."""
        z, latents, logdet = self._through_levels(xc, context)
        eps, ld = self.top_prior(z, y)
        return latents + [eps], logdet + ld, z

    def encode(self, xc: torch.Tensor, y=None, context=None) -> List[torch.Tensor]:
        """Preprocessed images -> one standard-normal latent per level (split priors' standardization included)."""
        xc, y, context = check_inputs(self, "encode", xc, y=y, context=context)
        return self._encode(xc, y, context)[0]

    def decode(self, latents: List[torch.Tensor], y=None, context=None) -> torch.Tensor:
        """Exact inverse of encode: latents -> preprocessed images in [-0.5, 0.5] (up to the model's fit)."""
        require_initialized(self, "decode")
        latents = check_latents(latents, self)
        _, y, context = check_inputs(self, "decode", y=y, context=context, n=latents[0].shape[0], initialized=False)
        contexts = _level_contexts(context, self)
        z, _ = self.top_prior.inverse(latents[-1], y)
        for i in reversed(range(len(self._levels))):
            z = self._levels[i].inverse(z, latents[i] if i < len(self.splits) else None, contexts[i])
        return z

    def log_prob(self, xc: torch.Tensor, y=None, context=None) -> torch.Tensor:
        """Per-sample log density of preprocessed images in nats: sum log N(eps; 0, I) + log|det d eps / d xc|."""
        xc, y, context = check_inputs(self, "log_prob", xc, y=y, context=context)
        return self._log_prob_and_top(xc, y, context)[0]

    def _log_prob_and_top(self, xc: torch.Tensor, y, context=None):
        latents, logdet, z_top = self._encode(xc, y, context)
        return sum(_standard_normal_log_prob(eps) for eps in latents) + logdet, z_top

    def bits_per_dim(self, xc: torch.Tensor, y=None, context=None) -> torch.Tensor:
        """Per-sample bits/dim of the discrete n-bit images that xc dequantizes.

        The density of xc on [-0.5, 0.5]^D is over bins of width 1/n_bins, so the discrete log-likelihood
        bound is log p(xc) - D log(n_bins): bits/dim = -(log p(xc) - D log n_bins) / (D log 2).
        """
        return _bits_per_dim(self.log_prob(xc, y, context), self.config.num_dims, self.n_bins)

    def forward(self, x: torch.Tensor, y=None, context=None, generator: Optional[torch.Generator] = None,
                all_losses: bool = False):
        """Training loss: per-sample bits/dim of images x (uint8 0..255 or float in [0, 1]); the dequantization
        noise comes from `generator` (None: the global RNG). `all_losses=True` returns what `losses` returns (for
        wrappers such as DistributedDataParallel, which pass on calls to forward only)."""
        out = self._losses(x, y, context, generator, "forward")
        return out if all_losses else out.bits_x

    def losses(self, x: torch.Tensor, y=None, context=None, generator: Optional[torch.Generator] = None) -> GlowLosses:
        """Per-sample bits/dim of images x and, with a class head (class-conditional model, `class_head=True`),
        the head's cross-entropy of the true class in bits and its logits. The reference trains on
        bits_x + weight_y * bits_y (weight_y 0.01: `TrainConfig.weight_y`)."""
        return self._losses(x, y, context, generator, "losses")

    def _losses(self, x, y, context, generator, what: str) -> GlowLosses:
        _, y, context = check_inputs(self, what, x, raw=True, y=y, context=context, initialized=False)
        if not self.is_initialized:
            self._initialize(x, y, context)
        # x and y were checked above: no second pass over the data for the same checks
        log_prob, z_top = self._log_prob_and_top(self._dequantize(x, generator=generator), y, context)
        bits_x = _bits_per_dim(log_prob, self.config.num_dims, self.n_bins)
        if self.class_head is None:
            return GlowLosses(bits_x)
        logits = self.class_head(z_top)
        return GlowLosses(bits_x, class_bits(logits, y), logits)

    @torch.no_grad()
    def predict_class(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """The class head's logits [N, num_classes] for images x (no dequantization noise: the bin's lower edge
        plus half a bin). The head reads the top latent, which does not depend on the label: the prior's class
        shift comes after it."""
        require_class_head(self)
        _, _, context = check_inputs(self, "predict_class", x, raw=True, context=context, labels=False)
        z_top = self._through_levels(self._dequantize(x, noise=False) + 0.5 / self.n_bins, context)[0]
        return self.class_head(z_top)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, y=None, context=None) -> None:
        """Data-dependent initialization of every ActNorm on a batch of images (paper, section 3.1). Inside an
        initialized torch.distributed process group, call it on every rank with its shard: the statistics are
        those of all shards together, so every rank ends with the same parameters."""
        _, y, context = check_inputs(self, "initialize", x, raw=True, y=y, context=context, initialized=False)
        self._initialize(x, y, context)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor, y, context=None) -> None:
        for m in self._actnorms:
            m.reset_initialization()
        self._encode(self._dequantize(x), y, context)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, y=None, generator: Optional[torch.Generator] = None,
               context=None):
        """n images as floats in [0, 1], with latents drawn from N(0, temperature^2 I) (paper, section 5); a
        conditional model takes the n conditioning maps as `context`."""
        ref = next(self.parameters())
        y = check_sample_request(n, temperature, y, ref.device)   # an int label becomes n of them
        require_initialized(self, "sample")
        latents = [torch.randn((n,) + tuple(s), generator=generator, dtype=ref.dtype, device=ref.device) * temperature
                   for s in self.latent_shapes]
        return self.postprocess(self.decode(latents, y, context))
