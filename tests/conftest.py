"""Session-wide test set-up: the offline assets that `make assets` provides, and thread count.

The assets are guaranteed by the Makefile (`make test` runs `make assets` first), so a missing
asset is a failure that names the fix, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from torchvision.models import MobileNet_V2_Weights

REPO_ROOT = Path(__file__).resolve().parents[1]

# Same default as the Makefile, so a bare `.venv/bin/pytest` finds the checkpoint too:
# torchvision loads `weights="IMAGENET1K_V1"` from $TORCH_HOME/hub/checkpoints.
os.environ.setdefault("TORCH_HOME", str(REPO_ROOT / ".cache" / "torch"))

# The machines this project runs on (developers' and CI's) have 2 cores; a fixed count keeps
# timings and float reductions the same from run to run.
torch.set_num_threads(2)

# Installed by the Debian package dataset-fashion-mnist.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """Directory with Fashion-MNIST's four IDX files (gzip-compressed, original names)."""
    missing = [name for name in FASHION_MNIST_FILES if not (FASHION_MNIST_DIR / name).is_file()]
    if missing:
        pytest.fail(
            f"Fashion-MNIST files {missing} are missing from {FASHION_MNIST_DIR}: "
            "run `make assets` (it installs the Debian package dataset-fashion-mnist).",
            pytrace=False,
        )
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def mobilenet_v2_checkpoint() -> Path:
    """torchvision's MobileNetV2 IMAGENET1K_V1 checkpoint, where torchvision looks for it."""
    name = Path(urlparse(MobileNet_V2_Weights.IMAGENET1K_V1.url).path).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: run `make assets` (TORCH_HOME={os.environ['TORCH_HOME']}).",
            pytrace=False,
        )
    return path
