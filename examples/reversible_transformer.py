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

from digits_classifier import digits_tensors, report, train   # beside this file
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

    def set_memory(self, mode: str) -> None:
        self.blocks.memory = mode








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

    train_x, train_y, test_x, test_y = digits_tensors()
    model = ReversibleViT(args.width, args.depth, args.heads, args.dropout)
    train(model, train_x, train_y, args.steps, args.batch_size, args.lr, weight_decay=0.05)
    report(model, train_x, train_y, test_x, test_y, model.set_memory, args.batch_size, f"{args.depth} blocks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
