"""Training Glow: the trainer (`trainer.py`), its data, loaders and augmentation, optimizers, EMA, evaluation,
metrics, run folder, checkpoints, signals, distributed training, presets and TrainConfig (`config.py`)."""
