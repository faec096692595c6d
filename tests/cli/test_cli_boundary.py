"""What the command line promises at its boundary: a flag value a command cannot use is a usage error (exit 2, no
traceback); a checkpoint whose weights do not fit its configuration, weights that give no finite result, running
out of memory, a full disk and SIGINT/SIGTERM are one line each, leaving no partial file; --threads reaches torch."""
import errno
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from revglow import Glow, GlowConfig
from revglow.cli import main
from revglow.training.checkpoints import load_checkpoint, save_checkpoint

TINY = dict(image_shape=(1, 8, 8), levels=2, depth=1, hidden=8, n_bits=4)


def _save(path, glow, **changes):
    state = {"model": glow.state_dict(), "glow_config": glow.config.to_dict(), "train_config": {"data": "digits"},
             "step": 0, **changes}
    save_checkpoint(state, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An initialized, untrained 4-bit digits model (built, not trained: the commands read it the same way)."""
    torch.manual_seed(0)
    model = Glow(GlowConfig(**TINY))
    model.initialize(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8))
    return _save(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", model)


def _one_line(capsys, code, status, *fragments):
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("revglow") and "error: " in line, err
    if status == 1:
        assert err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.mark.parametrize("argv,message", [
    (["sample", "--nrow", "0"], "argument --nrow: must be an int >= 1; got '0'"),
    (["sample", "--n", "0"], "argument --n: must be an int >= 1"),
    (["sample", "--batch-size", "0"], "argument --batch-size: must be an int >= 1"),
    (["sample", "--temperature", "nan"], "argument --temperature: must be a finite number >= 0; got 'nan'"),
    (["sample", "--temperature", "inf"], "got 'inf'"),
    (["sample", "--temperature", "-1"], "got '-1'"),
    (["sample", "--device", "meta"], "argument --device: 'meta' is not a device revglow runs on"),
    (["eval", "--workers", "-1"], "argument --workers: must be an int >= 0; got '-1'"),
    (["eval", "--draws", "0"], "argument --draws: must be an int >= 1"),
    (["eval", "--device", "meta"], "'meta' is not a device"),
    (["eval", "--threads", "0"], "argument --threads: must be an int >= 1"),
    (["interpolate", "--steps", "1", "--images", "a.png", "b.png"], "argument --steps: must be an int >= 2"),
    (["profile", "--device", "meta"], "'meta' is not a device"),
    (["profile", "--module", "m:f", "--input-shape", "2,x"], "argument --input-shape: must be comma-separated"),
])
def test_flag_values_a_command_cannot_use_are_usage_errors(checkpoint, tmp_path, capsys, argv, message):
    if argv[0] != "profile":
        argv = argv + ["--checkpoint", checkpoint]
    if argv[0] in ("sample", "interpolate"):
        argv = argv + ["--out", str(tmp_path / "out.png")]
    _one_line(capsys, main(argv), 2, message)
    assert not (tmp_path / "out.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_a_missing_gpu_is_one_line(checkpoint, tmp_path, capsys):
    _one_line(capsys, main(["profile", "--device", "cuda", "--levels", "1", "--depth", "1", "--image-shape", "1",
                            "4", "4"]), 1, "CUDA is not available on this machine")
    _one_line(capsys, main(["sample", "--checkpoint", checkpoint, "--device", "cuda", "--out",
                            str(tmp_path / "s.png")]), 1, "CUDA is not available")


def test_weights_of_another_configuration_are_one_line(checkpoint, tmp_path, capsys):
    """5-bit weights under a 4-bit glow_config (the same tensors: torch would load them and compute another
    density), and weights of another width saved without their configuration (torch's list of every tensor)."""
    state = load_checkpoint(checkpoint)
    five = Glow(GlowConfig(**{**TINY, "n_bits": 5}))
    five.initialize(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8))
    bits = _save(tmp_path / "bits.pt", five, glow_config=state["glow_config"])
    wide = Glow(GlowConfig(**{**TINY, "hidden": 16}))
    shapes = _save(tmp_path / "shapes.pt", wide, glow_config=state["glow_config"], model=dict(wide.state_dict()))
    for command in (["eval"], ["sample", "--out", str(tmp_path / "s.png")]):
        _one_line(capsys, main(command + ["--checkpoint", bits]), 1,
                  "bits.pt: its weights are of a Glow with n_bits=5, its glow_config says n_bits=4")
        _one_line(capsys, main(command + ["--checkpoint", shapes]), 1, "shapes.pt: its weights do not fit its "
                  "glow_config: size mismatch for", "more)")
    assert not (tmp_path / "s.png").exists()


@pytest.fixture(scope="module")
def overflowing(checkpoint, tmp_path_factory):
    """Finite weights whose every log-scale is 60: every density and sample overflows."""
    state = load_checkpoint(checkpoint)
    for name, value in state["model"].items():
        if name.endswith("log_scale") or ".logs" in name:
            value.fill_(60.0)
    path = tmp_path_factory.mktemp("overflow") / "checkpoint.pt"
    save_checkpoint(state, path)
    return str(path)


def test_non_finite_results_are_errors_not_nan_or_a_black_grid(overflowing, tmp_path, capsys):
    _one_line(capsys, main(["eval", "--checkpoint", overflowing]), 1,
              "359 of 359 test images have non-finite bits/dim", "gives no usable density")
    grid = tmp_path / "grid.png"
    _one_line(capsys, main(["sample", "--checkpoint", overflowing, "--n", "6", "--out", str(grid)]), 1,
              "all 6 samples decode to NaN or Inf", "nothing written")
    assert not grid.exists()


def test_some_non_finite_samples_are_counted_and_drawn_black(checkpoint, tmp_path, capsys, monkeypatch):
    real_decode = Glow.decode

    def decode(self, latents, y=None, context=None):    # the first image of every batch overflows
        out = real_decode(self, latents, y, context)
        out[0] = float("inf")
        return out

    monkeypatch.setattr(Glow, "decode", decode)
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", checkpoint, "--n", "6", "--batch-size", "3", "--nrow", "6",
                 "--out", str(grid)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "revglow: warning: 2 of 6 samples decode to NaN or Inf; they are drawn black\n"
    with Image.open(grid) as picture:
        pixels = torch.from_numpy(np.asarray(picture).copy())
    scale = pixels.shape[1] // 55                       # 6 images of 8 pixels and 7 lines of padding, enlarged
    first, fourth = [pixels[scale:9 * scale, (1 + 9 * i) * scale:(9 + 9 * i) * scale] for i in (0, 3)]
    assert int(first.max()) == 0 and int(fourth.max()) == 0 and int(pixels.max()) > 0


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 4294967296 bytes."),
                                   MemoryError()])
def test_out_of_memory_is_one_line_naming_the_batch_flag(checkpoint, tmp_path, capsys, monkeypatch, error):
    def decode(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Glow, "decode", decode)
    _one_line(capsys, main(["sample", "--checkpoint", checkpoint, "--out", str(tmp_path / "s.png")]), 1,
              "out of memory (", "); try a smaller --batch-size")
    monkeypatch.setattr(Glow, "log_prob", decode)
    _one_line(capsys, main(["eval", "--checkpoint", checkpoint]), 1, "try a smaller --batch-size")


def test_other_runtime_errors_keep_their_traceback(checkpoint, tmp_path, monkeypatch):
    def decode(self, *args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Glow, "decode", decode)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["sample", "--checkpoint", checkpoint, "--out", str(tmp_path / "s.png")])


def test_a_full_disk_leaves_no_partial_image(checkpoint, tmp_path, capsys, monkeypatch):
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"the previous grid")
    def save(self, fp, format=None, **params):       # writes part of the file, then the disk is full
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)
    _one_line(capsys, main(["sample", "--checkpoint", checkpoint, "--n", "4", "--out", str(grid)]), 1,
              "No space left on device")
    assert grid.read_bytes() == b"the previous grid" and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    fresh = tmp_path / "fresh.png"
    assert main(["sample", "--checkpoint", checkpoint, "--n", "4", "--out", str(fresh)]) == 1
    assert not fresh.exists()


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_sampling_without_a_file(checkpoint, tmp_path, capsys, monkeypatch, signum, status):
    real_decode = Glow.decode
    calls = []

    def decode(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signum)             # the handler raises here, within the second batch
        return real_decode(self, *args, **kwargs)

    monkeypatch.setattr(Glow, "decode", decode)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["sample", "--checkpoint", checkpoint, "--n", "9", "--batch-size", "3", "--out",
                 str(tmp_path / "s.png")])
    assert code == status and len(calls) == 2
    assert capsys.readouterr().err == f"revglow: interrupted by {signal.Signals(signum).name}; nothing was written\n"
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is before


def test_threads_reaches_torch_on_every_command(checkpoint, tmp_path, monkeypatch):
    from revglow.cli.parser import build_parser

    parser = build_parser()
    for command in ("train", "eval", "sample", "interpolate", "manipulate", "profile"):
        assert "--threads" in parser._subparsers._group_actions[0].choices[command].format_help()
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["sample", "--checkpoint", checkpoint, "--n", "2", "--threads", "3", "--out",
                 str(tmp_path / "s.png")]) == 0
    assert main(["sample", "--checkpoint", checkpoint, "--n", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert calls == [3]                                 # and without the flag, torch's own default is left alone
