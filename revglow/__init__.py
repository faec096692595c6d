"""revglow: Glow (Kingma & Dhariwal, 2018) with a reversible training engine whose activation memory is
constant in depth, plus fused Triton kernels.

    >>> from revglow import Glow, GlowConfig
    >>> model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=16))
"""
from revglow.config import GlowConfig
from revglow.model import Glow
from revglow.layers.coupling import AdditiveCoupling, AffineCoupling, TwoNetworkCoupling
from revglow.reversible import ReconstructionError, ReconstructionWarning, ReversibleSequence, StepContractError

__all__ = ["Glow", "GlowConfig", "ReversibleSequence", "ReconstructionError", "ReconstructionWarning",
           "StepContractError", "AdditiveCoupling", "AffineCoupling", "TwoNetworkCoupling"]
__version__ = "0.1.0"
