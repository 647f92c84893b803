"""Fidelity: how closely a converted model's logits follow the original's on some inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normswap.distributed import max_over_ranks, sum_over_ranks
from normswap.errors import CalibrationError
from normswap.inputs import (
    BatchToInput,
    call_model,
    default_batch_to_input,
    iter_inputs,
    model_device,
)
from normswap.modes import eval_mode
from normswap.pretrained.structure import unwrap

__all__ = ["Fidelity", "fidelity", "kl_div", "logits_of"]


@dataclass(frozen=True)
class Fidelity:
    """How closely a model's logits follow a reference's on some inputs.

    Attributes:
        agreement: fraction of samples whose top-1 class is the reference's.
        kl: mean KL divergence ``KL(reference || model)`` of the softmax outputs (nats).
        max_abs_diff: largest absolute logit difference.
        samples: number of samples compared.

    Example:
        >>> Fidelity(0.9, 0.05, 2.5, 100).to_dict()["agreement"]
        0.9
    """

    agreement: float
    kl: float
    max_abs_diff: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary.

        Example:
            >>> sorted(Fidelity(1.0, 0.0, 0.0, 2).to_dict())
            ['agreement', 'kl', 'max_abs_diff', 'samples']
        """
        return {
            "agreement": self.agreement,
            "kl": self.kl,
            "max_abs_diff": self.max_abs_diff,
            "samples": self.samples,
        }

    def __str__(self) -> str:
        return (
            f"top-1 agreement {self.agreement:.1%}, KL {self.kl:.4f}, "
            f"max |Δlogit| {self.max_abs_diff:.3g} on {self.samples} samples"
        )


def logits_of(output: Any, who: str) -> Tensor:
    """The ``(samples, classes)`` logits of a model's output.

    A classifier's ``(N, classes)`` tensor as it is; a language model's ``(N, L, vocab)``
    logits (or a Hugging Face output's ``.logits``) as one sample per position, so agreement is
    next-token top-1 agreement.

    Raises:
        CalibrationError: an output without logits; the message says what to wrap.

    Example:
        >>> logits_of(torch.zeros(2, 5, 7), "model").shape
        torch.Size([10, 7])
    """
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(output).__name__
        raise CalibrationError(
            f"the {who} must return logits of shape (N, classes) or (N, ..., classes) for "
            f"distillation and fidelity, got {shape}; wrap it so that it returns the logits"
        )
    return logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])


def kl_div(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample ``KL(softmax(teacher / T) || softmax(student / T))``."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def fidelity(
    model: nn.Module,
    reference: nn.Module,
    data: Any,
    *,
    max_batches: int | None = None,
    batch_to_input: BatchToInput = default_batch_to_input,
) -> Fidelity:
    """Compare ``model``'s logits with ``reference``'s on ``data`` (both in eval mode).

    Under ``torch.distributed`` the counts are summed over the ranks (every rank must call it).

    Args:
        model: the model to measure.
        reference: the model it should behave like.
        data: one tensor of inputs, or an iterable of batches (:mod:`normswap.inputs`),
            streamed one batch at a time.
        max_batches: use at most this many batches.
        batch_to_input: maps a batch of an iterable to model inputs.

    Returns:
        The :class:`Fidelity`.

    Raises:
        CalibrationError: empty data, or a model that does not return ``(N, classes)`` logits.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> fidelity(net, net, torch.randn(8, 4)).agreement
        1.0
    """
    model, reference = unwrap(model), unwrap(reference)
    batches = iter_inputs(
        data,
        batch_to_input=batch_to_input,
        device=model_device(model),
        max_batches=max_batches,
        what="fidelity data",
    )
    agree = kl = 0.0
    worst = 0.0
    count = 0
    with torch.no_grad(), eval_mode(model, reference):
        for inputs in batches:
            out = logits_of(call_model(model, inputs), "model")
            ref = logits_of(call_model(reference, inputs), "reference")
            agree += float((out.argmax(-1) == ref.argmax(-1)).sum())
            kl += float(kl_div(out, ref).sum())
            worst = max(worst, float((out.float() - ref.float()).abs().max()))
            count += out.shape[0]
    agree, kl, count_f = sum_over_ranks([agree, kl, float(count)])
    worst = max_over_ranks(worst)
    if count_f == 0:
        raise CalibrationError("the fidelity data holds no samples: pass at least one input")
    return Fidelity(agree / count_f, kl / count_f, worst, int(count_f))
