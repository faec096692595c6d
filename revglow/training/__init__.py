"""Training Glow: the trainer (`trainer.py`: the run and its phases; `step.py`: one training step; `resume.py`: the
run's state in a checkpoint), its data (`data.py`, `datasets.py`, `readers/`), loaders and augmentation, optimizers
and schedule, EMA, evaluation, metrics, run folder, checkpoints, signals, distributed training, presets and
TrainConfig (`config.py`)."""
