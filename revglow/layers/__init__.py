"""Invertible layers of Glow. Each follows the contract of `revglow.layers.base.InvertibleModule`.

FlowStep (ActNorm -> channel mixing -> coupling) is the step Glow runs. It fuses ActNorm and the channel mixing
into one op (revglow.ops.actnorm_conv1x1) and takes from ActNorm and the mixings (InvConv1x1, InvConv1x1LU,
FixedPermutation) only their parameters, data-dependent init and log-determinants; their own forward/inverse are
the unfused reference that tests hold the fused step to. The coupling blocks (AdditiveCoupling, AffineCoupling,
TwoNetworkCoupling) take any network and run in any ReversibleSequence; Coupling is Glow's, over its
CouplingNetwork. SplitPrior and TopPrior are the priors of the multi-scale architecture; squeeze2d and
unsqueeze2d its space-to-depth reshapes.
"""
from revglow.layers.actnorm import ActNorm
from revglow.layers.base import InvertibleModule
from revglow.layers.coupling import AdditiveCoupling, AffineCoupling, Coupling, CouplingNetwork, TwoNetworkCoupling
from revglow.layers.flowstep import FlowStep
from revglow.layers.permutation import FixedPermutation, InvConv1x1, InvConv1x1LU, make_channel_mixing
from revglow.layers.prior import SplitPrior, TopPrior
from revglow.layers.squeeze import squeeze2d, unsqueeze2d

__all__ = ["ActNorm", "InvertibleModule", "AdditiveCoupling", "AffineCoupling", "TwoNetworkCoupling", "Coupling",
           "CouplingNetwork", "FlowStep", "FixedPermutation",
           "InvConv1x1", "InvConv1x1LU", "make_channel_mixing", "SplitPrior", "TopPrior", "squeeze2d",
           "unsqueeze2d"]
