"""One input convention (normswap.inputs), used by every part that feeds a model, and streaming."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normswap
from normswap.errors import CalibrationError, TraceError
from normswap.inputs import (
    call_model,
    check_samples,
    default_batch_to_input,
    iter_inputs,
    split_inputs,
)


class TwoInputs(nn.Module):
    """``forward(x, scale)``: inputs as positional arguments or keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3)) * scale)


def _model() -> TwoInputs:
    torch.manual_seed(0)
    model = TwoInputs().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


def test_the_convention() -> None:
    x = torch.randn(2, 3)
    assert split_inputs((x, 2.0)) == ((x, 2.0), {})
    assert split_inputs({"x": x}) == ((), {"x": x})
    assert split_inputs([x]) == (([x],), {})
    assert default_batch_to_input((x, torch.tensor([0, 1]))) is x
    assert default_batch_to_input([x, 0]) is x
    assert default_batch_to_input({"x": x}) == {"x": x}
    with pytest.raises(CalibrationError, match="non-string keys"):
        split_inputs({0: x})
    with pytest.raises(CalibrationError, match="holds no samples"):
        check_samples(torch.zeros(0, 3))


def test_every_consumer_reads_batches_the_same_way() -> None:
    """A batch of ((x, scale), label): trace, calibrate, distill, fidelity and
    convert_pretrained all call model(x, scale)."""
    x = torch.randn(6, 3, 8, 8)
    batches = [((x[:3], 0.5), torch.zeros(3)), ((x[3:], 0.5), torch.zeros(3))]
    reference = _model()
    expected = [call_model(reference, default_batch_to_input(b)) for b in batches]
    assert torch.allclose(expected[0], reference(x[:3], 0.5))

    facts = normswap.trace(reference, default_batch_to_input(batches[0]))
    assert facts["bn"].producer == "conv"
    model = copy.deepcopy(reference)
    normswap.swap(model, "gn", num_groups=2)
    assert len(normswap.calibrate(model, reference, batches)) == 1
    assert normswap.fidelity(model, reference, batches).samples == 6
    report = normswap.distill(
        model, reference, batches, steps=2, eval_every=1, progress=False, augment=None
    )
    # The first batch is held out; the other trains, epoch after epoch.
    assert report.steps == 2 and report.samples_seen == 6
    once = (b for b in batches)  # a one-shot iterator is read once
    report = normswap.distill(
        model, reference, once, steps=5, eval_every=1, progress=False, augment=None
    )
    assert (report.steps, report.stopped) == (1, "data exhausted")
    result = normswap.convert_pretrained(
        _model(), "gn", batches, distill_steps=0, reconstruct=0, num_groups=2, progress=False
    )
    assert result.calibration is not None and result.calibration.samples == 6
    with pytest.raises(TraceError, match="non-string keys"):
        normswap.trace(reference, {0: x})


class Counting:
    """An iterable of batches that counts how many were read (and can be iterated again)."""

    def __init__(self, n: int) -> None:
        self.n, self.read = n, 0

    def __iter__(self) -> Iterator[Any]:
        for i in range(self.n):
            self.read += 1
            yield torch.full((4, 3, 8, 8), float(i % 7) / 7)


def test_batches_are_streamed_not_materialized() -> None:
    reference = _model()
    model = copy.deepcopy(reference)
    normswap.swap(model, "gn", num_groups=2)
    data = Counting(10_000)
    normswap.calibrate(model, reference, data, max_batches=3)
    assert data.read == 3
    data = Counting(10_000)
    normswap.distill(model, reference, data, steps=5, eval_every=5, progress=False, augment=None)
    assert data.read <= 1 + 1 + 5 + 1  # held-out batch, first step, the steps, one ahead


def test_one_shot_iterators_work_once_and_twice_is_refused() -> None:
    reference = _model()
    model = copy.deepcopy(reference)
    normswap.swap(model, "gn", num_groups=2)
    gen = (torch.randn(4, 3, 8, 8) for _ in range(3))
    assert normswap.calibrate(model, reference, gen).batches == 3
    with pytest.raises(CalibrationError, match="one-shot iterator"):
        normswap.calibrate(model, reference, iter([torch.randn(4, 3, 8, 8)]), passes=2)


def test_a_shuffling_loader_needs_val_data_for_distillation() -> None:
    reference = _model()
    model = copy.deepcopy(reference)
    normswap.swap(model, "gn", num_groups=2)
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8)), batch_size=4, shuffle=True)
    with pytest.raises(CalibrationError, match="pass val_data="):
        normswap.distill(model, reference, loader, steps=2, progress=False)
    report = normswap.distill(
        model, reference, loader, val_data=torch.randn(4, 3, 8, 8), steps=2, progress=False
    )
    assert report.steps == 2


def test_data_that_is_no_batch_gets_one_clear_error() -> None:
    reference = _model()
    model = copy.deepcopy(reference)
    normswap.swap(model, "gn", num_groups=2)
    for data, message in (
        ({"x": torch.randn(2, 3, 8, 8)}, r"wrap it in a list: \[batch\]"),
        ("images/", "got str"),
        (3, "got int"),
        ([], "empty"),
        (torch.zeros(0, 3, 8, 8), "holds no samples"),
    ):
        with pytest.raises(CalibrationError, match=message):
            normswap.calibrate(model, reference, data)
    assert list(iter_inputs(torch.zeros(5, 2), batch_size=2))[-1].shape == (1, 2)
