"""Training Glow: the trainer (`trainer.py`: the run and its phases; `step.py`: one training step; `divergence.py`:
what a run does when its state goes bad; `resume.py`: the run's state in a checkpoint), its data (`data.py`,
`datasets.py`, `readers/`), loaders and augmentation, optimizers and schedule, EMA, evaluation, metrics, the run
folder (`run_folder.py`, `run_lock.py`), checkpoints, signals, distributed training, presets and TrainConfig
(`config.py`)."""
