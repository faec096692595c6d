"""revglow: Glow (Kingma & Dhariwal, 2018) with a reversible training engine whose activation memory is
constant in depth, plus fused Triton kernels.

    >>> from revglow import Glow, GlowConfig
    >>> model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=16))
"""
from revglow._checkout_kernels import install_checkout_kernels_finder as _install_checkout_kernels_finder

_install_checkout_kernels_finder()   # a checkout without installation finds revglow.kernels in its kernels/

from revglow.glow.config import GlowConfig  # noqa: E402
from revglow.glow.model import Glow  # noqa: E402
from revglow.engine.check_block import BlockCheckError, BlockCheckReport, check_block  # noqa: E402
from revglow.engine.coupling import AdditiveCoupling, AffineCoupling, TwoNetworkCoupling, float32_flow  # noqa: E402
from revglow.engine.contract import StepContractError  # noqa: E402
from revglow.engine.reconstruction import ReconstructionError, ReconstructionWarning  # noqa: E402
from revglow.engine.sequence import ReversibleSequence  # noqa: E402

__all__ = ["Glow", "GlowConfig", "ReversibleSequence", "ReconstructionError", "ReconstructionWarning",
           "StepContractError", "AdditiveCoupling", "AffineCoupling", "TwoNetworkCoupling", "float32_flow",
           "check_block", "BlockCheckReport", "BlockCheckError"]
__version__ = "0.1.0"
