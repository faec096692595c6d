"""What the trainer tests share: a tiny model, a quick training config, and the loss rows of a run's metrics."""
import json

from revglow import GlowConfig
from revglow.training.config import TrainConfig

TINY = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=16)


def quick_config(out, **options) -> TrainConfig:
    """Batch 16, 2 warm-up steps, EMA 0.9, no evaluations, samples or checkpoints before the end, no progress bar;
    the digits' 359 test images evaluated in one batch."""
    base = dict(batch_size=16, eval_batch_size=512, warmup=2, lr=1e-3, ema=0.9, eval_every=0, sample_every=0,
                checkpoint_every=0, n_samples=4, progress=False, out=str(out))
    base.update(options)
    return TrainConfig(**base)


def metric_rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def step_losses(folder):
    """(step, bpd, lr, grad_norm) of every training step logged in folder/metrics.jsonl."""
    return [(r["step"], r["bpd"], r["lr"], r["grad_norm"]) for r in metric_rows(folder) if "images_per_s" in r]
