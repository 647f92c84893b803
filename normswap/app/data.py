"""Lightning data modules for the app: Fashion-MNIST (default), digits, an image folder, fake.

All but ``FakeData`` are real data; ``FakeData`` exists for explicit smoke tests (``data=fake``)
and is never used as a fallback. Missing data raises :class:`~normswap.data.DataError` with the
fix, before any training starts (the app calls :meth:`ImageData.prepare` first).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from normswap.app.loaders import EpochShuffle, ResumableLoader
from normswap.data import DataError, load_fashion_mnist

__all__ = ["DigitsData", "FakeData", "FashionMNISTData", "ImageData", "ImageFolderData"]


def _check_positive(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"data.{name} must be a positive integer, got {value!r}")


class ImageData(pl.LightningDataModule):
    """Base: train/val/test datasets of ``(image, label)`` and their loaders.

    Subclasses implement :meth:`_load` and set ``num_classes``, ``in_channels``, ``image_size``.
    """

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(self, batch_size: int = 32, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        _check_positive("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise DataError(f"data.num_workers must be an int >= 0, got {num_workers!r}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._resume_at: dict[str, int] | None = None

    def prepare(self) -> None:
        """Load the data now (idempotent); raises ``DataError`` with the fix if it is missing.

        Example:
            >>> dm = DigitsData(batch_size=8); dm.prepare(); len(dm.train_set) > 0
            True
        """
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._load()

    def _load(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        self.prepare()

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "call prepare() first"
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
        }
        if not shuffle:
            return DataLoader(dataset, **kwargs)
        # The training order depends on (seed, epoch) only and the loader's position is saved
        # in checkpoints, so a resumed run sees the batches an uninterrupted one would. The
        # generator seeds the workers without drawing from the global random state.
        return ResumableLoader(
            dataset,
            sampler=EpochShuffle(len(dataset), self.seed),
            generator=torch.Generator().manual_seed(self.seed),
            position=self._train_position,
            pending=self._take_resume_position,
            **kwargs,
        )

    def _take_resume_position(self) -> dict[str, int] | None:
        position, self._resume_at = self._resume_at, None
        return position

    def _train_position(self) -> tuple[int, int]:
        """The epoch and the batches of it the trainer has finished (checkpoint state)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        epoch = trainer.current_epoch
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= trainer.num_training_batches:  # the epoch is over (limit_train_batches)
            return epoch + 1, 0
        return epoch, batches

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, saved in checkpoints (see :meth:`load_state_dict`)."""
        if self.trainer is None:
            return {}
        epoch, batches = self._train_position()
        return {"train_position": {"epoch": epoch, "batches": batches}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next pass of the training loader continue at the checkpoint's position.

        Lightning restores a data module before ``configure_optimizers`` runs, and the tasks'
        ``estimated_stepping_batches`` creates and starts the training loader there, before
        Lightning's own loader state would be loaded; so the loader takes the position from
        here when its first pass starts.
        """
        self._resume_at = state_dict.get("train_position")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def _split(
    x: torch.Tensor, y: torch.Tensor, val_size: int, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size], order[val_size:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class FashionMNISTData(ImageData):
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (real data, offline).

    Args:
        root: folder with the four IDX ``*.gz`` files (default: the Debian package's).
        batch_size: per-device batch size.
        val_size: images held out of the 60,000 training images for validation.
        train_size: use only this many training images (for quick runs); ``None``: all.
        test_size: use only this many of the 10,000 test images; ``None``: all.

    Example:
        >>> dm = FashionMNISTData(train_size=256, val_size=64, test_size=64)
        >>> dm.prepare()
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([32, 1, 28, 28])
    """

    num_classes, in_channels, image_size = 10, 1, 28
    MEAN, STD = 0.2860, 0.3530

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 32,
        val_size: int = 5000,
        train_size: int | None = None,
        test_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        _check_positive("val_size", val_size)
        _check_positive("train_size", train_size, optional=True)
        _check_positive("test_size", test_size, optional=True)
        self.root, self.val_size = root, val_size
        self.train_size, self.test_size = train_size, test_size

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255.0 - self.MEAN) / self.STD).unsqueeze(1)

    def _load(self) -> tuple[Dataset, Dataset, Dataset]:
        images, labels = load_fashion_mnist("train", root=self.root)
        train, val = _split(self._normalize(images), labels, self.val_size, self.seed)
        if self.train_size is not None:
            train = TensorDataset(*(t[: self.train_size] for t in train.tensors))
        test_images, test_labels = load_fashion_mnist("test", root=self.root, limit=self.test_size)
        return train, val, TensorDataset(self._normalize(test_images), test_labels)


class DigitsData(ImageData):
    """scikit-learn's bundled handwritten digits (1,797 real 8×8 images, 10 classes).

    Example:
        >>> dm = DigitsData(); dm.prepare(); len(dm.train_set), len(dm.val_set)
        (1437, 360)
    """

    num_classes, in_channels, image_size = 10, 1, 8

    def __init__(
        self, batch_size: int = 32, val_size: int = 360, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        _check_positive("val_size", val_size)
        self.val_size = val_size

    def _load(self) -> tuple[Dataset, Dataset, Dataset]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise DataError("data=digits needs scikit-learn: pip install scikit-learn") from err
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - x.mean()) / x.std()
        y = torch.tensor(digits.target, dtype=torch.long)
        train, val = _split(x, y, self.val_size, self.seed)
        return train, val, val  # no separate test split: the validation split is reported


class ImageFolderData(ImageData):
    """Your own images: ``root/<split>/<class>/*.jpg`` (splits ``train`` and ``val``), or
    ``root/<class>/*.jpg`` with ``val_fraction`` held out.

    Example:
        >>> dm = ImageFolderData(root="/data/flowers", image_size=96)  # doctest: +SKIP
    """

    in_channels = 3

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if root is None or not Path(root).is_dir():
            raise DataError(
                f"data.root={root!r} is not a folder: point it at your images, e.g. "
                "data=imagefolder data.root=/path/to/images (one sub-folder per class, "
                "optionally inside train/ and val/)"
            )
        _check_positive("image_size", image_size)
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")
        self.root, self.image_size, self.val_fraction = Path(root), image_size, val_fraction
        self.num_classes = 0

    def _load(self) -> tuple[Dataset, Dataset, Dataset]:
        from torchvision import datasets, transforms

        tf = transforms.Compose(
            [
                transforms.Resize(self.image_size),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
        try:
            if (self.root / "train").is_dir() and (self.root / "val").is_dir():
                train = datasets.ImageFolder(os.fspath(self.root / "train"), transform=tf)
                val = datasets.ImageFolder(os.fspath(self.root / "val"), transform=tf)
                classes = train.classes
            else:
                full = datasets.ImageFolder(os.fspath(self.root), transform=tf)
                n_val = max(1, int(len(full) * self.val_fraction))
                order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
                val = torch.utils.data.Subset(full, order[:n_val].tolist())
                train = torch.utils.data.Subset(full, order[n_val:].tolist())
                classes = full.classes
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"data.root={str(self.root)!r}: {err}") from err
        self.num_classes = len(classes)
        return train, val, val


class FakeData(ImageData):
    """Random images and labels — for explicit smoke tests (``data=fake``) only.

    Example:
        >>> dm = FakeData(num_samples=16); dm.prepare(); len(dm.train_set)
        16
    """

    def __init__(
        self,
        num_samples: int = 64,
        num_classes: int = 10,
        channels: int = 1,
        image_size: int = 28,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        for name, value in [
            ("num_samples", num_samples),
            ("num_classes", num_classes),
            ("channels", channels),
            ("image_size", image_size),
        ]:
            _check_positive(name, value)
        self.num_samples, self.num_classes = num_samples, num_classes
        self.in_channels, self.image_size = channels, image_size

    def _load(self) -> tuple[Dataset, Dataset, Dataset]:
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.num_samples, self.in_channels, self.image_size, self.image_size)
        data = TensorDataset(
            torch.randn(shape, generator=g),
            torch.randint(0, self.num_classes, (self.num_samples,), generator=g),
        )
        return data, data, data
