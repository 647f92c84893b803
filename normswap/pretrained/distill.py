"""Self-distillation: train a converted model back towards its teacher's behaviour, no labels.

After :func:`normswap.calibrate` each converted layer matches its BatchNorm as well as a
per-channel fit can, but per-sample normalization removes information (each sample's group
mean and scale) that the original network used, so the layers after it must adapt: that is
training. :func:`distill` trains the converted model on unlabeled inputs to reproduce the
teacher's logits (KL divergence at temperature ``T``), optionally also every converted layer's
output (mean squared error normalized by the teacher's variance at that layer).

The student runs in eval mode (dropout off, any BatchNorm it still has uses its running
statistics) with gradients on; the teacher runs in eval mode without gradients. Agreement with
the teacher (top-1) is measured on held-out inputs every ``eval_every`` steps; the best
parameters seen are restored at the end, and training stops early once agreement has not
improved for ``patience`` checks, or when ``max_seconds`` is spent.

Under ``torch.distributed`` (every rank calls :func:`distill`), gradients are averaged over the
ranks at every step, validation counts are summed, and rank 0's parameters are broadcast at the
start and the end, so every rank ends with the same parameters.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normswap.distributed import (
    all_ranks_true,
    any_rank_true,
    average_gradients,
    broadcast_module,
    rank,
)
from normswap.errors import CalibrationError
from normswap.inputs import (
    BatchToInput,
    call_model,
    check_samples,
    count_samples,
    default_batch_to_input,
    iter_inputs,
    model_device,
)
from normswap.modes import eval_mode
from normswap.pretrained.fidelity import fidelity, kl_div, logits_of
from normswap.pretrained.structure import converted_layers, unwrap
from normswap.progressive import BlendSchedule, blend_layers, finish_blend, set_blend

__all__ = ["DistillCheck", "DistillReport", "distill", "hflip"]


@dataclass(frozen=True)
class DistillCheck:
    """One validation check during distillation.

    Attributes:
        step: optimizer steps done.
        seconds: time since the start, by ``clock``.
        agreement: top-1 agreement with the teacher on the validation inputs.
        kl: mean KL divergence on the validation inputs.
        loss: training loss averaged since the previous check (``nan`` at step 0).
        alpha: the student's blend at the check (1: the converted model itself; see
            :mod:`normswap.progressive`).
    """

    step: int
    seconds: float
    agreement: float
    kl: float
    loss: float
    alpha: float = 1.0

    def to_dict(self) -> dict[str, float]:
        """Plain dictionary.

        Example:
            >>> DistillCheck(0, 0.0, 0.5, 1.0, float("nan")).to_dict()["step"]
            0
        """
        return {
            "step": self.step,
            "seconds": self.seconds,
            "agreement": self.agreement,
            "kl": self.kl,
            "loss": self.loss,
            "alpha": self.alpha,
        }


@dataclass(frozen=True)
class DistillReport:
    """The result of :func:`distill`.

    Attributes:
        steps: optimizer steps run.
        seconds: time taken, by ``clock``.
        stopped: why training ended (``"steps"``, ``"no improvement ..."``, ``"time budget"``).
        best_step: the step whose parameters were kept.
        checks: every validation check, in order (the agreement-vs-budget curve).
        samples_seen: training samples processed (per rank).
        holdout: what the checks measured agreement on: ``"val_data"`` (held-out inputs the
            caller gave) or ``"held out from data"`` (a split of the training inputs). Both
            come from the conversion's own domain: they say nothing about new data (measure
            that with :func:`fidelity` on inputs from other sources).

    Example:
        >>> r = DistillReport(0, 0.0, "steps", 0, (DistillCheck(0, 0.0, 0.5, 1.0, 0.0),), 0)
        >>> r.best.agreement
        0.5
    """

    steps: int
    seconds: float
    stopped: str
    best_step: int
    checks: tuple[DistillCheck, ...] = field(default=())
    samples_seen: int = 0
    holdout: str = "val_data"

    @property
    def best(self) -> DistillCheck:
        """The check of the kept parameters."""
        return next(c for c in self.checks if c.step == self.best_step)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable dictionary.

        Example:
            >>> DistillReport(0, 0.0, "steps", 0).to_dict()["checks"]
            []
        """
        return {
            "steps": self.steps,
            "seconds": self.seconds,
            "stopped": self.stopped,
            "best_step": self.best_step,
            "samples_seen": self.samples_seen,
            "holdout": self.holdout,
            "checks": [c.to_dict() for c in self.checks],
        }

    def __str__(self) -> str:
        lines = [
            f"normswap distillation: {self.steps} step(s), {self.seconds:.0f} s, stopped: "
            f"{self.stopped}; kept step {self.best_step}; agreement measured on "
            f"{self.holdout} (in-domain)"
        ]
        lines += [
            f"  step {c.step:>5}  {c.seconds:>7.1f} s  agreement {c.agreement:.1%}  KL {c.kl:.4f}"
            + (f"  (blend alpha {c.alpha:.2f})" if c.alpha < 1 else "")
            for c in self.checks
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- training


def hflip(x: Tensor) -> Tensor:
    """Flip each image of ``x`` (``(N, C, H, W)``) horizontally with probability 1/2.

    Anything that is not a batch of floating-point images (token ids, ``(N, T, C)`` sequences,
    1-D signals) is returned as it is: flipping them would change what they mean.

    Example:
        >>> hflip(torch.zeros(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """
    if x.dim() < 4 or not x.is_floating_point():
        return x
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def _training_batches(
    data: Any,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | None,
    batch_to_input: BatchToInput,
    skip_first: bool,
) -> Iterator[Any]:
    """Training batches, streamed: random samples of a tensor epoch after epoch, or the
    iterable's batches epoch after epoch (a one-shot iterator: once)."""
    if isinstance(data, Tensor):
        n = data.shape[0]
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                idx = order[start : start + batch_size]
                yield data[idx].to(device) if device is not None else data[idx]
    one_shot = iter(data) is data
    while True:
        got = False
        stream = iter_inputs(data, batch_to_input=batch_to_input, device=device)
        for index, inputs in enumerate(stream):
            if skip_first and index == 0:
                continue
            got = True
            yield inputs
        if one_shot or not got:
            return


def _split_validation(
    data: Any, val_data: Any, fraction: float, batch_to_input: BatchToInput
) -> tuple[Any, list[Any] | Any, bool]:
    """``(training data, validation inputs, skip the first batch when training)``."""
    if val_data is not None:
        return data, val_data, False
    if isinstance(data, Tensor):
        n = data.shape[0]
        held = max(1, math.ceil(n * fraction))
        if n - held < 1:
            raise CalibrationError(
                f"{n} input sample(s) cannot be split into training and validation inputs: "
                "pass more data or val_data="
            )
        return data[: n - held], data[n - held :], False
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise CalibrationError(
            "distillation holds out the first batch of the data to measure agreement, but this "
            "DataLoader shuffles, so that batch changes every epoch and would be trained on: "
            "pass val_data= (held-out inputs)"
        )
    first = next(iter_inputs(data, batch_to_input=batch_to_input), None)
    check_samples(first, "distillation data")
    one_shot = iter(data) is data
    return data, [first], not one_shot


def _check_positive(name: str, value: Any, kind: type = int) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or value <= 0:
        raise CalibrationError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def distill(
    model: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 32,
    temperature: float = 1.0,
    feature_weight: float = 0.0,
    val_data: Any = None,
    val_fraction: float = 0.1,
    eval_every: int = 50,
    patience: int = 3,
    max_seconds: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_check: Callable[[DistillCheck, nn.Module], None] | None = None,
    augment: Callable[[Tensor], Tensor] | None = hflip,
    seed: int = 0,
    progress: bool = True,
    batch_to_input: BatchToInput = default_batch_to_input,
    blend: BlendSchedule | None = None,
) -> DistillReport:
    """Train ``model`` to reproduce ``teacher``'s outputs on unlabeled ``data``.

    The loss is ``KL(softmax(teacher / T) || softmax(model / T)) · T²`` plus, with
    ``feature_weight > 0``, ``feature_weight`` times the mean over the converted layers of
    ``‖f_model − f_teacher‖² / Var(f_teacher)`` (their outputs; the teacher must then be the
    model before its swap). Adam with a one-cycle schedule (10% warm-up, cosine decay to
    ``lr / 1000``) trains every parameter that has ``requires_grad``. Agreement is checked on
    held-out inputs every ``eval_every`` steps; the best parameters are restored at the end.

    Args:
        model: the converted (student) model; trained in place. A DDP wrapper is unwrapped.
        teacher: the model to imitate (usually the original, before the swap).
        data: unlabeled inputs: one tensor ``(N, ...)`` of inputs (random batches of
            ``batch_size`` are drawn, epoch after epoch), or an iterable of batches (a list, a
            ``DataLoader``; an ``(x, y)`` batch gives its ``x``) streamed one batch at a time
            and re-iterated for each epoch (a one-shot iterator is read once).
        steps: the most optimizer steps (the schedule's length).
        lr: peak learning rate.
        batch_size: batch size when ``data`` is one tensor.
        temperature: softmax temperature ``T`` of the KL term.
        feature_weight: weight of the feature term (0 turns it off).
        val_data: held-out inputs for the agreement checks; ``None`` holds out the last
            ``val_fraction`` of a tensor's samples, or the first batch of an iterable (not of a
            shuffling DataLoader: pass ``val_data`` there).
        val_fraction: see ``val_data``.
        eval_every: steps between agreement checks.
        patience: stop after this many checks without a better agreement.
        max_seconds: stop when this much time (by ``clock``) is spent, the final check
            included.
        clock: the time ``max_seconds`` and the report are measured with:
            ``time.perf_counter`` (wall time) or ``time.process_time`` (CPU time of this
            process, all threads: a budget that does not depend on other processes' load).
        on_check: called with each check and the model after it, e.g. to log or to measure the
            agreement on a test set for a learning curve (its time is not counted; it must not
            change the model).
        augment: applied to each training batch tensor (default: random horizontal flips);
            ``None`` for none. The teacher sees the same augmented batch.
        seed: seeds the batch order.
        progress: show a progress bar (rank 0 only).
        batch_to_input: maps a batch of an iterable to model inputs.
        blend: progressive distillation (:mod:`normswap.progressive`): the student's blends
            follow this schedule step by step, so it starts as its teacher and ends as the
            converted model; only checks at ``alpha = 1`` compete for the kept parameters,
            patience counts from the end of the ramp, and the blends are replaced by their
            targets at the end. The student must come from
            :func:`~normswap.progressive.swap_progressive`.

    Returns:
        A :class:`DistillReport` with the agreement-vs-steps checks.

    Raises:
        CalibrationError: bad arguments, empty data, data the models cannot run on, models that
            do not return logits, or ``feature_weight > 0`` with a teacher that is not the model
            before its swap; raised before any parameter changes.

    Example:
        >>> teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> report = distill(student, teacher, torch.randn(256, 8), steps=60, eval_every=20,
        ...                  progress=False, augment=None)
        >>> report.best.agreement > report.checks[0].agreement
        True
    """
    start = clock()
    excluded = 0.0  # time spent in on_check, not counted
    for name, value, kind in (
        ("steps", steps, int),
        ("batch_size", batch_size, int),
        ("eval_every", eval_every, int),
        ("patience", patience, int),
        ("lr", lr, float),
        ("temperature", temperature, float),
    ):
        _check_positive(name, value, kind)
    if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)):
        raise CalibrationError(f"feature_weight must be a float >= 0, got {feature_weight!r}")
    if feature_weight < 0:
        raise CalibrationError(f"feature_weight must be >= 0, got {feature_weight!r}")
    if not 0 < val_fraction < 1:
        raise CalibrationError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if max_seconds is not None:
        _check_positive("max_seconds", max_seconds, float)
    model, teacher = unwrap(model), unwrap(teacher)
    if model is teacher:
        raise CalibrationError("the teacher is the model itself: pass the original model")
    device = model_device(model)
    train_data, val, skip_first = _split_validation(data, val_data, val_fraction, batch_to_input)
    if iter(val) is val:  # a one-shot iterator: keep its batches for every check
        val = list(iter_inputs(val, batch_to_input=batch_to_input))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CalibrationError("the model has no parameter with requires_grad=True to train")
    features = converted_layers(model, teacher) if feature_weight > 0 else {}
    if blend is not None and not blend_layers(model):
        raise CalibrationError(
            "distill(blend=...) needs a student with blends: convert it with "
            "normswap.progressive.swap_progressive"
        )

    mixed = [1.0]  # the student's blend now

    def mix(value: float) -> None:
        set_blend(model, value)
        mixed[0] = value

    generator = torch.Generator().manual_seed(seed + rank())
    batches = _training_batches(
        train_data, batch_size, generator, device, batch_to_input, skip_first
    )
    first = next(batches, None)
    if first is None and skip_first:
        raise CalibrationError(
            "distillation holds out one batch to measure agreement, but the data has only one: "
            "pass val_data=, more batches, or one tensor of inputs"
        )
    first = check_samples(first, "distillation data")
    with torch.no_grad(), eval_mode(model, teacher):  # both must run before anything changes
        for who, m in (("teacher", teacher), ("model", model)):
            try:
                logits_of(call_model(m, first), who)
            except CalibrationError:
                raise
            except Exception as err:
                raise CalibrationError(
                    f"the {who} cannot run on the distillation data: {type(err).__name__}: {err}"
                ) from err
    broadcast_module(model)

    taps = _FeatureTaps(features, teacher)

    def elapsed() -> float:
        return clock() - start - excluded

    def check(step: int, loss: float) -> DistillCheck:
        nonlocal excluded
        with taps.paused():
            f = fidelity(model, teacher, val, batch_to_input=batch_to_input)
            result = DistillCheck(step, elapsed(), f.agreement, f.kl, loss, mixed[0])
            if on_check is not None:
                tick = clock()
                with eval_mode(model):
                    on_check(result, model)
                excluded += clock() - tick
        return result

    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=_warmup(steps), final_div_factor=40.0
    )
    if blend is not None:
        mix(blend.alpha(0))
    checks = [check(0, float("nan"))]
    # Only the converted model itself (alpha = 1) competes for the kept parameters.
    best: DistillCheck | None = checks[0] if checks[0].alpha >= 1.0 else None
    best_state, stale = (_state(model) if best is not None else {}), 0
    stopped, step, seen, running, count = "steps", 0, 0, 0.0, 0
    bar = _progress(steps, progress)

    def evaluate() -> bool:
        """Check agreement now, keep the best parameters; whether patience ran out."""
        nonlocal best, best_state, stale, running, count
        c = check(step, running / max(count, 1))
        running, count = 0.0, 0
        checks.append(c)
        if c.alpha < 1.0:
            return False
        if best is None or (c.agreement, -c.kl) > (best.agreement, -best.kl):
            best, best_state, stale = c, _state(model), 0
        else:
            stale += 1
        return stale >= patience

    try:
        with eval_mode(model, teacher), flush_denormal(device):
            pending: Any = first
            while step < steps:
                inputs = pending if pending is not None else next(batches, None)
                pending = None
                if not all_ranks_true(inputs is not None):
                    stopped = "data exhausted"
                    if checks[-1].step != step:
                        evaluate()
                    break
                if blend is not None:
                    mix(blend.alpha(step))
                if augment is not None and isinstance(inputs, Tensor):
                    inputs = augment(inputs)
                with torch.no_grad():
                    target = logits_of(call_model(teacher, inputs), "teacher")
                out = logits_of(call_model(model, inputs), "model")
                loss = kl_div(out, target, temperature).mean() * temperature**2
                if features:
                    loss = loss + feature_weight * taps.loss()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(params)
                optimizer.step()
                schedule.step()
                step += 1
                seen += count_samples(inputs)
                running += float(loss.detach())
                count += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{float(loss.detach()):.3f}", agree=f"{checks[-1].agreement:.1%}"
                    )
                out_of_time = _out_of_time(elapsed(), max_seconds, checks)
                if max_seconds is not None:  # every rank stops together
                    out_of_time = any_rank_true(out_of_time)
                if (step % eval_every == 0 or step == steps or out_of_time) and evaluate():
                    stopped = f"no improvement in {patience} checks"
                    break
                if out_of_time:
                    stopped = "time budget"
                    break
        if best is None:  # stopped before the ramp's end: the converted model as it is now
            mix(1.0)
            evaluate()
    finally:
        taps.remove()
        if bar is not None:
            bar.close()
    model.load_state_dict(best_state)
    if blend is not None:
        set_blend(model, 1.0)
        finish_blend(model)
    broadcast_module(model)
    return DistillReport(
        steps=step,
        seconds=elapsed(),
        stopped=stopped,
        best_step=best.step if best is not None else step,
        checks=tuple(checks),
        samples_seen=seen,
        holdout="val_data" if val_data is not None else "held out from data",
    )


class _FeatureTaps:
    """Forward hooks that keep the student's and the teacher's outputs at the converted layers."""

    def __init__(self, layers: Mapping[str, nn.Module], teacher: nn.Module) -> None:
        self.pairs = [(p, layer, teacher.get_submodule(p)) for p, layer in layers.items()]
        self.student: dict[str, Tensor] = {}
        self.teacher: dict[str, Tensor] = {}
        self.handles: list[Any] = []
        self.attach()

    def attach(self) -> None:
        # Copies (a differentiable one for the student): an in-place activation after the norm
        # (ReLU(inplace=True)) would otherwise turn both into post-activation values.
        for path, layer, ref in self.pairs:
            self.handles.append(
                layer.register_forward_hook(
                    lambda _m, _i, o, p=path: self.student.update({p: o.clone()})
                )
            )
            self.handles.append(
                ref.register_forward_hook(
                    lambda _m, _i, o, p=path: self.teacher.update({p: o.detach().clone()})
                )
            )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.remove()
        try:
            yield
        finally:
            self.attach()

    def loss(self) -> Tensor:
        """Mean over the layers of ``‖student − teacher‖² / Var(teacher)``; clears the outputs."""
        terms = [
            (self.student[p] - self.teacher[p]).square().mean()
            / self.teacher[p].var().clamp_min(1e-12)
            for p, _, _ in self.pairs
            if p in self.student and p in self.teacher
        ]
        self.student.clear()
        self.teacher.clear()
        return torch.stack(terms).mean() if terms else torch.zeros(())


def _flush_denormal_enabled() -> bool:
    """Whether denormal floats are flushed to zero now (there is no getter in torch)."""
    return float(torch.tensor([1e-39], dtype=torch.float32) * 1.0) == 0.0


@contextlib.contextmanager
def flush_denormal(device: torch.device | None) -> Iterator[None]:
    """Flush denormals to zero on CPU while training, then restore the previous setting.

    Training steps on CPU can run several times slower when gradients or Adam's moments decay
    into denormal floats (``benchmarks/NOTES.md``); flushing them changes values below 1e-38
    only.
    """
    if device is not None and device.type != "cpu":
        yield
        return
    previous = _flush_denormal_enabled()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


def _warmup(steps: int) -> float:
    """The warm-up fraction of the one-cycle schedule: 10%, but never a warm-up that ends at
    step 0 (``OneCycleLR`` divides by the warm-up's length in steps minus one: 10 steps at 10%
    raised ZeroDivisionError)."""
    return 0.1 if 0.1 * steps != 1 else 2 / steps


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _out_of_time(elapsed: float, max_seconds: float | None, checks: list[DistillCheck]) -> bool:
    """Whether one more step and a final check would overrun ``max_seconds``."""
    if max_seconds is None:
        return False
    check_cost = checks[0].seconds if checks else 0.0
    return elapsed + check_cost >= max_seconds


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or rank() != 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with pytorch-lightning
        return None
    return tqdm(total=total, desc="normswap distill", unit="step", file=sys.stderr, leave=False)
