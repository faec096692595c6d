"""Memory and time of one training step in each memory mode, and the largest batch that fits a budget.

`profile(model_or_config, ...)` (and `revglow profile` on the command line) trains one step of a Glow model, or
of any module built on `ReversibleSequence` with an example input, in each memory mode, and reports:

- parameters, gradients and Adam state (MiB), and the peak memory of the step above them ("activation"),
  measured two ways: exact accounting of the tensor storage the step allocates (`LiveStorageTracker`, a
  dispatch mode, the same on every device) and the device's own peak (CUDA's max_memory_allocated; on the CPU
  the peak resident set, with glibc told to hand large freed blocks back at once: `revglow.memory.device_meters`);
- where the device can be measured, the count again with each convolution's working buffers added while it
  runs ("with workspace"; they sit below the dispatcher, so the tracker measures them per call signature with
  `revglow.memory.workspaces`): the count that the device's peak should equal, and on the CPU does within 10%;
- the tensors live at the peak (op, shape, and the module or autograd node that made them);
- step time (median of interleaved rounds, without the tracker) and images/s;
- with two or more batch sizes, memory per sample and, given a budget, the largest batch that fits with
  parameters, gradients, Adam state and a measured allocator margin included (`plan_batch`).

Example:
    >>> from revglow import GlowConfig
    >>> rows = profile(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8), batch_sizes=(2, 4),
    ...                modes=("reversible",), rounds=1, device_peak=False)
    >>> rows[0]["mode"], rows[0]["activation_mib"] > 0
    ('reversible', True)
"""
from __future__ import annotations

import gc
import math
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from revglow.engine.options import MEMORY_MODES
from revglow.glow.config import GlowConfig
from revglow.memory.device_meters import device_peak as _device_peak
from revglow.errors import ConfigError, ConfigTypeError
from revglow.memory.workspaces import OpWorkspaces
from revglow.engine.sequence import ReversibleSequence

__all__ = ["profile", "plan_batch", "LiveStorageTracker", "parse_size", "format_table"]

MiB = float(2 ** 20)


# ----------------------------------------------------------------------------------------- the tracker
@dataclass
class _Live:
    nbytes: int
    label: str


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of tensor storage allocated while it is active and still alive: the running total, its
    peak, and the largest storages alive at the peak. Storages that existed before (parameters, gradients updated
    in place, optimizer state, the input) are not counted: an op's output is counted only when its storage is
    none of its inputs' (views and in-place results share their input's storage).

    Given `workspaces` (an `OpWorkspaces`), it also counts, while each of their ops runs, how far that op alone
    raises the device's memory (measured once per call signature: outputs and what it holds below the dispatcher),
    and keeps that peak apart: `peak_with_workspace`, with `workspace_at_peak` (bytes, op) the part of it that no
    tensor holds.

    Example:
        >>> with LiveStorageTracker() as tracker:
        ...     a = torch.ones(1024, 256)          # 1 MiB, alive at the end
        ...     b = (a * 2).sum()                 # a temporary of 1 MiB, freed
        >>> round(tracker.peak / 2**20), round(tracker.current / 2**20)
        (2, 1)
    """

    def __init__(self, root: Optional[nn.Module] = None, top: int = 5, workspaces: Optional[OpWorkspaces] = None):
        super().__init__()
        self.current = 0
        self.peak = 0
        self.workspaces = workspaces
        self.peak_with_workspace = 0
        self.workspace_at_peak: Tuple[int, str] = (0, "")
        self.workspace_unmeasured = False   # an op of `workspaces` ran on a device without a meter
        self.top = top
        self.at_peak: List[Tuple[int, str]] = []
        self._live: Dict[int, _Live] = {}
        self._snapshot_peak = 0
        self._names = {id(m): name or type(m).__name__ for name, m in root.named_modules()} if root is not None else {}
        self._stack: List[str] = []
        self._hooks = []

    def __enter__(self):
        if self._names:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
            self._hooks = [register_module_forward_pre_hook(self._push), register_module_forward_hook(self._pop)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _push(self, module, args):
        self._stack.append(self._names.get(id(module), type(module).__name__))

    def _pop(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def _where(self) -> str:
        node = torch._C._current_autograd_node()
        inside = self._stack[-1] if self._stack else ""
        if node is not None:
            return f"backward {node.name()}" + (f" (in {inside})" if inside else "")
        return inside or "outside any module"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        grown = None
        if self.workspaces is not None and func in self.workspaces:
            grown = self.workspaces.measure(func, args, kwargs)   # before the op: it runs it on the same inputs
            self.workspace_unmeasured |= grown is None
        before = self.current
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, func, inputs)
        if grown and before + grown > self.peak_with_workspace:   # the op's own rise, outputs included
            self.peak_with_workspace = before + grown
            new_outputs = self.current - before   # what _track just counted of the op's outputs
            self.workspace_at_peak = (max(0, grown - new_outputs),
                                      f"{getattr(func, '__name__', func)} in {self._where()}")
        return out

    def _track(self, t: torch.Tensor, func, inputs) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(storage)
        if key in inputs or key in self._live or storage.nbytes() == 0:
            return
        label = f"{func.__name__ if hasattr(func, '__name__') else func} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}, {self._where()}"
        self._live[key] = _Live(storage.nbytes(), label)
        self.current += storage.nbytes()
        weakref.finalize(storage, self._free, key)
        if self.current > self.peak_with_workspace:
            self.peak_with_workspace = self.current
            self.workspace_at_peak = (0, "")
        if self.current > self.peak:
            self.peak = self.current
            if self.peak > 1.005 * self._snapshot_peak:    # the top-k list: refreshed when the peak grows 0.5%
                self._snapshot_peak = self.peak
                largest = sorted(self._live.values(), key=lambda e: -e.nbytes)[:self.top]
                self.at_peak = [(e.nbytes, e.label) for e in largest]

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry.nbytes


# ------------------------------------------------------------------------------------- the workload
class _Workload:
    """A model in one memory mode, its Adam optimizer, and how to make a batch and a loss."""

    def __init__(self, model: nn.Module, make_batch: Callable[[int], tuple], loss: Callable, device: torch.device):
        self.model, self.make_batch, self.loss, self.device = model, make_batch, loss, device
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(self, batch) -> None:
        self.optimizer.zero_grad(set_to_none=False)   # gradients stay allocated, as the sizes below count them
        self.loss(self.model, *batch).backward()
        self.optimizer.step()

    def sizes(self) -> Dict[str, float]:
        params = list(self.model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts) / MiB  # noqa: E731
        return {"params_mib": size(params), "grads_mib": size(grads), "optimizer_mib": size(state)}


def _set_memory_mode(model: nn.Module, mode: str) -> None:
    sequences = [m for m in model.modules() if isinstance(m, ReversibleSequence)]
    if not sequences:
        raise ValueError("profile: the model holds no ReversibleSequence, so it has no memory mode to switch")
    for seq in sequences:
        seq.memory = mode


def _glow_workload(config: GlowConfig, mode: str, device: torch.device, state=None):
    from revglow.glow.model import Glow

    cfg = GlowConfig.from_dict({**config.to_dict(), "memory": mode})
    model = Glow(cfg).to(device)
    c, h, w = cfg.image_shape

    def make_batch(n: int):
        g = torch.Generator().manual_seed(n)
        x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8).to(device)
        y = torch.randint(0, cfg.num_classes, (n,), generator=g).to(device) if cfg.num_classes else None
        return (x, y)

    def loss(model, x, y):
        return model(x, y).mean()

    if state is None:
        model.initialize(*make_batch(max(2, min(16, 64 // max(1, h * w // 1024)))))
    else:
        model.load_state_dict(state)
    return _Workload(model, make_batch, loss, device)


def _module_workload(model: nn.Module, example: torch.Tensor, mode: str, device: torch.device, loss=None):
    model = model.to(device)
    _set_memory_mode(model, mode)

    def make_batch(n: int):
        reps = math.ceil(n / example.shape[0])
        return (example.to(device).repeat((reps,) + (1,) * (example.dim() - 1))[:n],)

    def default_loss(model, x):
        y, logdet = model(x)
        return (0.5 * y.square().flatten(1).sum(1) - logdet).mean()

    return _Workload(model, make_batch, loss or default_loss, device)


# -------------------------------------------------------------------------------------- measurement
def _measure(work: _Workload, batch_size: int, device_peak: bool, top: int,
             workspaces: Optional[OpWorkspaces] = None) -> Dict:
    """One batch size: a warm-up step, then the device's peak over one step, then the tracker's count over one
    more. The device goes first: the tracker's own Python objects (one per storage) and the workspace
    measurements would otherwise be part of the heap the device measurement starts from."""
    batch = work.make_batch(batch_size)
    work.step(batch)                       # warm-up: gradients, Adam state, lazy caches
    out = {"batch": batch_size, **work.sizes()}
    meter = _device_peak(work.device) if device_peak else None
    if meter is not None:
        gc.collect(1)                      # what the last steps left in reference cycles (young generations)
        with meter:
            work.step(batch)
        out["device_activation_mib"] = meter.peak / MiB
        if hasattr(meter, "reserved_ratio"):
            out["reserved_ratio"] = meter.reserved_ratio
    with LiveStorageTracker(work.model, top=top, workspaces=workspaces if meter is not None else None) as tracker:
        work.step(batch)
    out["activation_mib"] = tracker.peak / MiB
    out["live_at_peak"] = [{"mib": n / MiB, "tensor": label} for n, label in tracker.at_peak]
    if tracker.workspaces is not None and not tracker.workspace_unmeasured:
        out["activation_with_workspace_mib"] = tracker.peak_with_workspace / MiB
        out["workspace_at_peak"] = {"mib": tracker.workspace_at_peak[0] / MiB, "op": tracker.workspace_at_peak[1]}
    return out


def _time_steps(works: Dict[str, _Workload], batch_size: int, rounds: int) -> Dict[str, float]:
    batches = {m: w.make_batch(batch_size) for m, w in works.items()}
    times = {m: [] for m in works}
    for mode, work in works.items():   # warm-up: Adam state, lazy caches, first-call costs
        work.step(batches[mode])
    for r in range(rounds):
        for mode in (list(works) if r % 2 == 0 else list(reversed(works))):
            work = works[mode]
            if work.device.type == "cuda":
                torch.cuda.synchronize(work.device)
            t0 = time.perf_counter()
            work.step(batches[mode])
            if work.device.type == "cuda":
                torch.cuda.synchronize(work.device)
            times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def _fit(points: Sequence[Tuple[int, float]]) -> Tuple[float, float]:
    """Least-squares line (intercept, slope) of memory against batch."""
    if len(points) == 1:
        b, m = points[0]
        return 0.0, m / b
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    slope = sum((b - mean_b) * (m - mean_m) for b, m in points) / var
    return mean_m - slope * mean_b, slope


def plan_batch(fixed_mib: float, intercept_mib: float, per_sample_mib: float, budget_mib: float,
               margin: float) -> int:
    """Largest batch b with (fixed + intercept + per_sample * b) * (1 + margin) <= budget (0: none fits).

    Example:
        >>> plan_batch(fixed_mib=100, intercept_mib=10, per_sample_mib=5, budget_mib=1000, margin=0.1)
        159
    """
    if per_sample_mib <= 0:
        raise ConfigError(f"plan_batch: memory per sample must be positive; got {per_sample_mib}")
    room = budget_mib / (1 + margin) - fixed_mib - intercept_mib
    return max(0, int(math.floor(room / per_sample_mib + 1e-9)))


def parse_size(text: str) -> float:
    """'24GiB', '512MiB', '1.5GB', '800M' -> MiB (GB and GiB both read as 2**30 bytes, as device makers' tools do).

    Example:
        >>> parse_size("24GiB"), parse_size("512MiB")
        (24576.0, 512.0)
    """
    t = str(text).strip().lower().replace(" ", "")
    for suffix, scale in (("gib", 1024), ("gb", 1024), ("g", 1024), ("mib", 1), ("mb", 1), ("m", 1),
                          ("tib", 2 ** 20), ("tb", 2 ** 20), ("t", 2 ** 20)):
        if t.endswith(suffix):
            number = t[:-len(suffix)]
            break
    else:
        raise ConfigError(f"memory budget {text!r}: give a number with a unit, e.g. 24GiB or 512MiB")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"memory budget {text!r}: {number!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"memory budget {text!r} must be a positive size")
    return value * scale


def profile(model_or_config, example: Optional[torch.Tensor] = None, *, batch_sizes: Sequence[int] = (1, 2),
            modes: Sequence[str] = MEMORY_MODES, device: str = "cpu", rounds: int = 3, budget: Optional[str] = None,
            verify: bool = False, device_peak: bool = True, top: int = 5, loss: Optional[Callable] = None) -> List[Dict]:
    """One row per memory mode; see the module docstring. `model_or_config` is a GlowConfig, or a module with
    ReversibleSequence inside it together with `example` (a batch of inputs; larger batches repeat it) and
    optionally `loss(model, x) -> scalar` (default: a standard-normal negative log-likelihood of its (y, logdet))."""
    if isinstance(batch_sizes, int) or not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                                              for b in batch_sizes):
        raise ConfigError(f"profile: batch_sizes must be positive ints; got {batch_sizes!r}")
    for mode in modes:
        if mode not in MEMORY_MODES:
            raise ConfigError(f"profile: unknown memory mode {mode!r}; choose from {MEMORY_MODES}")
    if budget is not None and len(set(batch_sizes)) < 2:
        raise ConfigError("profile: a budget needs at least two batch sizes to fit memory against batch")
    dev = torch.device(device)
    batch_sizes = sorted(set(batch_sizes))

    if isinstance(model_or_config, GlowConfig):
        first = _glow_workload(model_or_config, modes[0], dev)
        state = first.model.state_dict()
        make = lambda mode: first if mode == modes[0] else _glow_workload(model_or_config, mode, dev, state)  # noqa: E731
    elif isinstance(model_or_config, nn.Module):
        if not isinstance(example, torch.Tensor):
            raise ConfigTypeError("profile: a module needs an example input tensor (example=...)")
        import copy
        base = model_or_config
        make = lambda mode: _module_workload(copy.deepcopy(base), example, mode, dev, loss)  # noqa: E731
    else:
        raise ConfigTypeError(f"profile: expects a GlowConfig or an nn.Module; got {type(model_or_config).__name__}")

    works = {mode: make(mode) for mode in modes}
    workspaces = OpWorkspaces()   # shared by the modes: their convolutions are the same calls
    rows = []
    step_times = _time_steps(works, batch_sizes[-1], rounds) if rounds > 0 else {}
    budget_mib = parse_size(budget) if budget is not None else None
    for mode in modes:
        points = [_measure(works[mode], b, device_peak, top, workspaces) for b in batch_sizes]
        last = points[-1]
        intercept, slope = _fit([(p["batch"], p["activation_mib"]) for p in points])
        row = {"mode": mode, "batch": last["batch"], "params_mib": last["params_mib"], "grads_mib": last["grads_mib"],
               "optimizer_mib": last["optimizer_mib"], "activation_mib": last["activation_mib"],
               "activation_mib_per_sample": slope if len(points) > 1 else last["activation_mib"] / last["batch"],
               "activation_mib_fixed": intercept if len(points) > 1 else None,
               "device_activation_mib": last.get("device_activation_mib"),
               "step_s": step_times.get(mode), "images_per_s": (batch_sizes[-1] / step_times[mode]
                                                                 if mode in step_times else None),
               "live_at_peak": last["live_at_peak"],
               "points": [{key: p.get(key) for key in ("batch", "activation_mib", "activation_with_workspace_mib",
                                                       "device_activation_mib")} for p in points]}
        if all("activation_with_workspace_mib" in p for p in points):
            row["activation_with_workspace_mib"] = last["activation_with_workspace_mib"]
            row["workspace_at_peak"] = last["workspace_at_peak"]
            if len(points) > 1:
                row["activation_with_workspace_mib_per_sample"] = _fit(
                    [(p["batch"], p["activation_with_workspace_mib"]) for p in points])[1]
        device_points = [(p["batch"], p["device_activation_mib"]) for p in points
                         if p.get("device_activation_mib") is not None]
        if len(device_points) == len(points) and len(points) > 1:
            row["device_activation_mib_per_sample"] = _fit(device_points)[1]
        if budget_mib is not None:
            # Plan from the device's own peaks when there are any (they include what no tensor shows: a
            # convolution library's workspace, the allocator's rounding), else from the tracker's count.
            plan_intercept, plan_slope = _fit(device_points) if len(device_points) == len(points) else (intercept, slope)
            if plan_slope <= 0:   # the device did not see the batch grow (a model too small for its resolution)
                plan_intercept, plan_slope = intercept, slope
            margin = _allocator_margin(points)
            fixed = row["params_mib"] + row["grads_mib"] + row["optimizer_mib"]
            row["allocator_margin"] = margin
            row["budget_mib"] = budget_mib
            row["max_batch"] = plan_batch(fixed, max(0.0, plan_intercept), plan_slope, budget_mib, margin)
            if verify and row["max_batch"] > 0:
                row["max_batch"], row["verify"] = _refine_and_verify(
                    make(mode), row["max_batch"], device_points or [(p["batch"], p["activation_mib"]) for p in points],
                    fixed, budget_mib, margin, top, device_peak)
        rows.append(row)
    return rows


def _allocator_margin(points: List[Dict]) -> float:
    """Room left for the allocator, as a fraction of the planned peak: on CUDA what the caching allocator reserved
    beyond what it handed out at the peak (measured), on the CPU (whose peaks are measured as resident memory,
    allocator included) a flat 5%; never less than 5%."""
    ratios = [p["reserved_ratio"] for p in points if p.get("reserved_ratio")]
    return max([0.05] + [r - 1 for r in ratios])


def _refine_and_verify(work: _Workload, batch: int, points: List[Tuple[int, float]], fixed_mib: float,
                       budget_mib: float, margin: float, top: int, device_peak: bool = True, max_rounds: int = 4):
    """Train one step at the planned batch for real; while the plan moves, refit the line through the two
    measured points nearest to it and try again (a line from small batches extrapolates poorly: per-step
    overheads that do not grow with the batch make it too steep). Returns (batch, the last measurement)."""
    points = sorted(points)

    def measure(b):
        out = _measure(work, b, device_peak=device_peak, top=top)
        peak = out.get("device_activation_mib", out["activation_mib"])
        return peak, {"batch": b, "activation_mib": out["activation_mib"],
                      "device_activation_mib": out.get("device_activation_mib"), "total_mib": fixed_mib + peak}

    for _ in range(max_rounds):
        peak, measured = measure(batch)
        points = sorted([p for p in points if p[0] != batch] + [(batch, peak)])
        intercept, slope = _fit(sorted(points, key=lambda p: abs(p[0] - batch))[:2])
        new_batch = plan_batch(fixed_mib, max(0.0, intercept), slope, budget_mib, margin) if slope > 0 else batch
        if new_batch == batch or new_batch < 1:
            return batch, measured
        batch = new_batch
    return batch, measure(batch)[1]


# ------------------------------------------------------------------------------------------- report
def _cell(value: Optional[float], fmt: str) -> str:
    """`value` in `fmt` (such as "9.1f"), or "-" right-aligned to the same width where there is none."""
    return f"{value:{fmt}}" if value is not None else f"{'-':>{fmt.split('.')[0]}}"


def format_table(rows: List[Dict]) -> str:
    """The plain-text table `revglow profile` prints. "activ.": the tensors' count; "+ wksp": the same count with
    each convolution's working buffers added while it runs (where the device can be measured); "device": the
    device's own peak; "/sample": memory per sample of the count (with workspace where there is one)."""
    lines = []
    head = (f"{'mode':<11} {'params':>8} {'grads':>8} {'adam':>8} {'activ.':>9} {'+ wksp':>9} {'device':>9} "
            f"{'/sample':>9} {'step s':>8} {'img/s':>8}")
    if any("max_batch" in r for r in rows):
        head += f" {'max batch':>10}"
    lines.append(head + "   (MiB)")
    for r in rows:
        per_sample = r.get("activation_with_workspace_mib_per_sample", r["activation_mib_per_sample"])
        line = (f"{r['mode']:<11} {r['params_mib']:8.1f} {r['grads_mib']:8.1f} {r['optimizer_mib']:8.1f} "
                f"{r['activation_mib']:9.1f} {_cell(r.get('activation_with_workspace_mib'), '9.1f')} "
                f"{_cell(r.get('device_activation_mib'), '9.1f')} {per_sample:9.2f} "
                f"{_cell(r.get('step_s') or None, '8.3f')} {_cell(r.get('images_per_s') or None, '8.1f')}")
        if "max_batch" in r:
            line += f" {r['max_batch']:10d}"
        lines.append(line)
    for r in rows:
        lines.append(f"\n{r['mode']}: largest tensors alive at the peak (batch {r['batch']})")
        for item in r["live_at_peak"]:
            lines.append(f"  {item['mib']:9.2f} MiB  {item['tensor']}")
        if r.get("workspace_at_peak", {}).get("mib"):
            w = r["workspace_at_peak"]
            lines.append(f"  counted with workspaces, the peak is at {w['op']}; its working buffers hold {w['mib']:.2f} MiB")
        if "max_batch" in r:
            lines.append(f"  budget {r['budget_mib']:.0f} MiB, allocator margin {100 * r['allocator_margin']:.0f}%: "
                         f"largest batch {r['max_batch']}")
        if "verify" in r:
            v = r["verify"]
            lines.append(f"  verified: one step at batch {v['batch']} peaked at {v['total_mib']:.1f} MiB with "
                         f"parameters, gradients and Adam state ({'within' if v['total_mib'] <= r['budget_mib'] else 'OVER'}"
                         f" the budget)")
    return "\n".join(lines)
