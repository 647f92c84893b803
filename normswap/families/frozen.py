"""The ``frozen`` family: BatchNorm → :class:`normswap.FrozenAffine`, the eval statistics
folded into a per-channel affine (detectron2's FrozenBatchNorm): batch-independent and exact
for a pretrained model, frozen unless ``trainable=True``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normswap.families.base import (
    REPLACE,
    Decision,
    Family,
    NormContext,
    Target,
    factory,
    layout_problem,
    new_eps,
    new_requires_grad,
    register_family,
)
from normswap.norms import FrozenAffine
from normswap.pretrained.fitters import AffineFitter
from normswap.sources import SourceNorm
from normswap.specs import NormSpec

__all__ = ["FrozenSpec", "FrozenTarget"]


@dataclass(frozen=True)
class FrozenSpec(NormSpec):
    """A frozen per-channel affine with the BatchNorm's eval statistics folded in.

    Attributes:
        trainable: ``False`` (the default) freezes the affine; ``True`` trains it (the
            statistics stay folded in); ``None`` carries each BatchNorm's ``requires_grad``.

    Example:
        >>> FrozenSpec().trainable, FrozenSpec(trainable=True).trainable
        (False, True)
    """

    trainable: bool | None = False


class FrozenTarget(Target):
    """BatchNorm → :class:`normswap.FrozenAffine` from its running statistics and γ/β.

    Example:
        >>> from normswap.sources import describe_source
        >>> bn = nn.BatchNorm2d(4).eval()
        >>> target = FrozenTarget()
        >>> decision = target.decide(describe_source(bn), FrozenSpec(), NormContext("bn", 4))
        >>> layer = target.build(describe_source(bn), FrozenSpec(), decision)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(layer(x), bn(x), atol=1e-6)
        True
    """

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        """Freeze ``src``, or refuse one without running statistics."""
        if src.over == "channels":  # a LayerNorm/RMSNorm: its scale fixed, fitted from data
            problem = layout_problem("FrozenAffine", src, ctx, spans_positions=False)
            if problem:
                return Decision(REPLACE, "FrozenAffine", problem=problem)
            return Decision(
                REPLACE,
                "FrozenAffine",
                eps=None,
                note=(
                    f"{'the mean subtracted per position and ' if src.center else ''}the scale "
                    "fixed: 1 until fitted on data (normswap.calibrate, convert_pretrained)"
                ),
            )
        if src.over != "batch":
            return Decision(
                REPLACE,
                "FrozenAffine",
                problem=(
                    f"{src.kind} normalizes each sample with its own statistics over the "
                    "positions, which no fixed affine reproduces; 'frozen' freezes a BatchNorm's "
                    "running statistics (a LayerNorm's scale): exclude it, or choose another target"
                ),
            )
        if not src.has_statistics:
            return Decision(
                REPLACE,
                "FrozenAffine",
                problem=(
                    f"{src.kind} has no running statistics (track_running_stats=False), so there "
                    "are no eval statistics to freeze; exclude it or use 'gn'"
                ),
            )
        note = None
        if src.training:
            note = "in training mode: frozen with its running statistics (its eval behaviour)"
        return Decision(REPLACE, "FrozenAffine", eps=new_eps(src, spec), note=note)

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        """The affine ``γ / sqrt(σ² + ε)``, ``β − μ γ / sqrt(σ² + ε)`` as a FrozenAffine (a
        LayerNorm's: centred per position, ``γ``, ``β`` at a scale of 1)."""
        if src.over == "channels":
            new = FrozenAffine(
                src.num_channels,
                requires_grad=new_requires_grad(src, spec),
                center=src.center,
                channels_last=src.channels_last,
                **factory(src),
            )
            with torch.no_grad():
                if src.weight is not None:
                    new.weight.copy_(src.weight)
                if src.bias is not None:
                    new.bias.copy_(src.bias)
            return new.train(src.training)
        assert src.running_mean is not None and src.running_var is not None
        assert decision.eps is not None
        new = FrozenAffine.from_statistics(
            src.running_mean,
            src.running_var,
            decision.eps,
            src.weight,
            src.bias,
            requires_grad=new_requires_grad(src, spec),
        )
        new.input_ranks = src.ranks  # for normswap.finalize: which BatchNormNd stands for it
        return new.train(src.training)


FAMILY = register_family(
    Family(
        "frozen",
        FrozenSpec,
        FrozenTarget(),
        layers=(FrozenAffine,),
        fitter=AffineFitter(),
        from_scratch=False,
    )
)
