"""The least-squares sums behind calibration: per channel, ``Σ A_i A_j`` and ``Σ A_i (t − y0)``
accumulated in float64 over batches (and ranks), and the ``K × K`` solve."""

from __future__ import annotations

import torch
from torch import Tensor

from normswap.distributed import is_distributed

__all__ = ["Sums", "solve"]


def solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """Per-channel ``gram @ coef = rhs``, with a tiny relative ridge for dead channels.

    Example:
        >>> gram = torch.eye(2, dtype=torch.float64).expand(3, 2, 2)
        >>> solve(gram, torch.ones(3, 2, dtype=torch.float64)).shape
        torch.Size([3, 2])
    """
    k = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + 1e-9 * scale[:, None, None] * eye, rhs.unsqueeze(-1))[..., 0]


class Sums:
    """Running least-squares sums of one layer (float64, per channel), summed over the ranks.

    Example:
        >>> sums = Sums(channels=2, k=2, device=torch.device("cpu"))
        >>> x = torch.randn(8, 2, 4)
        >>> sums.add(None, [x, None], 3 * x + 1)
        >>> sums.solve("lstsq").round(decimals=4).tolist()
        [[3.0, 1.0], [3.0, 1.0]]
    """

    def __init__(self, channels: int, k: int, device: torch.device) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.gram = torch.zeros(channels, k, k, **f64)
        self.rhs = torch.zeros(channels, k, **f64)
        self.moments = torch.zeros(channels, 3, **f64)  # Σ r², Σ t, Σ t²
        self.count = torch.zeros((), **f64)
        self.calls = 0
        self.const: list[int] = []
        self.offset = False

    def add(self, offset: Tensor | None, basis: list[Tensor | None], target: Tensor) -> None:
        if target.dtype not in (torch.float32, torch.float64):  # half precision: sum in fp32
            target = target.float()
            offset = None if offset is None else offset.float()
            basis = [None if a is None else a.float() for a in basis]
        dims = [0, *range(2, target.dim())]
        count = target.numel() // target.shape[1]

        scratch: list[Tensor] = []

        def total(a: Tensor | None, b: Tensor | None) -> Tensor:
            # Per-channel Σ a·b (None is the constant 1), reduced in the activations' dtype and
            # accumulated over batches in float64. Products go to one reused scratch tensor:
            # a fresh large allocation per product costs more than the product itself.
            if a is None and b is None:
                return torch.full((target.shape[1],), float(count), dtype=torch.float64)
            if a is None or b is None:
                return (a if b is None else b).sum(dims).double()
            if not scratch:
                scratch.append(torch.empty_like(target))
            return torch.mul(a, b, out=scratch[0]).sum(dims).double()

        r = target if offset is None else target - offset
        k = len(basis)
        gram = torch.empty(target.shape[1], k, k, dtype=torch.float64, device=target.device)
        for i in range(k):
            for j in range(i, k):
                gram[:, i, j] = gram[:, j, i] = total(basis[i], basis[j]).to(gram.device)
        rhs = torch.stack([total(a, r) for a in basis], dim=1).to(gram.device)
        t_sum = total(target, None)
        t_sq = total(target, target)
        r_sq = t_sq if offset is None else total(r, r)
        moments = torch.stack([r_sq, t_sum, t_sq], dim=1)
        counts = torch.full((1,), float(count), dtype=torch.float64, device=gram.device)
        if is_distributed():
            parts = [gram, rhs, moments.to(gram.device), counts]
            flat = torch.cat([p.flatten() for p in parts])
            torch.distributed.all_reduce(flat)
            gram, rhs, moments, counts = (
                chunk.view_as(p)
                for chunk, p in zip(flat.split([p.numel() for p in parts]), parts, strict=True)
            )
        self.gram += gram
        self.rhs += rhs
        self.moments += moments.to(self.moments.device)
        self.count += counts[0]
        self.calls += 1
        self.const = [i for i, a in enumerate(basis) if a is None]
        self.offset = offset is not None

    def solve(self, match: str) -> Tensor:
        """The per-channel coefficients: least squares, or rescaled to the target's variance."""
        coef = solve(self.gram, self.rhs)
        if match == "lstsq" or len(self.const) != 1 or self.offset:
            return coef
        c = self.const[0]
        n = self.count.clamp_min(1)
        means = self.gram[:, :, c] / n  # E[A_k] (A_c = 1)
        free = torch.ones(coef.shape[1], dtype=torch.bool, device=coef.device)
        free[c] = False
        cf = coef * free
        mean_pred = (cf * means).sum(1)
        var_pred = torch.einsum("ci,cij,cj->c", cf, self.gram, cf) / n - mean_pred.square()
        _, st, stt = self.moments.unbind(1)
        mean_t = st / n
        var_t = (stt / n - mean_t.square()).clamp_min(0)
        scale = torch.where(var_pred > 1e-12, (var_t / var_pred.clamp_min(1e-12)).sqrt(), 1.0)
        cf = cf * scale[:, None]
        out = cf.clone()
        out[:, c] = mean_t - (cf * means).sum(1)
        return out

    def relative_error(self, coef: Tensor) -> float:
        coef = coef.double().to(self.gram.device)
        sq, st, stt = self.moments.unbind(1)
        err = (
            sq - 2 * (coef * self.rhs).sum(1) + torch.einsum("ci,cij,cj->c", coef, self.gram, coef)
        )
        var = stt - st.square() / self.count.clamp_min(1)
        return float(err.clamp_min(0).sum() / var.sum().clamp_min(1e-30))
