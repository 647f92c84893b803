"""A training loader that a resumed run continues exactly where the killed one stopped.

Lightning saves the state of a training loader that has ``state_dict``/``load_state_dict`` in
every checkpoint, and loads it into the loader it builds when the fit loop starts. The app's
tasks build the loader earlier (``estimated_stepping_batches`` in ``configure_optimizers``), so
that state never arrives there; the data module saves the same position and hands it over
through ``pending`` (:class:`~normswap.app.data.ImageData`). Two pieces make the position
exact:

* :class:`EpochShuffle` orders each epoch from ``(seed, epoch)`` alone, so epoch 3 has the same
  order whether or not the process saw epochs 0-2 (a ``RandomSampler`` with one generator
  depends on how many epochs that generator has already drawn);
* :class:`ResumableLoader` records the epoch and how many of its batches the trainer finished,
  and on load sets the epoch and skips those batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["EpochShuffle", "ResumableLoader"]


class EpochShuffle(Sampler[int]):
    """A random order of ``range(size)`` that depends only on ``seed`` and the epoch.

    Epoch ``e`` is the ``e``-th permutation drawn from a generator seeded with ``seed``, made
    without needing the earlier epochs to have been iterated in this process.

    Args:
        size: the number of samples.
        seed: the seed of the shuffle.

    Example:
        >>> sampler = EpochShuffle(5, seed=0)
        >>> first = list(sampler)
        >>> sampler.set_epoch(1)
        >>> second = list(sampler)
        >>> sampler.set_epoch(0)
        >>> list(sampler) == first != second
        True
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Order the next pass as epoch ``epoch`` (Lightning calls this every epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # cheap: one permutation per earlier epoch, no data
            torch.randperm(self.size, generator=generator)
        yield from torch.randperm(self.size, generator=generator).tolist()

    def __len__(self) -> int:
        return self.size


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch on every sampler of ``loader`` that has one (as Lightning does)."""
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose position (epoch, batches done) is saved in checkpoints.

    Args:
        *args: ``DataLoader`` arguments.
        position: returns ``(epoch, batches the trainer has finished in it)``; the data
            module reads it from its trainer (a loader alone cannot tell the batches a
            trainer finished from those it prefetched).
        pending: returns, once, a position to continue from (or ``None``), read when an
            iteration starts: the data module's restored position reaches the loader even
            where Lightning rebuilt the loader (a distributed sampler under DDP).
        **kwargs: ``DataLoader`` keyword arguments.

    Example:
        >>> data = torch.utils.data.TensorDataset(torch.arange(6.0))
        >>> loader = ResumableLoader(data, batch_size=2, position=lambda: (0, 1))
        >>> loader.state_dict()
        {'epoch': 0, 'batches': 1}
        >>> loader.load_state_dict({"epoch": 0, "batches": 2})
        >>> [batch[0].tolist() for batch in loader]  # the first two batches are skipped
        [[4.0, 5.0]]
        >>> len(list(loader))  # only the first pass after loading skips
        3
    """

    def __init__(
        self,
        *args: Any,
        position: Callable[[], tuple[int, int]] | None = None,
        pending: Callable[[], dict[str, int] | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.position, self.pending = position, pending
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        """The epoch and the number of its batches the trainer finished."""
        epoch, batches = self.position() if self.position is not None else (0, 0)
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue at ``state_dict``'s position: the next pass skips the finished batches.

        A position at the end of an epoch continues with the next epoch.
        """
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        _set_epoch(self, epoch)
        self._skip = batches

    def __iter__(self) -> Iterator[Any]:
        state = self.pending() if self.pending is not None else None
        if state is not None:
            self.load_state_dict(state)
        iterator = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):  # consumed, not just indices: right for any sampler and workers
            next(iterator)
        return iterator
