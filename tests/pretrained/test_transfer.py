"""normswap.pretrained.transfer: a diverse transfer set (augmentation, mixing, procedural)."""

from __future__ import annotations

import math

import pytest
import torch

from normswap.data import IMAGENET_MEAN, IMAGENET_STD
from normswap.errors import CalibrationError
from normswap.pretrained.distill import distill
from normswap.pretrained.transfer import DiverseAugment, procedural_images

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

#: Every random step off: the augmentation must then give each image back (or its mirror).
IDENTITY = {"min_area": 1.0, "rotation": 0.0, "shear": 0.0, "jitter": 0.0, "procedural": 0.0}


def _images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) - MEAN) / STD


def test_procedural_images_are_normalized_pixels_and_reproducible():
    a = procedural_images(6, (24, 32), generator=torch.Generator().manual_seed(1))
    b = procedural_images(6, (24, 32), generator=torch.Generator().manual_seed(1))
    assert a.shape == (6, 3, 24, 32) and torch.equal(a, b)
    pixels = a * STD + MEAN
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert pixels.flatten(1).std(1).min() > 0.01  # no blank image


def test_dead_leaves_are_flat_regions_and_noise_falls_as_a_power_law():
    size = 64
    images = procedural_images(40, size, generator=torch.Generator().manual_seed(0)) * STD + MEAN
    leaves, noise = images[:20], images[20:]
    # Dead leaves: occluding flat discs, so most neighbouring pixels are exactly equal.
    same = (leaves[..., 1:] == leaves[..., :-1]).float().mean()
    assert same > 0.8
    # 1/f^alpha noise with alpha in [1, 2.5]: the power spectrum falls as f^(-2 alpha).
    # Reference: the slope of log power against log radial frequency, fitted by least squares.
    gray = noise.mean(1)
    power = torch.fft.rfft2(gray - gray.mean((1, 2), keepdim=True)).abs().square().mean(0)
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    radius = (fy.square() + fx.square()).sqrt()
    band = (radius > 2 / size) & (radius < 0.25)
    x, y = radius[band].log(), power[band].log()
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).square().sum())
    assert -5.5 < slope < -1.5


def test_identity_settings_give_each_image_or_its_mirror_back():
    x = _images()
    torch.manual_seed(0)
    out = DiverseAugment(**IDENTITY, mix=0.0)(x)
    for image, got in zip(x, out, strict=True):
        same = torch.allclose(got, image, atol=1e-5)
        mirrored = torch.allclose(got, image.flip(-1), atol=1e-5)
        assert same or mirrored


def test_mixing_combines_each_image_with_its_neighbour_only():
    x = _images(8)
    for seed in range(6):
        torch.manual_seed(seed)
        # With geometry off, the flips are the only change before mixing: undo them by
        # comparing against both orientations of the two source images.
        out = DiverseAugment(**IDENTITY, mix=1.0)(x)
        for i in range(8):
            a, b = x[i], x[i - 1]
            ok = False
            for fa in (a, a.flip(-1)):
                for fb in (b, b.flip(-1)):
                    low, high = torch.minimum(fa, fb), torch.maximum(fa, fb)
                    ok |= bool(((out[i] >= low - 1e-5) & (out[i] <= high + 1e-5)).all())
            assert ok, f"seed {seed}, image {i} is not a mix of images {i} and {i - 1}"


def test_crops_rotations_and_jitter_change_images_but_keep_valid_pixels():
    x = _images(16, 32)
    torch.manual_seed(0)
    out = DiverseAugment(procedural=0.0, mix=0.0)(x)
    assert out.shape == x.shape
    pixels = out * STD + MEAN
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    changed = (out - x).flatten(1).abs().amax(1) > 1e-3
    assert changed.all()


def test_procedural_share_replaces_images():
    x = torch.zeros(32, 3, 16, 16)  # the normalized mean colour everywhere
    torch.manual_seed(0)
    out = DiverseAugment(**{**IDENTITY, "procedural": 1.0}, mix=0.0)(x)
    assert (out.flatten(1).std(1) > 0.05).all()  # every image is a procedural one
    torch.manual_seed(0)
    out = DiverseAugment(**{**IDENTITY, "procedural": 0.5}, mix=0.0)(x)
    replaced = (out.flatten(1).std(1) > 0.05).float().mean()
    assert 0.2 < replaced < 0.8


def test_anything_but_colour_image_batches_passes_through():
    augment = DiverseAugment()
    tokens = torch.randint(0, 100, (4, 16))
    sequence = torch.randn(4, 10, 3)
    gray = torch.randn(4, 1, 8, 8)
    for x in (tokens, sequence, gray):
        assert augment(x) is x


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("min_area", 0.0, "min_area must be in"),
        ("min_area", 1.5, "min_area must be in"),
        ("procedural", -0.1, "procedural must be in"),
        ("mix", 2.0, "mix must be in"),
        ("jitter", True, "jitter must be in"),
        ("rotation", -5.0, "rotation must be a number >= 0"),
        ("mean", (0.5,), "one value per channel"),
    ],
)
def test_bad_settings_name_the_field(field: str, value: object, match: str):
    with pytest.raises(CalibrationError, match=match):
        DiverseAugment(**{field: value})


@pytest.mark.parametrize(("count", "size"), [(0, 8), (True, 8), (2, 1)])
def test_procedural_images_refuse_bad_arguments(count: object, size: int):
    with pytest.raises(CalibrationError):
        procedural_images(count, size)  # a bool or 0 where a positive int belongs, on purpose


def test_distillation_feeds_teacher_and_student_the_same_augmented_batch():
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}

    class Probe(torch.nn.Module):
        def __init__(self, who: str) -> None:
            super().__init__()
            self.who = who
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen[self.who].append(x.detach().clone())
            return self.head(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    student, teacher = Probe("student"), Probe("teacher")
    data = _images(16, 12)
    distill(student, teacher, data, steps=3, batch_size=8, val_data=data[:4],
            augment=DiverseAugment(), progress=False, eval_every=10)  # fmt: skip
    # Agreement checks see the untouched validation inputs (4 samples); the 3 training steps
    # (the last calls with 8) see augmented batches, the same for teacher and student.
    train_t = [x for x in seen["teacher"] if x.shape[0] == 8][-3:]
    train_s = [x for x in seen["student"] if x.shape[0] == 8][-3:]
    assert len(train_t) == 3
    assert all(torch.equal(t, s) for t, s in zip(train_t, train_s, strict=True))
    assert not any(torch.equal(t, data[:8]) for t in train_t)
    assert math.isfinite(float(train_t[0].sum()))
