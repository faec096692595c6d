"""What the engine's classifier examples share (examples/revnet.py, examples/reversible_transformer.py): the digits
as tensors, a training loop, test accuracy, and the activation memory of one training step in each memory mode.
Not an example of its own."""
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from revglow.memory.live_storage import LiveStorageTracker
from revglow.training.data import load_dataset

MODES = ("reversible", "checkpoint", "autograd")


def digits_tensors() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1437 train, 360 test images, uint8 [N, 1, 8, 8]) as train images, train labels, test
    images, test labels."""
    data = load_dataset("digits")
    out = []
    for dataset in (data.train, data.test):
        images, labels = zip(*dataset)
        out += [torch.stack(images), torch.tensor(labels)]
    return tuple(out)


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int, lr: float,
          weight_decay: float) -> None:
    """AdamW with a one-cycle schedule on the cross-entropy, printing the loss every 100 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(1, steps))
    step = 0
    while step < steps:
        for batch in torch.randperm(len(labels)).split(batch_size):
            if step == steps:
                break
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()                              # the reversible blocks rebuild their inputs here
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 100 == 0 or step == steps:
                print(f"step {step:4d}  train loss {loss.item():.3f}")


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(512), labels.split(512)))
    model.train()
    return right / len(labels)


def activation_mib(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   set_memory: Callable[[str], None], mode: str) -> float:
    """Peak tensor storage of one training step with the model's reversible parts in `mode` (`set_memory(mode)`
    puts them there), above what exists before it (parameters, their gradients from a warm-up step, the batch):
    the activations autograd or the engine keeps, and their backward. Normalization statistics move in both steps:
    this measures memory, on a model that is done training."""
    set_memory(mode)
    F.cross_entropy(model(images), labels).backward()   # warm-up: every .grad exists from here on
    with LiveStorageTracker() as tracker:
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad()
    set_memory("reversible")
    return tracker.peak / 2 ** 20


def report(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
           test_labels: torch.Tensor, set_memory: Callable[[str], None], batch_size: int, what: str) -> None:
    """Print the test accuracy, then the activation memory of one training step in each memory mode."""
    print(f"test accuracy {accuracy(model, test_images, test_labels):.3f}  ({len(test_labels)} images, 10 classes)")
    batch = torch.arange(batch_size) % len(labels)
    for mode in MODES:
        mib = activation_mib(model, images[batch], labels[batch], set_memory, mode)
        print(f"activation memory, memory={mode!r}: {mib:.2f} MiB  (one training step, batch {batch_size}, {what})")
