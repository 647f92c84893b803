"""normswap.data: the IDX reader, Fashion-MNIST, the ImageNet transform and the sample photos."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from normswap.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    load_fashion_mnist,
    photo_crops,
    read_idx,
    sample_photos,
    to_imagenet,
)
from normswap.errors import NormSwapError


def _write_idx(path: Path, values: torch.Tensor, type_code: int, compress: bool = True) -> None:
    header = bytes([0, 0, type_code, values.dim()])
    header += b"".join(int(s).to_bytes(4, "big") for s in values.shape)
    body = values.contiguous().view(torch.uint8)
    if values.element_size() > 1:  # IDX is big-endian
        body = body.view(-1, values.element_size()).flip(1)
    data = header + bytes(body.flatten().tolist())
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_read_idx_round_trips_every_type(tmp_path: Path):
    cases = [
        (torch.arange(24, dtype=torch.uint8).view(2, 3, 4), 0x08),
        (torch.tensor([-3, 1000, 70000], dtype=torch.int32), 0x0C),
        (torch.tensor([[1.5, -2.25]], dtype=torch.float32), 0x0D),
        (torch.tensor([-7, 300], dtype=torch.int16), 0x0B),
    ]
    for i, (values, code) in enumerate(cases):
        path = tmp_path / f"v{i}.idx.gz"
        _write_idx(path, values, code)
        assert torch.equal(read_idx(path), values)
    plain = tmp_path / "plain.idx"
    _write_idx(plain, cases[0][0], 0x08, compress=False)
    assert torch.equal(read_idx(plain), cases[0][0])


def test_read_idx_names_the_fix_for_missing_and_damaged_files(tmp_path: Path):
    with pytest.raises(DataError, match=r"make assets.*apt-get install dataset-fashion-mnist"):
        read_idx(tmp_path / "nope-ubyte.gz")
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")  # header says 5 values, 3 follow
    with pytest.raises(DataError, match="damaged"):
        read_idx(bad)
    with gzip.open(bad, "wb") as f:
        f.write(b"PK\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)
    assert issubclass(DataError, NormSwapError)


def test_missing_fashion_mnist_is_an_error_not_fake_data(tmp_path: Path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(DataError, match="split"):
        load_fashion_mnist("validation")  # type: ignore[arg-type]  # bad split on purpose
    with pytest.raises(DataError, match="limit"):
        load_fashion_mnist("test", limit=0)


def test_fashion_mnist_is_the_real_data(fashion_mnist_dir: Path):
    images, labels = load_fashion_mnist("test", limit=100, root=fashion_mnist_dir)
    assert images.shape == (100, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    # The first test labels of Fashion-MNIST (ankle boot, pullover, trouser, trouser, shirt).
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]
    train, _ = load_fashion_mnist("train", limit=10, root=fashion_mnist_dir)
    assert not torch.equal(train, images[:10])


def test_to_imagenet_shapes_and_normalization():
    gray = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    x = to_imagenet(gray, 40)
    assert x.shape == (2, 3, 40, 40) and x.dtype == torch.float32 and x.is_contiguous()
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 5, 5], expected)
    rgb = torch.zeros(1, 3, 30, 60, dtype=torch.uint8)
    rgb[:, :, :, 25:35] = 255  # a bright vertical band in the middle
    cropped = to_imagenet(rgb, 16, crop=True)
    assert cropped.shape == (1, 3, 16, 16)
    assert cropped[0, 0, :, 8].mean() > cropped[0, 0, :, 0].mean()  # the band is centered
    with pytest.raises(DataError, match="uint8"):
        to_imagenet(gray.float(), 32)
    with pytest.raises(DataError, match="shape"):
        to_imagenet(torch.zeros(28, dtype=torch.uint8), 32)
    with pytest.raises(DataError, match="size"):
        to_imagenet(gray, 0)


def test_sample_photos_are_the_two_real_photos():
    names, photos = sample_photos(64)
    assert names == ["china.jpg", "flower.jpg"]
    assert photos.shape == (2, 3, 64, 64)
    assert not torch.equal(photos[0], photos[1])
    assert photos.std() > 0.5  # real content, normalized


def test_photo_crops_reads_an_image_file_like_a_sample_photo(tmp_path: Path):
    from PIL import Image

    pixels = torch.arange(40 * 60 * 3, dtype=torch.int64).remainder(251).to(torch.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels.view(40, 60, 3).numpy()).save(path)
    crops = photo_crops(path, 5, 16, seed=3)
    assert crops.shape == (5, 3, 16, 16)
    assert torch.equal(crops, photo_crops(str(path), 5, 16, seed=3))
    # The same crop of the same pixels as a sample photo would give: whole-photo crops of a
    # square photo are the photo resized (flipped or not).
    square = tmp_path / "square.png"
    Image.fromarray(pixels[: 32 * 32 * 3].view(32, 32, 3).numpy()).save(square)
    whole = photo_crops(square, 4, 16, scale=(1.0, 1.0))
    square_pixels = pixels[: 32 * 32 * 3].view(32, 32, 3).permute(2, 0, 1).contiguous()
    expected = to_imagenet(square_pixels[None], 16)[0]
    for crop in whole:
        same = torch.allclose(crop, expected, atol=1e-5)
        assert same or torch.allclose(crop, expected.flip(-1), atol=1e-5)


def test_photo_crops_names_the_choices_for_an_unknown_photo(tmp_path: Path):
    with pytest.raises(DataError, match=r"china\.jpg, flower\.jpg\) or the path"):
        photo_crops("nope.jpg", 2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode"):
        photo_crops(broken, 2)
