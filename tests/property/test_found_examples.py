"""Every failing example the swap property (test_swap_property.py) found, as a named test.

Each was shrunk by Hypothesis to the small model here; each broke "the swap converts faithfully,
or it raises and the model is untouched".
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_untouched, snapshot
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import normswap
from normswap import NormSwapError, SwapError


def _structure(model: nn.Module) -> list[tuple[str, int, type]]:
    return [(p, id(m), type(m)) for p, m in model.named_modules(remove_duplicate=False)]


def test_a_batchnorm_inside_torchscript_is_not_silently_left() -> None:
    model = nn.Sequential(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))))
    with pytest.raises(SwapError, match=r"0\.1: BatchNorm2d inside the TorchScript module '0'"):
        normswap.swap(model, "gn", num_groups=2, strict=True)
    report = normswap.swap(model, "gn", num_groups=2, exclude="0*")  # excluding it is the fix
    assert len(report) == 0


def test_strict_counts_a_batchnorm_inside_torchscript_out_of_scope_too() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)))
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), scripted)
    with pytest.raises(SwapError, match=r"2\.1: BatchNorm2d inside the TorchScript module"):
        normswap.swap(model, "gn", num_groups=2, include="1", strict=True)
    assert normswap.swap(model, "gn", num_groups=2, include="1").counts() == {
        "BatchNorm2d -> GroupNorm": 1
    }


@pytest.mark.parametrize("spec", ["in", "gn"])
def test_tracing_does_not_initialize_lazy_modules(spec: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    before = _structure(model)
    with pytest.raises(SwapError, match=r"uninitialized lazy module.*run one forward pass first"):
        normswap.swap(model, spec, example_inputs=torch.randn(2, 3, 4, 4), dry_run=True)
    assert _structure(model) == before
    assert isinstance(model[1], nn.LazyBatchNorm2d)


def test_a_lazy_batchnorm_that_never_learns_its_channels_is_refused_at_plan_time() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(affine=False, track_running_stats=False)
    )
    model(torch.randn(2, 3, 4, 4))
    for dry_run in (True, False):
        with pytest.raises(SwapError, match="num_features=0"):
            normswap.swap(model, "ln", dry_run=dry_run)


def test_wn_leaves_a_grouped_conv_transpose_as_it_is() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 1, groups=2), nn.BatchNorm2d(4))
    report = normswap.swap(model, "wn", bn="remove")
    assert [(r.path, r.action) for r in report] == [("1", "remove"), ("0", "skip")]


def test_folding_into_a_weight_normalized_producer_is_refused_before_an_earlier_fold() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), weight_norm(nn.Conv2d(3, 4, 1)), nn.BatchNorm2d(4)
    ).eval()
    before = snapshot(model)
    with pytest.raises(SwapError, match="3: cannot fold: Conv2d's weight is parametrized"):
        normswap.swap(model, "wn", example_inputs=torch.randn(2, 3, 4, 4))
    assert_untouched(before, model)


def test_folding_into_a_producer_whose_weight_is_tied_is_refused() -> None:
    c0, c1 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
    c1.weight = c0.weight
    model = nn.Sequential(c0, c1, nn.BatchNorm2d(4)).eval()
    model[2].running_var.data.fill_(4.0)
    before = snapshot(model)
    with pytest.raises(SwapError, match=r"1\.weight is shared with 0"):
        normswap.swap(model, "wn", layers=(), example_inputs=torch.randn(2, 4, 3, 3))
    assert_untouched(before, model)


@pytest.mark.parametrize(
    ("model", "x", "spec", "overrides"),
    [
        (nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)), (2, 4, 1), "gn", {"num_groups": 4}),
        (nn.Sequential(nn.Linear(3, 1), nn.BatchNorm1d(1)), (2, 3), "ln", {}),
        (nn.Sequential(nn.Linear(3, 1), nn.BatchNorm1d(1)), (2, 3), "adaln", {"cond_dim": 2}),
        (nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.BatchNorm2d(1)), (2, 3, 8, 8), "ln2d", {}),
    ],
    ids=["gn-1x1-per-group", "ln-one-value", "adaln-one-value", "ln2d-one-channel"],
)
def test_a_norm_whose_statistics_span_one_value_is_refused_at_plan_time(
    model: nn.Module, x: tuple[int, ...], spec: str, overrides: dict
) -> None:
    before = snapshot(model)
    with pytest.raises(SwapError, match="single value"):
        normswap.swap(model, spec, example_inputs=torch.randn(x), **overrides)
    assert_untouched(before, model)


def test_a_batchnorm_without_tensors_takes_the_model_dtype() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False, track_running_stats=False)
    )
    model = model.double()
    x = torch.randn(2, 3, dtype=torch.float64)
    normswap.swap(model, "adaln", cond_dim=2, example_inputs=x)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with normswap.condition(model, torch.randn(2, 2, dtype=torch.float64)):
        assert model(x).dtype == torch.float64


def test_adaln_takes_a_condition_in_the_activation_dtype_when_nothing_says_the_model_dtype() -> (
    None
):
    """A model with no floating tensor at all gives the swap no dtype to build AdaLN's
    modulation with: the layer casts the condition to its modulation and back."""
    model = nn.Sequential(nn.SyncBatchNorm(2, affine=False, track_running_stats=False)).eval()
    normswap.swap(model, "adaln", cond_dim=1)
    x = torch.randn(2, 2, dtype=torch.float64)
    with normswap.condition(model, torch.randn(2, 1, dtype=torch.float64)):
        assert model(x).dtype == torch.float64
    traced = nn.Sequential(nn.SyncBatchNorm(2, affine=False, track_running_stats=False)).eval()
    normswap.swap(traced, "adaln", cond_dim=1, example_inputs=x)  # the traced input's dtype
    assert {p.dtype for p in traced.parameters()} == {torch.float64}


def test_a_producer_whose_output_is_also_a_model_output_is_not_folded() -> None:
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.out = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Identity()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return self.bn(y), self.out(y)

    model = Both().eval()
    model.bn.running_var.data.fill_(4.0)
    x = torch.randn(2, 3, 5, 5)
    before = snapshot(model)
    with pytest.raises(SwapError, match="returned as a model output"):
        normswap.swap(model, "wn", layers=(), example_inputs=x)
    assert_untouched(before, model)


def test_forward_hooks_on_a_replaced_norm_stay_registered() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    seen: list[str] = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    normswap.swap(model, "gn", num_groups=2)
    model(torch.randn(1, 3, 4, 4))
    assert seen == ["GroupNorm"]
    handle.remove()  # the user's handle still removes it
    model(torch.randn(1, 3, 4, 4))
    assert seen == ["GroupNorm"]


def test_a_runtime_refusal_without_example_inputs_names_the_fix() -> None:
    """Without example_inputs the rank is unknown: the plan notes it, the layer refuses at run
    time with the fix (what the property accepts)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    report = normswap.swap(model, "in")
    assert "input rank unknown" in report[0].note
    with pytest.raises(NormSwapError, match="expects input of shape"):
        model(torch.randn(2, 3))


def test_restore_into_a_model_that_does_not_fit_refuses_and_changes_nothing() -> None:
    """Found by the copy property: a record with nothing to replay, restored into a model that
    was converted already (weight norm), made ``load_state_dict`` raise a RuntimeError after
    loading what matched."""
    source = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    record = normswap.surgery_record(normswap.swap(source, "gn"))
    target = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    normswap.swap(target, "wn", bn="remove")
    before = snapshot(target)
    with pytest.raises(NormSwapError, match=r"do not fit.*missing: 0\.parametrizations"):
        normswap.restore(target, {"normswap": record, "state_dict": source.state_dict()})
    assert_untouched(before, target)


class _Branchy(nn.Module):
    """A forward torch.fx cannot trace (it branches on a value)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(2)
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(x)
        return self.bn(y) if bool(y.sum() > 0) else y


def test_center_fold_with_another_problem_in_the_plan_lists_it() -> None:
    """Found by the swap property: BatchNorm and LayerNorm replaced by an exact RMSNorm without
    example inputs, on a model torch.fx cannot trace: the trace's problem stopped the whole-model
    analysis, and the LayerNorm's decision crashed on the missing analysis."""
    model = _Branchy()
    before = snapshot(model)
    with pytest.raises(SwapError, match=r"torch\.fx cannot trace") as err:
        normswap.swap(model, "rms", center="fold", replace=("bn", "ln"))
    assert "value graph" in str(err.value)
    assert_untouched(before, model)
