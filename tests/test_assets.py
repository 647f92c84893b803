"""The offline assets are the real ones, readable the way the tests and the demo read them."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

IDX_UBYTE_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_UBYTE_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST format) of unsigned bytes."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    found = int.from_bytes(data[:4], "big")
    assert found == magic, f"{path.name}: magic {found:#010x}, expected {magic:#010x}"
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    assert array.size == int(np.prod(shape)), f"{path.name}: header says {shape}"
    return array.reshape(shape)


@pytest.mark.parametrize(
    ("split", "count", "mean"),
    # Per-split pixel means of Fashion-MNIST (MNIST's are about 0.13, so this tells them apart).
    [("train", 60_000, 0.2860), ("t10k", 10_000, 0.2868)],
)
def test_fashion_mnist_idx_files(fashion_mnist_dir: Path, split: str, count: int, mean: float):
    images = read_idx(fashion_mnist_dir / f"{split}-images-idx3-ubyte.gz", IDX_UBYTE_IMAGES_MAGIC)
    labels = read_idx(fashion_mnist_dir / f"{split}-labels-idx1-ubyte.gz", IDX_UBYTE_LABELS_MAGIC)

    assert images.shape == (count, 28, 28)
    assert labels.shape == (count,)
    assert labels.min() == 0
    assert labels.max() == 9
    # Fashion-MNIST is balanced: every one of the 10 classes has a tenth of each split.
    assert np.bincount(labels, minlength=10).tolist() == [count // 10] * 10
    assert images.mean() / 255 == pytest.approx(mean, abs=5e-4)


def test_mobilenet_v2_checkpoint_is_torchvisions(mobilenet_v2_checkpoint: Path):
    # torchvision names checkpoints <name>-<first 8 hex digits of their SHA-256>.pth.
    expected_prefix = mobilenet_v2_checkpoint.stem.rsplit("-", 1)[1]
    digest = hashlib.sha256(mobilenet_v2_checkpoint.read_bytes()).hexdigest()
    assert digest.startswith(expected_prefix)

    state = torch.load(mobilenet_v2_checkpoint, weights_only=True)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(state, strict=True)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 52


def test_mobilenet_v2_pretrained_weights_load_offline(
    mobilenet_v2_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
):
    def no_download(url: str, *args, **kwargs):
        raise AssertionError(f"torchvision tried to download {url}; run `make assets`")

    # torchvision fetches weights through torch.hub.load_state_dict_from_url, which downloads
    # with torch.hub.download_url_to_file only when the file is not in $TORCH_HOME already.
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")

    state = torch.load(mobilenet_v2_checkpoint, weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
