"""The few ``torch.distributed`` collectives normswap needs, each a no-op in one process.

Calibration, distillation, fidelity and the callbacks call these so every rank ends with the
same parameters and the same decisions; nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "all_ranks_true",
    "any_rank_true",
    "average_gradients",
    "broadcast_module",
    "broadcast_tensors",
    "collective_device",
    "is_distributed",
    "max_over_ranks",
    "rank",
    "sum_over_ranks",
]


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialized (several processes work together).

    Example:
        >>> is_distributed()
        False
    """
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank (0 without ``torch.distributed``).

    Example:
        >>> rank()
        0
    """
    return torch.distributed.get_rank() if is_distributed() else 0


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU for NCCL, else CPU.

    Example:
        >>> collective_device()
        device(type='cpu')
    """
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (the values themselves in one process).

    Example:
        >>> sum_over_ranks([1.0, 2.0])
        [1.0, 2.0]
    """
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def max_over_ranks(value: float) -> float:
    """The largest ``value`` over the ranks.

    Example:
        >>> max_over_ranks(3.0)
        3.0
    """
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def any_rank_true(flag: bool) -> bool:
    """Whether ``flag`` holds on some rank (every rank gets the same answer).

    Example:
        >>> any_rank_true(False)
        False
    """
    return max_over_ranks(float(flag)) > 0


def all_ranks_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (every rank gets the same answer).

    Example:
        >>> all_ranks_true(True)
        True
    """
    return not any_rank_true(not flag)


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Give every rank rank ``src``'s values of ``tensors`` (in place).

    Example:
        >>> broadcast_tensors([torch.zeros(1)])
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=src)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers of ``module``.

    Example:
        >>> broadcast_module(nn.Linear(2, 2))
    """
    broadcast_tensors([*module.parameters(), *module.buffers()], src=src)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks with one collective.

    Example:
        >>> average_gradients([torch.zeros(1, requires_grad=True)])
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
