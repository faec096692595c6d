"""Invertible layers of Glow. Each follows the contract of `revglow.layers.base.InvertibleModule`."""
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
