"""DistributedDataParallel over the reversible engine (2 CPU processes, gloo backend): the averaged gradients
equal those of one process on the whole batch, as with plain autograd."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flow_checks import rel_err
from revglow import Glow, GlowConfig

pytestmark = pytest.mark.long(6)

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(memory: str, x: torch.Tensor) -> Glow:
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8, memory=memory, kernels="torch"))
    model = model.double()
    model.initialize(x)   # same batch on every rank: identical ActNorm statistics
    return model


def _ddp_gradients(rank: int, x: torch.Tensor):
    model = _model("reversible", x)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = x.shape[0] // WORLD
    torch.manual_seed(100 + rank)  # dequantization noise of this rank's shard
    ddp(x[rank * half:(rank + 1) * half]).mean().backward()
    return [p.grad for p in model.parameters()]


def test_ddp_gradients_match_single_process(library_run):
    x, ddp_grads = library_run["grads_x"], library_run["grads"]
    reference = _model("autograd", x)
    half = x.shape[0] // WORLD
    for rank in range(WORLD):
        torch.manual_seed(100 + rank)
        (reference(x[rank * half:(rank + 1) * half]).mean() / WORLD).backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert rel_err(torch.cat([g.flatten() for g in ddp_grads]), expected) < 1e-9


# ------------------------------------------------------------------------------ revglow train under torchrun

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["--levels", "2", "--depth", "1", "--hidden", "8", "--batch-size", "8", "--eval-batch-size", "512",
         "--no-progress", "--n-samples", "4", "--ema", "0.9", "--warmup", "1", "--eval-every", "0", "--sample-every",
         "0", "--kernels", "torch"]


def _spawn(fn, args, timeout=240):
    """WORLD processes running fn(rank, *args), with a deadline: a hung collective fails the test instead of
    stalling the suite.

    Forked, not spawned: a spawned worker starts a fresh interpreter and imports torch, revglow, scikit-learn
    (the digits) and torch._dynamo (which torch's optimizers and DDP import on first use) again, 3-4 s of CPU
    each, against well under 1 s of work. A forked one inherits them; every worker still starts its own process
    group and sets its own seeds. The fresh-interpreter path is the torchrun launch of the slow test below.
    Import what the workers need before calling this."""
    context = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {timeout} s")


def _init_group(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _without_noise():
    """Dequantization without noise, so that sharded and whole-batch computations see the same inputs."""
    real = Glow._dequantize
    Glow._dequantize = lambda self, x, noise=True, generator=None: real(self, x, False)


def _actnorm_init_states(rank: int, x: torch.Tensor):
    _without_noise()
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8, kernels="torch")).double()
    half = x.shape[0] // WORLD
    model.initialize(x[rank * half:(rank + 1) * half])     # this rank's shard only
    states = [None] * WORLD
    dist.all_gather_object(states, {k: v for k, v in model.state_dict().items() if "log_scale" in k or "bias" in k})
    return states


def _library_worker(rank: int, port: int, grads_x: torch.Tensor, init_x: torch.Tensor, path: str) -> None:
    """The library under DDP, without the trainer, in one pair of processes: the gradients of a reversible step,
    then ActNorm's data-dependent init on each rank's shard."""
    _init_group(rank, port)
    try:
        grads = _ddp_gradients(rank, grads_x)
        states = _actnorm_init_states(rank, init_x)
        if rank == 0:
            torch.save({"grads": grads, "init_states": states}, path)
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def library_run(tmp_path_factory):
    """One 2-process run of _library_worker, shared by the two library tests (one spawn instead of two)."""
    torch.manual_seed(0)
    grads_x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    torch.manual_seed(0)
    init_x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    init_x[3:] //= 4                                   # the shards differ: a per-shard init would show it
    path = str(tmp_path_factory.mktemp("ddp") / "library.pt")
    from torch import _dynamo  # noqa: F401  (DDP's constructor imports it: once here, not in each forked worker)
    _spawn(_library_worker, (_free_port(), grads_x, init_x, path))
    return dict(torch.load(path), grads_x=grads_x, init_x=init_x)


def test_actnorm_init_under_ddp_uses_the_whole_global_batch(library_run):
    x, states = library_run["init_x"], library_run["init_states"]
    real = Glow._dequantize
    try:
        _without_noise()
        torch.manual_seed(0)
        reference = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8, kernels="torch")).double()
        reference.initialize(x)
    finally:
        Glow._dequantize = real
    expected = reference.state_dict()
    for state in states:
        # Biases of later steps are ~1e-17 (their inputs already have zero mean): compare with an absolute floor.
        errors = {name: float((value - expected[name]).abs().max() / (1 + expected[name].abs().max()))
                  for name, value in state.items() if "actnorm" in name}
        assert len(errors) == 8 and max(errors.values()) < 1e-12, errors


def _train_worker(rank: int, port: int, out: str, grads_path: str, x: torch.Tensor) -> None:
    _init_group(rank, port)
    try:
        from revglow.cli import main
        from revglow.training.config import TrainConfig
        from revglow.training.trainer import Trainer
        from revglow.training.data import load_dataset

        assert main(["train", *TRAIN, "--max-steps", "2", "--out", out]) == 0
        assert main(["train", "--resume", "--out", out, "--max-steps", "4", "--no-progress"]) == 0
        # One step's gradients, averaged over the ranks, against one process on the combined batch (below).
        _without_noise()
        glow = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=1, hidden=8, kernels="torch", memory="reversible")
        trainer = Trainer(glow, TrainConfig(batch_size=2, out=out + "-grads", progress=False), data=load_dataset("digits"))
        trainer.model.initialize(x)
        half = x.shape[0] // WORLD
        record = trainer._train_step(x[rank * half:(rank + 1) * half], None)
        assert "skipped" not in record
        grads = [p.grad.clone() for p in trainer.model.parameters()]
        # A numerical failure on one rank only: both skip the step together (no rank waits for the other).
        if rank == 1:
            def forward(self, x, y=None, **options):
                raise torch.linalg.LinAlgError("linalg.inv: The diagonal element 1 is zero")
            Glow.forward = forward
        before = [p.detach().clone() for p in trainer.model.parameters()]
        failed = trainer._train_step(x[rank * half:(rank + 1) * half], None)
        unchanged = all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
        # Stop signals, agreed in the step: SIGTERM on every rank (as torchrun forwards it), then SIGINT on rank 0
        # alone. Every rank stops for the signal itself, however many ranks received it.
        from revglow.training.signals import StopSignals
        stops = []
        for received in ((signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, None)):
            trainer._signals = StopSignals(trainer)
            trainer._signals.received = received[rank]
            trainer._train_step(x[rank * half:(rank + 1) * half], None)
            stops.append(trainer._stop_requested())
        records = [None] * WORLD
        dist.all_gather_object(records, (failed, unchanged, trainer.step, stops))
        if rank == 0:
            torch.save({"grads": grads, "bpd": record["bpd"], "failed": records}, grads_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _single_process_step(x: torch.Tensor, out: Path):
    """One trainer step of plain autograd on the whole batch x in this process: its record and gradients."""
    from revglow.training.data import load_dataset
    from revglow.training.config import TrainConfig
    from revglow.training.trainer import Trainer

    real = Glow._dequantize
    try:
        _without_noise()
        glow = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=1, hidden=8, kernels="torch", memory="autograd")
        single = Trainer(glow, TrainConfig(batch_size=4, out=str(out), progress=False), data=load_dataset("digits"))
        single.model.initialize(x)
        record = single._train_step(x, None)
    finally:
        Glow._dequantize = real
    return record, torch.cat([p.grad.flatten() for p in single.model.parameters()])


def _losses(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["bpd"], r["lr"], r["grad_norm"]) for r in rows if "images_per_s" in r]


@pytest.mark.slow
def test_torchrun_train_checkpoint_resume_and_gradients(tmp_path):
    """`torchrun -m revglow train` for 4 steps against 2 + 2 steps with a resume in between (2 gloo processes):
    bit for bit the same weights and losses; every rank's RNG state and the world size are in the checkpoint;
    a step's averaged gradients equal those of one process on the combined batch."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    straight = tmp_path / "straight"
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                                 "--standalone", "-m", "revglow", "train", *TRAIN, "--max-steps", "4",
                                 "--out", str(straight)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=tmp_path)
    try:
        torch.manual_seed(1)
        x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
        # The single-process reference first, while torchrun starts: the forked workers then inherit what it
        # imports (the digits' scikit-learn, the optimizer's torch._dynamo) instead of importing it each.
        record, expected = _single_process_step(x, tmp_path / "single")
        resumed = tmp_path / "resumed"
        grads_path = str(tmp_path / "grads.pt")
        _spawn(_train_worker, (_free_port(), str(resumed), grads_path, x))
        out, err = torchrun.communicate(timeout=240)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
    assert torchrun.returncode == 0, err[-3000:]
    assert out.count("revglow train: digits") == 1 and "2 processes (gloo), global batch 16 = 8 x 2" in out

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["world_size"] == b["world_size"] == WORLD
    assert a["data_position"] == {"epoch": 0, "index": 64}
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert _losses(straight) == _losses(resumed) and [s for s, *_ in _losses(straight)] == [1, 2, 3, 4]
    ranks = b["rng_per_rank"]
    assert len(ranks) == WORLD and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert sorted(p.name for p in (resumed / "samples").iterdir())[0].startswith("step-00000002")

    saved = torch.load(grads_path)
    assert rel_err(torch.cat([g.flatten() for g in saved["grads"]]), expected) < 1e-5
    assert abs(saved["bpd"] - record["bpd"]) < 1e-5 * abs(record["bpd"])
    (rank0, unchanged0, step0, stops0), (rank1, unchanged1, step1, stops1) = saved["failed"]
    assert rank0["skipped"] == rank1["skipped"] == "singular" and unchanged0 and unchanged1 and step0 == step1 == 1
    assert stops0 == stops1 == [signal.SIGTERM, signal.SIGINT]
    assert rank0["error"] == "on another process" and "LinAlgError" in rank1["error"]
