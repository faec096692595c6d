"""A training run's state in a checkpoint, and a run resumed from it exactly where the checkpoint left it.

`checkpoint_state(trainer)` is everything the run needs to go on (weights, EMA, optimizer, schedule, step, data
position, every RNG, the learning rate and rollbacks of revglow.training.divergence) and the run id of its folder;
`write_checkpoint(trainer)` writes it (atomically, gathering every rank's RNG states under torch.distributed; the
trainer verifies the state first, so no checkpoint holds a bad one), and `restore_state(trainer, state)` puts it
back into a new trainer: the same parameters and losses, bit for bit, on the CPU. A resumed run keeps its model (only RUNTIME_OPTIONS may change) and its
optimizer; its training options (TrainConfig) may change, as `train_config_for_resume` lays them over the saved ones.

Example:
    >>> state = load_resume_state("runs/digits/checkpoint.pt")                  # doctest: +SKIP
    >>> Trainer(glow, train_config_for_resume(state, {"max_steps": 3000}), resume_state=state).run()  # doctest: +SKIP
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Dict

import torch

from revglow.errors import ConfigError
from revglow.glow.config import RUNTIME_OPTIONS, GlowConfig
from revglow.training.checkpoints import (RUN_ID_KEY, capture_rng_state, link_or_copy_atomic, load_checkpoint,
                                          prune_step_checkpoints, restore_rng_state, save_checkpoint,
                                          step_checkpoint_path)
from revglow.training.config import TrainConfig, override_train_options
from revglow.training.loaders import DataPosition
from revglow.training.seeds import rank_seed, seed_global_rngs

if TYPE_CHECKING:
    from revglow.training.trainer import Trainer

__all__ = ["load_resume_state", "train_config_for_resume", "check_resumable",
           "checkpoint_state", "write_checkpoint", "restore_state"]


def load_resume_state(path: str) -> Dict:
    """A checkpoint for `Trainer(resume_state=...)`, with every key the trainer needs checked."""
    return load_checkpoint(path, required=("model", "optimizer", "scheduler", "step", "data_position", "rng",
                                           "glow_config", "train_config"))


def train_config_for_resume(state: Dict, overrides: Dict) -> TrainConfig:
    """The checkpoint's TrainConfig with the given `overrides` (options set explicitly) applied.

    Giving max_steps replaces a saved epochs and the other way round, so a run can switch between them; the
    same for warmup and warmup_epochs.
    """
    return TrainConfig.from_dict(override_train_options(state["train_config"], overrides))


def check_resumable(state: Dict, glow_config: GlowConfig, config: TrainConfig) -> None:
    """A ConfigError unless the run of `state` can go on with `glow_config` and `config`: the same optimizer (its
    state does not carry over to another), and the same model but for RUNTIME_OPTIONS."""
    saved_optimizer = state["train_config"].get("optimizer", "adam")    # runs from before the option: Adam
    if saved_optimizer != config.optimizer:
        raise ConfigError(f"the checkpoint was trained with --optimizer {saved_optimizer}; a resumed run keeps "
                          f"its optimizer (its state does not carry over), so --optimizer "
                          f"{config.optimizer} cannot continue it")
    saved = GlowConfig.from_dict(state["glow_config"]).to_dict()
    given = glow_config.to_dict()
    changed = sorted(k for k in given if k not in RUNTIME_OPTIONS and saved.get(k) != given[k])
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ConfigError(f"the checkpoint's model differs from the one given ({flags}); a resumed run keeps "
                          f"its model (only {', '.join('--' + k.replace('_', '-') for k in RUNTIME_OPTIONS)} "
                          f"may change)")


def _generators(trainer: Trainer) -> Dict[str, torch.Generator]:
    """The trainer's own generators: the dequantization noise and --augment's shifts."""
    return {"augment": trainer.augment_generator, "noise": trainer.noise_generator}


def checkpoint_state(trainer: Trainer) -> Dict:
    """The checkpoint of the trainer's rank (under torch.distributed, `write_checkpoint` adds every rank's RNG)."""
    train_config = trainer.config.to_dict()
    train_config["warmup"] = trainer.warmup      # resolved, so a resumed run warms up the same way
    train_config["lr"] = trainer.divergence.lr   # halved by rollbacks: a resumed run goes on at it
    train_config["warmup_epochs"] = None
    train_config["resume"] = None
    train_config["overwrite"] = False
    data = trainer.data
    return {
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "step": trainer.step,
        "data_position": trainer.position.to_dict(),
        "bad_steps": trainer.divergence.bad_steps,
        "rollbacks": trainer.divergence.rollbacks,
        RUN_ID_KEY: trainer.run_id,
        "rng": capture_rng_state(_generators(trainer)),
        "world_size": trainer.dist.world_size,
        "glow_config": trainer.glow_config.to_dict(),
        "train_config": train_config,
        "data": {"name": data.name, "image_shape": list(data.image_shape),
                 "num_classes": data.num_classes, "class_names": list(data.class_names)},
    }


def write_checkpoint(trainer: Trainer) -> Path:
    """Write checkpoint.pt atomically, keep a checkpoint-STEP.pt copy, prune old copies (rank 0 writes; under
    torch.distributed every rank must call this, to hand over its RNG state)."""
    dist = trainer.dist
    rng_states = dist.all_gather_object(capture_rng_state(_generators(trainer))) if dist.enabled else None
    if dist.is_main:
        state = checkpoint_state(trainer)
        if rng_states is not None:
            state["rng_per_rank"] = rng_states
        save_checkpoint(state, trainer.checkpoint_path)
        if trainer.config.keep > 0:
            link_or_copy_atomic(trainer.checkpoint_path, step_checkpoint_path(trainer.out, trainer.step))
        prune_step_checkpoints(trainer.out, trainer.config.keep)
    dist.barrier()
    return trainer.checkpoint_path


def restore_state(trainer: Trainer, state: Dict) -> int:
    """Put the run of checkpoint `state` back into a newly built `trainer` (see check_resumable); returns the step
    it resumes at."""
    check_resumable(state, trainer.glow_config, trainer.config)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.ema is not None and state.get("ema"):
        trainer.ema.load_state_dict(state["ema"])
        trainer.ema.decay = float(trainer.config.ema)      # a decay given on resume takes effect
    trainer.step = int(state["step"])
    trainer.position = DataPosition.from_dict(state["data_position"])
    trainer.divergence.bad_steps = int(state.get("bad_steps", 0))
    trainer.divergence.rollbacks = int(state.get("rollbacks", 0))
    _restore_rng(trainer, state)
    return trainer.step


def _restore_rng(trainer: Trainer, state: Dict) -> None:
    """The RNG states of the trainer's rank; reseeded (with a warning) when another number of processes wrote
    them."""
    dist = trainer.dist
    saved_world = int(state.get("world_size", 1))
    per_rank = state.get("rng_per_rank")
    if saved_world == dist.world_size:
        restore_rng_state(per_rank[dist.rank] if per_rank else state["rng"], _generators(trainer))
        return
    warnings.warn(f"the checkpoint was written by {saved_world} process(es) and {dist.world_size} resume it: "
                  f"the random streams are reseeded, so the run goes on but not bit for bit as it would have",
                  RuntimeWarning, stacklevel=3)
    seed = rank_seed(trainer.config.seed, dist.rank) * 1_000_003 + trainer.step
    seed_global_rngs(seed)
    trainer.augment_generator.manual_seed(seed)
    trainer.noise_generator.manual_seed(seed)
