"""The engine walks a step's modules once per forward and takes its parameters from that walk: the same
parameters, in the same order, as Module.parameters() (a shared submodule or a tied parameter counted once)."""
import torch
from torch import nn

from revglow.engine.sequence import _parameters_of


def test_parameters_of_a_walk_are_module_parameters():
    shared = nn.Linear(3, 3)
    block = nn.Module()
    block.a, block.b, block.c = shared, nn.Sequential(nn.Linear(3, 2), shared), nn.Linear(2, 3)
    block.tied = nn.Linear(3, 2)
    block.tied.weight = block.b[0].weight   # a parameter tied across two submodules
    block.extra = nn.Parameter(torch.zeros(1))
    block.frozen = nn.Linear(1, 1)
    block.frozen.bias = None
    assert [id(p) for p in _parameters_of(list(block.modules()))] == [id(p) for p in block.parameters()]
