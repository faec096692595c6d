"""Invertible layers of Glow. Each follows the step contract of `revglow.engine.invertible.InvertibleModule`.

FlowStep (ActNorm -> channel mixing -> coupling, `flowstep.py`) is the step Glow runs. It fuses ActNorm and the
channel mixing into one op (revglow.ops.actnorm_conv1x1) and takes from ActNorm (`actnorm.py`) and the mixings
(InvConv1x1, InvConv1x1LU, FixedPermutation in `permutation.py`) only their parameters, data-dependent init and
log-determinants; their own forward/inverse are the unfused reference that tests hold the fused step to.
Coupling (`coupling.py`) is Glow's coupling over its CouplingNetwork, built on the engine's generic coupling
blocks. SplitPrior and TopPrior (`prior.py`) are the priors of the multi-scale architecture; squeeze2d and
unsqueeze2d (`squeeze.py`) its space-to-depth reshapes; ClassHead (`classifier.py`) the class-conditional head.
"""
