"""A RevNet (Gomez et al., 2017) classifying scikit-learn's 8x8 digits with revglow's engine.

    python examples/revnet.py [--steps 300] [--channels 16] [--blocks 2]

    stem      conv3x3, 1 -> C channels                                     [N, C, 8, 8]
    stage 1   `blocks` reversible TwoNetworkCoupling(f, g) at C channels: y1 = x1 + f(x2), y2 = x2 + g(y1),
              f and g conv3x3-BatchNorm-ReLU-conv3x3 on C/2 channels
    down      BatchNorm-ReLU-conv3x3 with stride 2, C -> 2C                [N, 2C, 4, 4]
    stage 2   reversible blocks at 2C
    down      2C -> 4C                                                     [N, 4C, 2, 2]
    stage 3   reversible blocks at 4C
    head      mean over H and W, linear 4C -> 10

Each stage is a ReversibleSequence(..., logdet=False): its backward rebuilds every block's input from the block's
output, so a stage keeps no activations whatever its depth. The downsampling between stages loses information
(a stride-2 conv is not invertible), so it runs under plain autograd and keeps its input, as in the paper: a
RevNet stores activations only at the few places where the resolution changes.

Trains in memory="reversible", prints the test accuracy, then the activation memory of one training step with
the stages in each memory mode (the peak of the tensor storage the step allocates, counted by revglow's
LiveStorageTracker).
"""
import argparse
from typing import List

import torch
from torch import nn

from revglow import ReversibleSequence, TwoNetworkCoupling

from digits_classifier import digits_tensors, report, train   # beside this file


def residual_function(channels: int) -> nn.Module:
    """f or g of a block: [N, channels, H, W] -> same shape."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))


def downsample(channels: int) -> nn.Module:
    """Halves H and W and doubles the channels: not invertible, so outside the reversible stages."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1))


class RevNet(nn.Module):
    def __init__(self, channels: int, blocks: int, stages: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        layers: List[nn.Module] = []
        for stage in range(stages):
            width = channels * 2 ** stage
            if stage > 0:
                layers.append(downsample(width // 2))
            layers.append(ReversibleSequence(
                [TwoNetworkCoupling(residual_function(width // 2), residual_function(width // 2))
                 for _ in range(blocks)], memory="reversible", logdet=False))
        self.body = nn.Sequential(*layers)
        width = channels * 2 ** (stages - 1)
        self.head = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
        self.classify = nn.Linear(width, classes)

    def stages(self) -> List[ReversibleSequence]:
        return [m for m in self.body if isinstance(m, ReversibleSequence)]

    def set_memory(self, mode: str) -> None:
        for stage in self.stages():
            stage.memory = mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 1, 8, 8] -> logits [N, classes]."""
        x = self.stem(images.float() / 255 - 0.5)
        return self.classify(self.head(self.body(x)).mean(dim=(2, 3)))








def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--channels", type=int, default=16, help="channels of the first stage (even)")
    parser.add_argument("--blocks", type=int, default=2, help="reversible blocks per stage")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.channels < 2 or args.channels % 2:
        parser.error(f"--channels must be an even number >= 2 (each block splits them in two); got {args.channels}")
    torch.manual_seed(args.seed)

    train_x, train_y, test_x, test_y = digits_tensors()
    model = RevNet(args.channels, args.blocks)
    train(model, train_x, train_y, args.steps, args.batch_size, args.lr, weight_decay=1e-4)
    report(model, train_x, train_y, test_x, test_y, model.set_memory, args.batch_size,
           f"{len(model.stages()) * args.blocks} reversible blocks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
