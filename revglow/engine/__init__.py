"""The reversible engine: runs any stack of invertible blocks so that training keeps no activations.

    sequence.py        ReversibleSequence and its autograd Function (the engine itself)
    invertible.py      the step contract (InvertibleModule) every block follows
    contract.py        the contract as the engine checks it (StepContractError), the generic backward
    coupling.py        generic coupling blocks for any network: AdditiveCoupling, AffineCoupling, TwoNetworkCoupling
    check_block.py     check_block: the checks to run on a new block (contract, inverse, logdet, gradients per mode)
    replay.py          what a backward replays from its forward: autocast, the random numbers, the buffers
    replay_reuse.py    the opt-in reuse of the inverse's computations in the replayed forward
    unregistered.py    tensors a step uses without registering them, which still get their gradients
    reconstruction.py  the reconstruction check and its tolerance
    options.py         the engine's option names (memory modes, reconstruction checks)

It imports nothing from the rest of revglow except revglow.ops, so it serves any model, not only Glow.
"""
