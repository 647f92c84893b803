"""Real data for calibration, distillation and benchmarks: Fashion-MNIST and two sample photos.

Nothing here downloads anything or invents data. Fashion-MNIST comes from the four original IDX
files that the Debian package ``dataset-fashion-mnist`` installs (``make assets`` provides it);
when they are missing, :class:`DataError` names the fix instead of falling back to fake images.
The photos are scikit-learn's two bundled sample images (``china.jpg``, ``flower.jpg``).

:func:`to_imagenet` turns grayscale or RGB ``uint8`` images into what an ImageNet classifier
expects: ``float32`` tensors of shape ``(N, 3, S, S)`` normalized with ImageNet's mean and std.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from normswap.errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataError",
    "load_fashion_mnist",
    "load_images",
    "photo_crops",
    "read_idx",
    "sample_photos",
    "to_imagenet",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Fashion-MNIST's ten classes, by label.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: The per-channel mean and std torchvision's ImageNet weights were trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_FIX = (
    "run `make assets`, or install the Debian package yourself: "
    "`sudo apt-get install dataset-fashion-mnist`"
)
# IDX type codes (third header byte) -> torch dtype; IDX stores multi-byte values big-endian.
_IDX_TYPES: dict[int, torch.dtype] = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an IDX file (the MNIST format), gzip-compressed or not, into a tensor.

    The header is two zero bytes, a type code, the number of dims, then one big-endian uint32 per
    dim; the values follow, big-endian.

    Args:
        path: the file (``.gz`` files are decompressed).

    Returns:
        A tensor of the header's shape and type (``uint8`` for Fashion-MNIST's images and labels).

    Raises:
        DataError: the file is missing (with the fix), or its header or size is invalid.

    Example:
        >>> images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
        >>> images.shape, images.dtype
        (torch.Size([10000, 28, 28]), torch.uint8)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: {_FIX}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} cannot be read ({err}): {_FIX}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic {data[:4].hex()}): {_FIX}")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path}: truncated IDX header: {_FIX}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for size in shape:
        count *= size
    if len(data) - offset != count * itemsize:
        raise DataError(
            f"{path}: the header says {shape} values of {itemsize} byte(s), but the file holds "
            f"{len(data) - offset} bytes of data: the file is damaged: {_FIX}"
        )
    flat = torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8)
    values = flat.view(dtype) if itemsize == 1 else flat.view(-1, itemsize).flip(1).view(dtype)
    return values.reshape(shape)


def load_fashion_mnist(
    split: Literal["train", "test"] = "train",
    *,
    limit: int | None = None,
    root: str | os.PathLike[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST images and labels, read from the original IDX files.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000, the ``t10k`` files).
        limit: keep only the first ``limit`` images (the files are in a fixed order, so this is
            a deterministic subset; both splits are class-balanced overall).
        root: directory with the four ``*-ubyte.gz`` files; defaults to
            :data:`FASHION_MNIST_DIR`.

    Returns:
        ``(images, labels)``: ``uint8`` of shape ``(N, 28, 28)`` and ``int64`` of shape ``(N,)``.

    Raises:
        DataError: a file is missing or malformed (the message names ``make assets`` and the
            Debian package), ``split`` is unknown, or ``limit`` is not a positive int.

    Example:
        >>> images, labels = load_fashion_mnist("test", limit=8)
        >>> images.shape, labels.tolist()[:3]
        (torch.Size([8, 28, 28]), [9, 2, 1])
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive int or None, got {limit!r}")
    directory = FASHION_MNIST_DIR if root is None else Path(root)
    prefix = prefixes[split]
    images = read_idx(directory / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz")
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{directory}: Fashion-MNIST {split} images {tuple(images.shape)} and labels "
            f"{tuple(labels.shape)} do not match (expected (N, 28, 28) and (N,)): {_FIX}"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.contiguous(), labels.long()


def to_imagenet(images: Tensor, size: int, *, crop: bool = False) -> Tensor:
    """Resize ``uint8`` images to ``(N, 3, size, size)`` float32, normalized like ImageNet.

    Grayscale images are repeated over three channels. Resizing is bilinear with antialiasing
    (one fused ``F.interpolate`` call for the whole batch). With ``crop=True`` the shorter side is
    resized to ``size`` and the center ``size × size`` square is kept (aspect ratio preserved);
    otherwise the whole image is stretched to the square.

    Args:
        images: ``uint8`` of shape ``(N, H, W)`` (grayscale) or ``(N, 1|3, H, W)``.
        size: the output side ``S`` in pixels.
        crop: keep the aspect ratio and center-crop instead of stretching.

    Returns:
        ``float32`` of shape ``(N, 3, S, S)``: ``(x / 255 - mean) / std`` per channel.

    Raises:
        DataError: wrong dtype or shape, or ``size`` is not a positive int.

    Example:
        >>> x = to_imagenet(torch.zeros(2, 28, 28, dtype=torch.uint8), 64)
        >>> x.shape, round(x[0, 0, 0, 0].item(), 3)
        (torch.Size([2, 3, 64, 64]), -2.118)
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"size must be a positive int, got {size!r}")
    if images.dtype != torch.uint8:
        raise DataError(f"expected uint8 images (0..255), got dtype {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)  # (N, H, W) grayscale
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(
            f"expected a batch of images of shape (N, H, W), (N, 1, H, W) or (N, 3, H, W), got "
            f"{tuple(images.shape)} (add the batch dim for one image: images.unsqueeze(0))"
        )
    x = images.float().div_(255)
    h, w = x.shape[-2:]
    if crop:
        scale = size / min(h, w)
        out_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    else:
        out_hw = (size, size)
    x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    if crop:
        top, left = (out_hw[0] - size) // 2, (out_hw[1] - size) // 2
        x = x[:, :, top : top + size, left : left + size]
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def sample_photos(size: int = 224) -> tuple[list[str], Tensor]:
    """scikit-learn's two bundled photos, center-cropped to ``size`` and ImageNet-normalized.

    Args:
        size: the output side in pixels (ImageNet models are evaluated at 224).

    Returns:
        ``(names, images)``: ``["china.jpg", "flower.jpg"]`` and ``float32 (2, 3, size, size)``.

    Raises:
        DataError: scikit-learn is not installed (with the install command).

    Example:
        >>> names, photos = sample_photos(160)
        >>> names, photos.shape
        (['china.jpg', 'flower.jpg'], torch.Size([2, 3, 160, 160]))
    """
    photos = _sklearn_photos()
    batch = torch.stack(list(photos.values()))
    return list(photos), to_imagenet(batch.contiguous(), size, crop=True)


def _sklearn_photos() -> dict[str, Tensor]:
    """scikit-learn's sample photos by file name, ``uint8 (3, H, W)`` each."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise DataError(
            "the sample photos come with scikit-learn: pip install -e '.[demo]'"
        ) from err
    data = load_sample_images()
    return {
        Path(p).name: torch.from_numpy(img.copy()).permute(2, 0, 1)
        for p, img in zip(data.filenames, data.images, strict=True)
    }


def photo_crops(
    name: str | os.PathLike[str],
    count: int,
    size: int = 160,
    *,
    scale: tuple[float, float] = (0.05, 0.5),
    seed: int = 0,
) -> Tensor:
    """Random square crops of one photo, ImageNet-normalized.

    Each crop covers a random fraction of the photo's area in ``scale`` at a random place, and
    is resized to ``size`` (and flipped half the time): many different inputs from one photo,
    as a source of unlabeled natural images that other sources never saw.

    Args:
        name: one of scikit-learn's sample photos (``"china.jpg"``, ``"flower.jpg"``) or the
            path of an image file (``.jpg``, ``.png``, ... decoded as RGB).
        count: how many crops.
        size: their side in pixels.
        scale: the smallest and largest fraction of the photo's area a crop covers.
        seed: seeds the crops.

    Raises:
        DataError: an unknown photo or unreadable file, a bad argument, or scikit-learn
            missing.

    Example:
        >>> photo_crops("flower.jpg", 4, 64).shape
        torch.Size([4, 3, 64, 64])
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DataError(f"count must be a positive int, got {count!r}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise DataError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
    photo = _photo(name)
    h, w = photo.shape[-2:]
    g = torch.Generator().manual_seed(seed)
    crops = []
    for _ in range(count):
        area = float(torch.empty(()).uniform_(scale[0], scale[1], generator=g)) * h * w
        side = max(8, min(h, w, round(area**0.5)))
        top = int(torch.randint(0, h - side + 1, (), generator=g))
        left = int(torch.randint(0, w - side + 1, (), generator=g))
        crop = photo[:, top : top + side, left : left + side]
        if bool(torch.rand((), generator=g) < 0.5):
            crop = crop.flip(-1)
        crops.append(to_imagenet(crop.unsqueeze(0).contiguous(), size)[0])
    return torch.stack(crops)


def _photo(name: str | os.PathLike[str]) -> Tensor:
    """A scikit-learn sample photo by name, or an image file: ``uint8 (3, H, W)``."""
    if isinstance(name, str) and name in SAMPLE_PHOTOS:
        return _sklearn_photos()[name]
    path = Path(name)
    if not path.is_file():
        raise DataError(
            f"unknown photo {str(name)!r}: give one of scikit-learn's sample photos "
            f"({', '.join(SAMPLE_PHOTOS)}) or the path of an image file"
        )
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot decode {str(path)!r}: {err}") from err
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


#: scikit-learn's bundled sample photos (:func:`sample_photos`, :func:`photo_crops`).
SAMPLE_PHOTOS: tuple[str, ...] = ("china.jpg", "flower.jpg")

#: File suffixes :func:`load_images` reads from a folder.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_images(source: str | os.PathLike[str], size: int, limit: int | None = None) -> Tensor:
    """Unlabeled images for calibration or distillation, ImageNet-normalized ``(N, 3, S, S)``.

    ``source`` is one of:

    * ``"fashion-mnist"``: the Fashion-MNIST TRAIN images (see :func:`load_fashion_mnist`);
    * a folder: every ``.jpg``/``.jpeg``/``.png``/``.bmp``/``.webp`` file under it (recursively,
      in sorted order), decoded as RGB, shorter side resized to ``size`` and center-cropped;
    * a ``.pt`` file holding one tensor, loaded with ``weights_only=True``: ``uint8`` images
      (converted like the folder's) or ``float32 (N, 3, H, W)`` inputs used as they are.

    Args:
        source: where the images are.
        size: the output side ``S`` in pixels (ignored for a float ``.pt`` tensor).
        limit: read at most this many images.

    Returns:
        ``float32`` of shape ``(N, 3, S, S)``.

    Raises:
        DataError: a missing path, no images found, an unreadable file or a tensor of the wrong
            shape or dtype, naming the file and the fix.

    Example:
        >>> x = load_images("fashion-mnist", 64, limit=8)
        >>> x.shape
        torch.Size([8, 3, 64, 64])
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive int or None, got {limit!r}")
    if str(source) == "fashion-mnist":
        images, _ = load_fashion_mnist("train", limit=limit)
        return to_imagenet(images, size)
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"no such file or folder: {str(path)!r}; give a folder of images, a .pt tensor file "
            "or 'fashion-mnist'"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(path)!r}; point at the "
                "folder that holds them"
            )
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        batch = []
        for file in files[:limit]:
            try:
                with Image.open(file) as image:
                    pixels = np.asarray(image.convert("RGB"))
            except (OSError, UnidentifiedImageError) as err:
                raise DataError(f"cannot decode {str(file)!r}: {err}") from err
            image_t = torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0)
            batch.append(to_imagenet(image_t.contiguous(), size, crop=True))
        return torch.cat(batch)
    if path.suffix != ".pt":
        raise DataError(f"{str(path)!r}: expected a folder of images or a .pt tensor file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refuses anything but plain tensors and containers
        raise DataError(
            f"cannot load {str(path)!r} as a tensor (weights_only=True): {err}"
        ) from err
    if not isinstance(data, Tensor):
        raise DataError(
            f"{str(path)!r} holds a {type(data).__name__}; save one tensor (N, 3, H, W)"
        )
    data = data[:limit]
    if data.dtype == torch.uint8:
        return to_imagenet(data, size)
    if not data.is_floating_point() or data.dim() != 4 or data.shape[1] != 3:
        raise DataError(
            f"{str(path)!r}: expected uint8 images or float32 inputs of shape (N, 3, H, W), got "
            f"{data.dtype} {tuple(data.shape)}"
        )
    return data.float()
