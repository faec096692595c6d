"""DistributedDataParallel over the reversible engine (2 CPU processes, gloo backend): the averaged gradients
equal those of one process on the whole batch, as with plain autograd."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flow_checks import rel_err
from revglow import Glow, GlowConfig

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(memory: str, x: torch.Tensor) -> Glow:
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8, memory=memory, kernels="torch"))
    model = model.double()
    model.initialize(x)   # same batch on every rank: identical ActNorm statistics
    return model


def _worker(rank: int, port: int, x: torch.Tensor, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model("reversible", x)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = x.shape[0] // WORLD
        torch.manual_seed(100 + rank)  # dequantization noise of this rank's shard
        ddp(x[rank * half:(rank + 1) * half]).mean().backward()
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], path)
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    path = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(_free_port(), x, path), nprocs=WORLD, join=True)
    ddp_grads = torch.load(path)

    reference = _model("autograd", x)
    half = x.shape[0] // WORLD
    for rank in range(WORLD):
        torch.manual_seed(100 + rank)
        (reference(x[rank * half:(rank + 1) * half]).mean() / WORLD).backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert rel_err(torch.cat([g.flatten() for g in ddp_grads]), expected) < 1e-9
