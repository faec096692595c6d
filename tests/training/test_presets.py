"""revglow.training.presets and `revglow train --preset`: the paper's architectures and recipes as configs (no big model's
weights are built), flags over presets, clear errors, --print-config without the data."""
import json

import pytest

from revglow.training import data as data_module
from revglow.cli import main
from revglow.glow.config import GlowConfig
from revglow.training.config import TrainConfig
from revglow.errors import ConfigError
from revglow.training.presets import PRESET_NAMES, PRESETS, get_preset, preset_configs, preset_options
from revglow.training.model_defaults import MODEL_DEFAULTS

# (levels, depth, hidden, coupling, n_bits, image shape) the paper and the authors' README give.
PAPER = {
    "cifar10": (3, 32, 512, "affine", 8, (3, 32, 32)),
    "imagenet32": (3, 48, 512, "affine", 8, (3, 32, 32)),
    "imagenet64": (4, 48, 512, "affine", 8, (3, 64, 64)),
    "celeba256": (6, 32, 512, "additive", 5, (3, 256, 256)),
}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_is_a_valid_pair_of_configs(name):
    glow, train = preset_configs(name)
    assert isinstance(glow, GlowConfig) and isinstance(train, TrainConfig)
    assert glow.image_shape == get_preset(name).image_shape
    assert train.out == f"runs/{name}"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_have_the_papers_architecture_and_recipe(name):
    glow, train = preset_configs(name)
    assert (glow.levels, glow.depth, glow.hidden, glow.coupling, glow.n_bits, glow.image_shape) == PAPER[name]
    assert glow.permutation == "invconv" and glow.learn_top and glow.num_classes == 0
    assert glow.nn_actnorm and glow.edge_padding and glow.zero_logscale_factor == 3.0
    assert (train.optimizer, train.lr, train.warmup_epochs, train.warmup) == ("adamax", 1e-3, 10.0, None)
    # per-process batches of the reference: 64 and 256 scaled by (32 / image size)**2
    size = glow.image_shape[1]
    assert train.batch_size == 64 * 32 ** 2 // size ** 2 and train.init_batch_size == 256 * 32 ** 2 // size ** 2
    assert train.augment == ("shift" if name == "cifar10" else "none")
    if train.data == "folder":
        assert train.image_size == size


def test_digits_preset_is_the_demo():
    glow, train = preset_configs("digits")
    assert {k: getattr(glow, k) for k in MODEL_DEFAULTS["digits"]} == MODEL_DEFAULTS["digits"]
    assert (train.data, train.lr, train.max_steps, train.optimizer, train.augment) == ("digits", 3e-3, 1200, "adam",
                                                                                       "shift")


def test_overrides_win_and_replace_their_alternative():
    glow, train = preset_configs("cifar10", {"depth": 4, "permutation": "invconv_lu"},
                                 {"lr": 5e-4, "warmup": 7, "out": "elsewhere"})
    assert (glow.depth, glow.permutation, glow.levels) == (4, "invconv_lu", 3)
    assert (train.lr, train.warmup, train.warmup_epochs, train.out) == (5e-4, 7, None, "elsewhere")
    _, train = preset_configs("digits", train_overrides={"epochs": 2})
    assert train.epochs == 2 and train.max_steps is None
    assert PRESETS["digits"].train["max_steps"] == 1200, "the table is not modified"


def test_unknown_presets_and_options_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown preset 'cifar100'.*cifar10"):
        get_preset("cifar100")
    with pytest.raises(TypeError, match="string"):
        get_preset(None)
    with pytest.raises(ConfigError, match="no option.*'widht'"):
        preset_options("cifar10", {"widht": 3})
    with pytest.raises(ConfigError, match="image shape"):
        preset_options("cifar10", {"image_shape": (3, 64, 64)})


def test_cli_unknown_preset_is_a_usage_error(capsys):
    assert main(["train", "--preset", "cifar100", "--print-config"]) == 2
    assert "invalid choice: 'cifar100'" in capsys.readouterr().err


def test_cli_print_config_merges_flags_without_reading_data(tmp_path, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("--print-config with --preset must not read the data")

    monkeypatch.setattr(data_module, "load_dataset", no_data)
    monkeypatch.setattr("revglow.cli.train_command.load_dataset", no_data)
    assert main(["train", "--preset", "imagenet64", "--print-config", "--depth", "8", "--optimizer", "adam",
                 "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["preset"] == "imagenet64"
    assert shown["glow_config"]["levels"] == 4 and shown["glow_config"]["depth"] == 8
    assert shown["glow_config"]["image_shape"] == [3, 64, 64]
    assert shown["train_config"]["optimizer"] == "adam" and shown["train_config"]["batch_size"] == 16
    assert shown["train_config"]["out"] == str(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_preset_trains_and_refuses_data_of_another_shape(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["train", "--preset", "digits", "--max-steps", "2", "--depth", "1", "--hidden", "8",
                 "--batch-size", "8", "--eval-batch-size", "512", "--n-samples", "4", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "adam lr=0.003" in printed and "raw weights" in printed
    saved = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert saved["lr"] == 3e-3          # the preset's lr; warm-up min(200, 2 // 10) = 0 steps
    assert main(["train", "--preset", "cifar10", "--data", "digits", "--out", str(tmp_path / "c")]) == 1
    assert "--preset cifar10 is built for 3x32x32 images; the digits data are 1x8x8" in capsys.readouterr().err


def test_cli_preset_with_resume_is_refused(capsys):
    assert main(["train", "--preset", "digits", "--resume"]) == 1
    assert "--preset starts a new run" in capsys.readouterr().err
