"""A reversible vision transformer (RevViT-style) classifying scikit-learn's 8x8 digits with revglow's engine.

    python examples/reversible_transformer.py [--steps 400] [--depth 4] [--width 64]

Each 8x8 digit is cut into 16 patches of 2x2 pixels, tokens [N, T=16, 4], embedded to [N, 16, 2 * width]. Each
reversible block is a TwoNetworkCoupling over the token features (dim=-1): with x1, x2 the two halves of `width`,
y1 = x1 + attention(x2) and y2 = x2 + MLP(y1), both networks with dropout. The blocks keep no activations for
backward: it rebuilds each block's input from its output (and replays each dropout's mask), so activation memory
does not grow with depth. ReversibleSequence(..., logdet=False) returns the tokens alone; a mean over tokens and
a linear head give the logits.

Trains in memory="reversible", prints the test accuracy, then the activation memory of one training step in each
memory mode (the peak of the tensor storage the step allocates, counted by revglow's LiveStorageTracker).
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

from revglow import ReversibleSequence, TwoNetworkCoupling
from revglow.memory.live_storage import LiveStorageTracker
from revglow.training.data import load_dataset

MODES = ("reversible", "checkpoint", "autograd")
PATCH = 2                                # 2x2 pixels per token: 16 tokens of 4 values per 8x8 digit


class Attention(nn.Module):
    """Pre-norm multi-head self-attention over [N, T, width], dropout on its output."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)            # [N, heads, T, d / heads]
        return self.dropout(self.proj(out.transpose(1, 2).reshape(n, t, d)))


def mlp(width: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                         nn.Dropout(dropout))


class ReversibleViT(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, dropout: float, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(PATCH * PATCH, 2 * width)
        self.position = nn.Parameter(0.02 * torch.randn(1, (8 // PATCH) ** 2, 2 * width))
        self.blocks = ReversibleSequence(
            [TwoNetworkCoupling(Attention(width, heads, dropout), mlp(width, dropout), dim=-1) for _ in range(depth)],
            memory="reversible", logdet=False)
        self.norm = nn.LayerNorm(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 1, 8, 8] -> logits [N, classes]."""
        n, side = images.shape[0], 8 // PATCH
        x = images.float() / 255 - 0.5
        patches = x.reshape(n, side, PATCH, side, PATCH).permute(0, 1, 3, 2, 4).reshape(n, side * side, PATCH ** 2)
        tokens = self.blocks(self.embed(patches) + self.position)   # [N, T, 2 * width]
        return self.head(self.norm(tokens).mean(dim=1))


def as_tensors(dataset) -> tuple:
    """A data set of (uint8 image, label) pairs as one image tensor [N, 1, 8, 8] and one label tensor [N]."""
    images, labels = zip(*dataset)
    return torch.stack(images), torch.tensor(labels)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(512), labels.split(512)))
    model.train()
    return right / len(labels)


def activation_mib(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mode: str) -> float:
    """Peak tensor storage of one training step in `mode` above what exists before it (parameters, their
    gradients from a warm-up step, the batch): the activations autograd or the engine keeps, and their backward."""
    model.blocks.memory = mode
    F.cross_entropy(model(images), labels).backward()   # warm-up: every .grad exists from here on
    with LiveStorageTracker() as tracker:
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad()
    model.blocks.memory = "reversible"
    return tracker.peak / 2 ** 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--depth", type=int, default=4, help="reversible blocks")
    parser.add_argument("--width", type=int, default=64, help="features of each half of a token")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    data = load_dataset("digits")                       # 1437 train, 360 test images, uint8 [1, 8, 8]
    train_x, train_y = as_tensors(data.train)
    test_x, test_y = as_tensors(data.test)
    model = ReversibleViT(args.width, args.depth, args.heads, args.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=max(1, args.steps))
    step = 0
    while step < args.steps:
        for batch in torch.randperm(len(train_y)).split(args.batch_size):
            if step == args.steps:
                break
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()                              # the blocks rebuild their inputs here, one by one
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 100 == 0 or step == args.steps:
                print(f"step {step:4d}  train loss {loss.item():.3f}")
    print(f"test accuracy {accuracy(model, test_x, test_y):.3f}  ({len(test_y)} images, 10 classes)")

    batch = torch.arange(args.batch_size) % len(train_y)
    for mode in MODES:
        mib = activation_mib(model, train_x[batch], train_y[batch], mode)
        print(f"activation memory, memory={mode!r}: {mib:.2f} MiB  (one training step, batch {args.batch_size}, "
              f"{args.depth} blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
