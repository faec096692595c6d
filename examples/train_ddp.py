"""Data-parallel training of a reversible Glow with DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node 2 examples/train_ddp.py --steps 300        # CPU (gloo) or one GPU per process (nccl)

(`torchrun --nproc_per_node 2 -m revglow train ...` does the same with the full trainer: checkpoints, resume,
evaluation, samples.)

Each process trains on its shard of scikit-learn's digits; DDP averages the gradients, which the reversible
engine returns per flow step from its own autograd Function, so DDP's gradient hooks fire as in plain autograd.
"""
import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel

from revglow import Glow, GlowConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--batch-size", type=int, default=32, help="per process")
parser.add_argument("--lr", type=float, default=3e-3)
args = parser.parse_args()

use_cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if use_cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
if use_cuda:
    torch.cuda.set_device(device)
torch.manual_seed(1000 + rank)  # each rank draws its own batches and dequantization noise

digits = load_digits()
images = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
shard = images[rank::world].to(device)  # this process's share of the data

torch.manual_seed(0)  # identical initial weights on every rank (DDP also broadcasts rank 0's at wrap time)
model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=8, hidden=64, n_bits=4,
                        memory="reversible")).to(device)
# Data-dependent init before wrapping. Inside the process group ActNorm all-reduces its statistics, so the
# init sees every rank's 256 images; DDP then broadcasts rank 0's parameters and buffers (ActNorm's
# `initialized` flags included) to every rank when it wraps the model.
model.initialize(shard[:256])
ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)

torch.manual_seed(1000 + rank)
for step in range(1, args.steps + 1):
    batch = shard[torch.randint(0, len(shard), (args.batch_size,), device=device)]
    loss = ddp(batch).mean()          # bits/dim of this rank's batch
    optimizer.zero_grad()
    loss.backward()                   # reversible backward; DDP all-reduces each step's gradients
    optimizer.step()
    if step % 50 == 0 or step == args.steps:
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            print(f"step {step:4d}  train bits/dim {mean_loss.item() / world:.3f}  ({world} processes)", flush=True)

# The replicas stay identical: every rank applied the same averaged gradients.
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
if rank == 0:
    drift = max((g - flat).abs().max().item() for g in gathered)
    print(f"max parameter difference between ranks: {drift:.3g}")
dist.barrier()  # no rank tears the process group down while another still uses it
dist.destroy_process_group()
