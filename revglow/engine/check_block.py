"""check_block: the first thing to run on a new invertible block, before training it in a ReversibleSequence.

Each check is a row of the report (name, passed, detail):

    contract              forward(x[, context]) -> (y, logdet [N]), y with x's batch and size; inverse(y) -> (x, logdet)
    inverse logdet        inverse returns the forward map's logdet (the contract's sign convention)
    round trip            inverse(forward(x)) == x in eval mode (dropout off), within the dtype's tolerance
    logdet                logdet == log|det dy/dx| of the brute-force Jacobian per sample (float64 copy, eval mode);
                          run when jacobian=True, or for jacobian=None when a sample has <= 64 values
    inverse_vjp           (a block that has one) the rebuilt input and every gradient equal autograd's
    unregistered tensors  forward's graph reaches no tensor that requires grad but the input, context and parameters
    gradients (<mode>)    memory "reversible", "checkpoint": dL/dx, dL/dcontext and every dL/dparameter of a training
                          step (train mode, a random linear loss of y and logdet) equal plain autograd's; every mode
                          runs ReversibleSequence([block], memory=mode) around the same copy of the block, from the
                          same seed, so dropout draws the same masks
    buffers (<mode>)      buffers after that step (BatchNorm's running statistics) equal what autograd leaves

The caller's block is not changed (the checks run on deep copies, in a forked RNG stream, by autograd.grad). With
raise_on_failure=True (the default: a check in a user's test must not pass silently) a failure raises
BlockCheckError, a ValueError whose message is the report.

Example:
    >>> from torch import nn
    >>> from revglow.engine.coupling import AffineCoupling
    >>> block = AffineCoupling(nn.Conv2d(2, 4, 3, padding=1)).double()
    >>> report = check_block(block, torch.randn(2, 4, 3, 3, dtype=torch.float64))
    >>> report.ok, [name for name, passed, detail in report.checks][:3]
    (True, ['contract', 'inverse logdet', 'round trip'])
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from revglow.engine.contract import StepContractError, checked_pair, checked_vjp_result, vjp
from revglow.engine.reconstruction import ReconstructionWarning
from revglow.engine.sequence import ReversibleSequence
from revglow.engine.unregistered import UnregisteredTensors

__all__ = ["check_block", "BlockCheckReport", "CheckResult", "BlockCheckError", "JACOBIAN_AUTO_MAX_DIMS"]

Tensor = torch.Tensor
Context = Optional[Tensor]
JACOBIAN_AUTO_MAX_DIMS = 64     # jacobian=None computes the brute-force Jacobian up to this many values per sample
_JACOBIAN_SAMPLES = 8           # ... of at most this many samples
_LOGDET_TOLERANCE = 1e-6        # |logdet - log|det J||, float64, relative to max(1, |log|det J||)
_CHECKED_MODES = ("reversible", "checkpoint")


# round_trip: |inverse(forward(x)) - x| / |x|; gradient: |grad - autograd's| / |autograd's|, per tensor
_Tolerance = NamedTuple("_Tolerance", [("round_trip", float), ("gradient", float)])
_TOLERANCES = {torch.float64: _Tolerance(1e-9, 1e-7), torch.float32: _Tolerance(1e-5, 1e-4),
               torch.float16: _Tolerance(1e-2, 5e-2), torch.bfloat16: _Tolerance(2e-2, 1e-1)}


class CheckResult(NamedTuple):
    """One row of the report."""
    name: str
    passed: bool
    detail: str


@dataclass
class BlockCheckReport:
    """What check_block found: `ok` (every check run passed), the rows `checks`, and `skipped` (name, why)."""
    block: str
    checks: List[CheckResult]
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every check that ran passed."""
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> List[str]:
        """The names of the checks that failed."""
        return [check.name for check in self.checks if not check.passed]

    def __str__(self) -> str:
        verdict = "passed every check" if self.ok else f"FAILED {', '.join(self.failed)}"
        lines = [f"check_block({self.block}): {verdict}"]
        width = max(len(check.name) for check in self.checks)
        lines += [f"  {'ok  ' if c.passed else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in self.checks]
        lines += [f"  skip  {name:<{width}}  {why}" for name, why in self.skipped]
        return "\n".join(lines)


class BlockCheckError(ValueError):
    """check_block(..., raise_on_failure=True) found a failure; `report` holds every row."""

    def __init__(self, report: BlockCheckReport):
        super().__init__(str(report))
        self.report = report


def check_block(block: nn.Module, example_input: Tensor, context: Optional[Tensor] = None, *,
                jacobian: Optional[bool] = None, modes: Sequence[str] = _CHECKED_MODES, seed: int = 0,
                raise_on_failure: bool = True) -> BlockCheckReport:
    """Check that `block` keeps the step contract and trains in every memory mode as under plain autograd.

    `example_input` is a batch [N, ...] (float64 gives the sharpest checks), `context` the conditioning input
    for a conditional block. `jacobian`: True computes the brute-force Jacobian whatever the size, False never,
    None when a sample has at most JACOBIAN_AUTO_MAX_DIMS values. `modes`: the memory modes held to autograd.
    `seed` seeds the training steps (dropout). See the module docstring for the checks.
    """
    _check_arguments(block, example_input, context, jacobian, modes, seed, raise_on_failure)
    devices = sorted({t.device.index or 0 for t in (example_input, context) if isinstance(t, Tensor) and t.is_cuda})
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.simplefilter("ignore", ReconstructionWarning)   # the gradient checks report it themselves
        report = _run_checks(block, example_input.detach(), None if context is None else context.detach(),
                             jacobian, tuple(modes), seed)
    if raise_on_failure and not report.ok:
        raise BlockCheckError(report)
    return report


def _check_arguments(block: object, x: object, context: object, jacobian: object, modes: object, seed: object,
                     raise_on_failure: object) -> None:
    for name, value, kind in (("block", block, nn.Module), ("example_input", x, Tensor), ("seed", seed, int),
                              ("raise_on_failure", raise_on_failure, bool)):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"check_block: {name} must be a {kind.__name__}; got {type(value).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"check_block: example_input must be a floating-point tensor; got {x.dtype}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"check_block: example_input must be a batch [N, ...] with N >= 1 and at least one more "
                         f"dimension; got shape {tuple(x.shape)}")
    if context is not None and not isinstance(context, Tensor):
        raise TypeError(f"check_block: context must be a tensor or None; got {type(context).__name__}")
    if jacobian is not None and not isinstance(jacobian, bool):
        raise TypeError(f"check_block: jacobian must be True, False or None; got {jacobian!r}")
    if isinstance(modes, str) or any(m not in _CHECKED_MODES for m in modes):
        raise ValueError(f"check_block: modes must be a sequence of {_CHECKED_MODES}; got {modes!r}")


def _run_checks(block: nn.Module, x: Tensor, context: Context, jacobian: Optional[bool], modes: Tuple[str, ...],
                seed: int) -> BlockCheckReport:
    try:
        work = copy.deepcopy(block)   # every check changes state somewhere: .training, buffers, lazy init
    except Exception as error:  # noqa: BLE001 - anything deepcopy raises means the same to the user
        raise TypeError(f"check_block works on a copy of the block, but copy.deepcopy({type(block).__name__}) "
                        f"failed: {type(error).__name__}: {error}") from error
    tol = _TOLERANCES.get(x.dtype, _TOLERANCES[torch.float32])
    report = BlockCheckReport(type(block).__name__, [])
    contract, outputs = _check_contract(work, x, context)
    report.checks.append(contract)
    if outputs is None:
        report.skipped.append(("the other checks", "they need the step contract"))
        return report
    report.checks += _check_round_trip(x, *outputs, tol)
    dims = x[0].numel()
    if jacobian or (jacobian is None and dims <= JACOBIAN_AUTO_MAX_DIMS):
        report.checks.append(_check_logdet(work, x, context))
    else:
        why = "jacobian=False" if jacobian is False else \
            f"{dims} values per sample > {JACOBIAN_AUTO_MAX_DIMS}; pass jacobian=True to compute it anyway"
        report.skipped.append(("logdet", why))
    if callable(getattr(work, "inverse_vjp", None)):
        report.checks.append(_check_inverse_vjp(work, x, context, outputs[0], tol))
    registered, unregistered = _check_registered(work, x, context)
    report.checks.append(registered)
    report.checks += _check_modes(work, x, context, modes, seed, tol, unregistered)
    if not list(work.buffers()):
        report.skipped.append(("buffers", "the block has none"))
    return report


# ------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _training(module: nn.Module, mode: bool) -> Iterator[None]:
    """Every submodule in train (True) or eval mode within the block; each one's own flag back after it."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(mode)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _call(block: nn.Module, x: Tensor, context: Context, method: str = "forward") -> object:
    fn = block if method == "forward" else getattr(block, method)
    return fn(x) if context is None else fn(x, context)


def _inputs(x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Copies of the input and (a floating-point) context that require grad."""
    wants = context is not None and context.is_floating_point()
    return x.clone().requires_grad_(True), context.clone().requires_grad_(True) if wants else context


def _relative(a: Optional[Tensor], b: Optional[Tensor], floor: float = 0.0) -> float:
    """|a - b| / max(|b|, floor) in float64; a missing gradient counts as zeros."""
    if a is None and b is None:
        return 0.0
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    if a.shape != b.shape:
        return math.inf
    diff = float(torch.linalg.vector_norm((a.double() - b.double()).flatten()))
    scale = max(float(torch.linalg.vector_norm(b.double().flatten())), floor)
    return diff / scale if scale > 0 else diff


def _random_like(t: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device=t.device, dtype=t.dtype)


# -------------------------------------------------------------------------------------- contract and inverse
def _check_contract(work: nn.Module, x: Tensor, context: Context) -> Tuple[CheckResult, Optional[Tuple[Tensor, ...]]]:
    """The contract row (in the engine's own words), and (y, logdet, rebuilt x, inverse's logdet) when it holds."""
    if not callable(getattr(work, "inverse", None)):
        return CheckResult("contract", False, "the block has no inverse(y) -> (x, logdet)"), None
    n, stage = x.shape[0], "forward"
    try:
        with _training(work, False), torch.no_grad():
            y, logdet = checked_pair(_call(work, x, context), work, None, "forward", n)
            if y.numel() != x.numel():
                raise StepContractError(f"forward maps {list(x.shape)} to {list(y.shape)}: an invertible block keeps "
                                        f"the number of values per sample")
            stage = "inverse"
            rebuilt, inverse_logdet = checked_pair(_call(work, y, context, "inverse"), work, None, "inverse", n)
            if rebuilt.shape != x.shape:
                raise StepContractError(f"inverse(forward(x)) has shape {list(rebuilt.shape)}, x {list(x.shape)}")
    except StepContractError as error:
        return CheckResult("contract", False, str(error)), None
    except Exception as error:  # noqa: BLE001 - reported, not raised: the report names the failing check
        return CheckResult("contract", False, f"{stage} raised {type(error).__name__}: {error}"), None
    return CheckResult("contract", True, f"forward and inverse return (tensor, logdet [{n}])"), \
        (y, logdet, rebuilt, inverse_logdet)


def _check_round_trip(x: Tensor, y: Tensor, logdet: Tensor, rebuilt: Tensor, inverse_logdet: Tensor,
                      tol: _Tolerance) -> List[CheckResult]:
    """The rows "inverse logdet" and "round trip" from the contract check's eval-mode outputs."""
    logdet_err = _relative(inverse_logdet, logdet)
    if logdet_err <= tol.round_trip or float((inverse_logdet - logdet).abs().max()) <= tol.round_trip:
        logdet_row = CheckResult("inverse logdet", True, "inverse returns the forward's logdet")
    else:
        flipped = _relative(-inverse_logdet, logdet) <= tol.round_trip
        logdet_row = CheckResult("inverse logdet", False, (
            "inverse returns minus the forward's logdet; " if flipped else
            f"inverse's logdet differs from forward's by relative {logdet_err:.3g}; ") +
            "the contract: inverse(y) returns log|det dy/dx| of the forward map at x")
    err = _relative(rebuilt, x)
    worst = int((rebuilt - x).flatten(1).norm(dim=1).argmax()) if err > 0 else 0
    detail = f"|inverse(forward(x)) - x| / |x| = {err:.3g} (tolerance {tol.round_trip:g} for {x.dtype}, eval mode)"
    if err > tol.round_trip:
        detail += f"; the worst sample is {worst}"
    return [logdet_row, CheckResult("round trip", err <= tol.round_trip, detail)]


# ---------------------------------------------------------------------------------------------- logdet
def _check_logdet(work: nn.Module, x: Tensor, context: Context) -> CheckResult:
    """forward's logdet against slogdet of the autograd Jacobian, per sample, in float64 on a copy."""
    try:
        block = copy.deepcopy(work).to(torch.float64)
        x64 = x.to(torch.float64)
        c64 = context.to(torch.float64) if context is not None and context.is_floating_point() else context
        with _training(block, False):
            with torch.no_grad():
                logdet = _call(block, x64, c64)[1]
            errors = []
            for i in range(min(x.shape[0], _JACOBIAN_SAMPLES)):
                ci = c64[i:i + 1] if c64 is not None and c64.dim() > 0 and c64.shape[0] == x.shape[0] else c64
                jac = torch.autograd.functional.jacobian(
                    lambda v: _call(block, v.reshape(x64[i:i + 1].shape), ci)[0].reshape(-1), x64[i].reshape(-1))
                sign, logabs = torch.linalg.slogdet(jac)
                errors.append((i, float(logdet[i]), float(logabs), float(sign)))
    except Exception as error:  # noqa: BLE001
        return CheckResult("logdet", False, f"the brute-force Jacobian failed: {type(error).__name__}: {error}")
    singular = [i for i, _, _, sign in errors if sign == 0]
    if singular:
        return CheckResult("logdet", False, f"the Jacobian of sample(s) {singular} is singular: the block is not "
                                            f"invertible there")
    bad = [(i, got, want) for i, got, want, _ in errors if not abs(got - want) <= _LOGDET_TOLERANCE * max(1, abs(want))]
    if bad:
        i, got, want = bad[0]
        hint = " (the wrong sign: logdet = +log|det dy/dx|)" if abs(got + want) <= 1e-6 * max(1, abs(want)) else ""
        return CheckResult("logdet", False, f"sample {i}: forward's logdet {got:.6g}, log|det dy/dx| of the "
                                            f"Jacobian {want:.6g}{hint}; {len(bad)} of {len(errors)} samples off")
    worst = max(abs(got - want) for _, got, want, _ in errors)
    return CheckResult("logdet", True, f"matches log|det| of the brute-force Jacobian (float64, {len(errors)} "
                                       f"samples, max error {worst:.2g})")


# ---------------------------------------------------------------------------------------------- inverse_vjp
def _check_inverse_vjp(work: nn.Module, x: Tensor, context: Context, y: Tensor, tol: _Tolerance) -> CheckResult:
    """The block's inverse_vjp (eval mode) against autograd through its forward."""
    gen = torch.Generator().manual_seed(1)
    grad_y, grad_logdet = _random_like(y, gen), _random_like(y.new_empty(x.shape[0]), gen)
    params = dict((id(p), (name, p)) for name, p in work.named_parameters() if p.requires_grad)
    (x_ref, c_ref), (_, c_arg) = _inputs(x, context), _inputs(x, context)
    wants_context = c_ref is not None and c_ref.requires_grad
    with _training(work, False), torch.enable_grad():
        y_ref, logdet_ref = _call(work, x_ref, c_ref)
        inputs = [x_ref] + ([c_ref] if wants_context else []) + [p for _, p in params.values()]
        ref = list(vjp([y_ref, logdet_ref], [grad_y, grad_logdet], inputs))
        try:
            out = (work.inverse_vjp(y, grad_y, grad_logdet) if context is None else
                   work.inverse_vjp(y, grad_y, grad_logdet, c_arg))
            rebuilt, grad_x, param_grads, grad_context = checked_vjp_result(out, work, None, y, context is not None)
        except StepContractError as error:
            return CheckResult("inverse_vjp", False, str(error))
        except Exception as error:  # noqa: BLE001
            return CheckResult("inverse_vjp", False, f"inverse_vjp raised {type(error).__name__}: {error}")
    if any(id(k) not in params for k in param_grads):
        return CheckResult("inverse_vjp", False, "inverse_vjp's param_grads has keys that are not parameters of "
                                                 "the block that require grad")
    got = {"rebuilt input": (rebuilt, x), "dL/dx": (grad_x, ref.pop(0))}
    if wants_context:
        got["dL/dcontext"] = (grad_context, ref.pop(0))
    got.update({f"dL/d{name}": (param_grads.get(p), g) for (name, p), g in zip(params.values(), ref)})
    return _compare_row("inverse_vjp", got, tol.gradient, "equal autograd's through forward in eval mode")


def _compare_row(name: str, pairs: Dict[str, Tuple[Optional[Tensor], Optional[Tensor]]], tolerance: float,
                 what: str) -> CheckResult:
    """Each pair (got, reference) within `tolerance`, relative to the reference or, for a reference near zero (the
    gradient of a bias that BatchNorm cancels), to 100 ulp of the row's largest reference: rounding, not an error."""
    references = [b for _, b in pairs.values() if b is not None and b.is_floating_point()]
    largest = max((float(torch.linalg.vector_norm(b.double().flatten())) for b in references), default=0.0)
    ulp = max((torch.finfo(b.dtype).eps for b in references), default=0.0)
    floor = 100 * ulp * largest / tolerance
    errors = {key: _relative(*pair, floor=floor) for key, pair in pairs.items()}
    bad = {key: err for key, err in errors.items() if not err <= tolerance}
    if bad:
        listed = ", ".join(f"{key} {err:.3g}" for key, err in list(bad.items())[:6])
        return CheckResult(name, False, f"relative errors above {tolerance:g}: {listed}"
                                        f"{', ...' if len(bad) > 6 else ''}")
    worst = max(errors.values(), default=0.0)
    return CheckResult(name, True, f"{len(pairs)} tensors {what}, max relative error {worst:.2g}")


# ----------------------------------------------------------------------------------------- unregistered tensors
def _name_of(tensor: Tensor, work: nn.Module) -> str:
    """Where the block holds `tensor`: a plain attribute, or a parameter of a module kept in a plain list."""
    for module_name, module in work.named_modules():
        for attr, value in vars(module).items():
            where = f"{module_name}.{attr}" if module_name else attr
            if value is tensor:
                return f"{where} {list(tensor.shape)}"
            for i, item in enumerate(value if isinstance(value, (list, tuple)) else ()):
                for name, p in item.named_parameters() if isinstance(item, nn.Module) else ():
                    if p is tensor:
                        return f"{where}[{i}].{name} {list(tensor.shape)} (a module in a plain list: not registered)"
    return f"a tensor of shape {list(tensor.shape)} (closed over, or a global)"


def _check_registered(work: nn.Module, x: Tensor, context: Context) -> Tuple[CheckResult, Dict[str, Tensor]]:
    """The row, and the tensors the block uses without registering them, by name (the engine's own finder)."""
    known = [*work.parameters(), x] + ([] if context is None else [context])
    try:
        with _training(work, False), torch.no_grad(), UnregisteredTensors(known) as finder:
            _call(work, x, context)
    except Exception as error:  # noqa: BLE001
        return CheckResult("unregistered tensors", False, f"forward raised {type(error).__name__}: {error}"), {}
    found = {_name_of(t, work): t for t in finder.found}
    if not found:
        return CheckResult("unregistered tensors", True, "forward uses no tensor that requires grad besides the "
                                                         "input, the context and the block's parameters"), {}
    return CheckResult("unregistered tensors", False, (
        f"forward uses {len(found)} tensor(s) that require grad but are not parameters of the block: "
        f"{'; '.join(list(found)[:4])}{'; ...' if len(found) > 4 else ''}. block.parameters() misses them (so do "
        f"optimizers and state_dict), and the reversible engine sees them only if the first forward uses them: "
        f"register them (nn.Parameter, or a buffer if they should not train) or pass them as the context")), found


# ---------------------------------------------------------------------------------------------- memory modes
class _Step(NamedTuple):
    grads: Dict[str, Optional[Tensor]]     # "dL/dx", "dL/dcontext", "dL/d<parameter>", and the outputs
    buffers: Dict[str, Tensor]
    reconstruction_error: Optional[float]


def _train_step(work: nn.Module, mode: str, x: Tensor, context: Context, seed: int,
                loss_weights: Tuple[Tensor, Tensor], unregistered: Dict[str, Tensor]) -> _Step:
    """One step of ReversibleSequence([work], memory=mode) in train mode from `seed`; gradients by autograd.grad."""
    seq = ReversibleSequence([work], memory=mode, check="warn")
    x_in, c_in = _inputs(x, context)
    named = [("dL/dx", x_in)] + ([("dL/dcontext", c_in)] if c_in is not None and c_in.requires_grad else [])
    named += [(f"dL/d{name}", p) for name, p in work.named_parameters() if p.requires_grad]
    named += [(f"dL/d{name}", t) for name, t in unregistered.items()]
    torch.manual_seed(seed)
    with _training(work, True), torch.enable_grad():
        y, logdet = seq(x_in, c_in)
        loss = (y * loss_weights[0]).sum() + (logdet * loss_weights[1]).sum()
        grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    out = {"output y": y.detach(), "output logdet": logdet.detach()}
    out.update({name: g for (name, _), g in zip(named, grads)})
    err = seq.last_reconstruction_error
    return _Step(out, {name: b.detach().clone() for name, b in work.named_buffers()},
                 None if err is None else float(err.max()))


def _check_modes(work: nn.Module, x: Tensor, context: Context, modes: Tuple[str, ...], seed: int, tol: _Tolerance,
                 unregistered: Dict[str, Tensor]) -> List[CheckResult]:
    initial = {name: b.detach().clone() for name, b in work.named_buffers()}
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad(), _training(work, False):
        y = _call(work, x, context)[0]
    loss_weights = _random_like(y, gen), _random_like(x.new_empty(x.shape[0]), gen)
    steps: Dict[str, object] = {}
    for mode in ("autograd",) + tuple(modes):
        with torch.no_grad():
            for name, b in work.named_buffers():
                b.copy_(initial[name])
        try:
            steps[mode] = _train_step(work, mode, x, context, seed, loss_weights, unregistered)
        except Exception as error:  # noqa: BLE001 - e.g. the engine's StepContractError, named in the report
            steps[mode] = f"raised {type(error).__name__}: {error}"
    reference = steps["autograd"]
    if isinstance(reference, str):
        return [CheckResult("gradients (autograd)", False, f"a training step under plain autograd {reference}")]
    rows = []
    for mode in modes:
        step = steps[mode]
        if isinstance(step, str):
            rows.append(CheckResult(f"gradients ({mode})", False, f"the training step {step}"))
            continue
        row = _compare_row(f"gradients ({mode})", {k: (v, reference.grads[k]) for k, v in step.grads.items()},
                           tol.gradient, "equal plain autograd's in train mode from the same seed")
        if not row.passed and step.reconstruction_error is not None:
            row = row._replace(detail=f"{row.detail}; the input rebuilt in backward is off by relative "
                                      f"{step.reconstruction_error:.3g}")
        rows.append(row)
        if reference.buffers:
            rows.append(_compare_row(f"buffers ({mode})", {k: (v, reference.buffers[k]) for k, v in
                                                           step.buffers.items()}, tol.gradient,
                                     "equal the buffers plain autograd leaves"))
    return rows
