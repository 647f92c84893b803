"""The copy property: a change to one deep copy of a model reaches no other copy.

Users copy models all the time — an export copy at the end of training, EMA and
``AveragedModel`` copies, the reference copy of ``convert_pretrained``, Lightning's checkpoint
callbacks — and torch shares the dynamically created ``Parametrized*`` class between deep copies.
So for every family and every operation that changes a model (swap, fold, finalize, restore,
calibrate, distill, progressive blend and finish), applied to the copy or to the original in any
order, each model must equal a twin that was never copied and received the same changes
(:mod:`copies`). Runs on generated networks (``strategies.nets``) as the swap property does, and
on a fixed pretrained-like CNN for every (family, operation) pair.
"""

from __future__ import annotations

import os

import pytest
import torch
from copies import OPS, Change, Logits, check_copies
from helpers import pretrained_cnn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from strategies import NORMS, Net, nets, spec_options
from torch import nn
from torch.nn.parameter import is_lazy

import normswap

FUZZ_EXAMPLES = os.environ.get("NORMSWAP_FUZZ_EXAMPLES")
if FUZZ_EXAMPLES:
    SETTINGS = settings(
        max_examples=max(1, int(FUZZ_EXAMPLES) // 10),  # each example runs several conversions
        deadline=None,
        database=DirectoryBasedExampleDatabase(".cache/hypothesis"),
        suppress_health_check=[HealthCheck.too_slow],
    )
else:
    SETTINGS = settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow],
    )

#: How the model is converted before it is copied; mostly a swap, since the copies of a
#: converted model (parametrized layers, new norms) are what users export, average and keep.
PREPS = ("none", "swap", "swap", "swap", "progressive")
#: The operations drawn; ``finalize`` twice, as it is what users do to a copy most often.
DRAWN_OPS = (*OPS, "finalize")
#: The families a model is converted to before it is copied: every one, and those that also
#: reparametrize other layers (weight norm, standardization) three times, since a parametrized
#: layer is what torch's deep copy shares with the original.
PREP_NORMS = NORMS + 2 * tuple(
    n
    for n in NORMS
    if type(normswap.get_family(n).target).plan_layers is not normswap.Target.plan_layers
)


def _builder(net: Net):
    def build() -> tuple[nn.Module, torch.Tensor]:
        model, x = net.build()
        if any(is_lazy(t) for t in (*model.parameters(), *model.buffers())):
            with torch.no_grad():  # a lazy module cannot be deep-copied before it knows its size
                model(x.clone())
        return Logits(model), x

    return build


@st.composite
def changes(draw: st.DrawFn) -> list[Change]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NORMS))
        out.append(
            Change(
                op=draw(st.sampled_from(DRAWN_OPS)),
                who=draw(st.sampled_from(["original", "copy"])),
                name=name,
                options=draw(spec_options(name)),
            )
        )
    return out


@SETTINGS
@given(
    # No TorchScript blocks: torch's deep copy of a ScriptModule gives parameters that are not
    # leaves (they get no gradient), whatever normswap does.
    net=nets(max_steps=6, scripted=False),
    prep=st.sampled_from(PREPS),
    name=st.sampled_from(PREP_NORMS),
    data=st.data(),
    todo=changes(),
)
def test_changing_a_copy_leaves_every_other_copy_as_it_was(
    net: Net, prep: str, name: str, data: st.DataObject, todo: list[Change]
) -> None:
    options = data.draw(st.one_of(st.just({}), spec_options(name)), label="options")
    try:
        for outcome in check_copies(_builder(net), prep, name, options, todo):
            event(outcome)
    except AssertionError as err:
        err.add_note(f"net: {net}\nprep: {prep} {name} {options}\nchanges: {todo}")
        raise


# --------------------------------------------------------------------------- every family × op

#: The conversion each operation starts from: ``swap`` and ``fold`` are tried on both.
START = {
    "swap": ("none", "swap"),
    "fold": ("none", "swap"),
    "finalize": ("swap",),
    "restore": ("none",),
    "restore_finalized": ("none",),
    "calibrate": ("swap",),
    "distill": ("swap",),
    "progressive": ("none",),
    "finish": ("progressive",),
}


#: (start, operation) pairs that trace the converted model.
_TRACED = {("swap", "swap"), ("swap", "fold")}


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    return pretrained_cnn(seed=3), x


def _example(name: str) -> dict:
    return dict(normswap.get_family(name).example)


@pytest.mark.parametrize("who", ["copy", "original"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", normswap.list_norms())
def test_every_family_and_operation_on_a_copy(name: str, op: str, who: str) -> None:
    options = _example(name)
    # A second family for "swap again": weight norm on top of any norm, else gn.
    again = "wn" if name != "wn" else "gn"
    change = Change(op, who, name, options)
    if op == "swap":
        change = Change(op, who, again, _example(again))
    for prep in START[op]:
        (outcome,) = check_copies(_cnn, prep, name, options, [change])
        # The matrix must exercise each operation: only these refuse, and they should.
        refuses = (
            # AdaLN without its condition: calibrating, distilling or tracing it refuses
            (name == "adaln" and (op in ("calibrate", "distill") or (prep, op) in _TRACED))
            or (name in ("wn", "ws_gn") and op == "progressive")  # nothing to blend
        )
        assert outcome == f"{op}: {'refused' if refuses else 'done'}", (prep, outcome)


@pytest.mark.parametrize(
    ("norm", "options"), [("wn", {"bn": "fold"}), ("wn", {"bn": "remove"}), ("ws_gn", {})]
)
def test_the_issue_snippet_finalizing_a_copy_keeps_the_original(norm: str, options: dict) -> None:
    import copy

    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    normswap.swap(model, norm, example_inputs=torch.randn(1, 3, 64, 64), **options)
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    exported = copy.deepcopy(model)
    normswap.finalize(exported)
    torch.testing.assert_close(exported(x), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(model(x), expected)  # the original still runs, bit for bit
    normswap.finalize(model)  # and can be finalized in turn
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
