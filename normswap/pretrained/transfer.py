"""A diverse transfer set from a few images: heavy augmentation, CutMix/mixup, procedural images.

Distillation teaches the converted model the original's function only where it is shown
inputs. A conversion fitted on a few sources agrees with the original on them and collapses
elsewhere (``benchmarks/results/ood.md``). :class:`DiverseAugment` turns each distillation
batch into inputs the batch alone never covers: random crops down to a tiny fraction of an
image's area, rotations, shears, flips and colour jitter (the single-image distillation recipe,
Asano & Saeed 2023), images replaced by procedural ones (dead leaves and 1/f noise, Baradad et
al. 2021), then CutMix or mixup between images. Teacher and student see the very same augmented
batch (consistent teaching, Beyer et al. 2022): distillation passes it as ``augment=``.

Everything is batched tensor work on the batch's device, a few percent of a distillation step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from normswap.data import IMAGENET_MEAN, IMAGENET_STD
from normswap.errors import CalibrationError

__all__ = ["DiverseAugment", "procedural_images"]


def _uniform(
    n: int, low: float, high: float, g: torch.Generator | None, device: torch.device
) -> Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _dead_leaves(n: int, h: int, w: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    """Occluding discs of random colours with power-law radii, in ``[0, 1]``."""
    yy = torch.linspace(0, 1, h, device=device).view(1, h, 1)
    xx = torch.linspace(0, w / h, w, device=device).view(1, 1, w)
    image = torch.rand(n, 3, 1, 1, generator=g, device=device).expand(n, 3, h, w).clone()
    r_min, r_max = 0.02, 0.5
    for _ in range(48):
        # radius density ~ r^-3 between r_min and r_max (inverse-CDF sampling)
        u = torch.rand(n, generator=g, device=device)
        radius = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5
        cy = torch.rand(n, generator=g, device=device).view(n, 1, 1)
        cx = (torch.rand(n, generator=g, device=device) * w / h).view(n, 1, 1)
        inside = (yy - cy).square() + (xx - cx).square() < radius.view(n, 1, 1).square()
        colour = torch.rand(n, 3, 1, 1, generator=g, device=device)
        image = torch.where(inside.unsqueeze(1), colour, image)
    return image


def _spectral(n: int, h: int, w: int, g: torch.Generator | None, device: torch.device) -> Tensor:
    """Coloured noise whose amplitude spectrum falls as ``1 / f**alpha``, in ``[0, 1]``."""
    fy = torch.fft.fftfreq(h, device=device).view(h, 1)
    fx = torch.fft.rfftfreq(w, device=device).view(1, -1)
    freq = (fy.square() + fx.square()).sqrt().clamp_min(1.0 / max(h, w))
    alpha = _uniform(n, 1.0, 2.5, g, device).view(n, 1, 1, 1)
    amplitude = freq.unsqueeze(0).unsqueeze(0) ** -alpha
    real = torch.randn(n, 3, h, fx.shape[1], generator=g, device=device)
    imag = torch.randn(n, 3, h, fx.shape[1], generator=g, device=device)
    field = torch.fft.irfft2(torch.complex(real, imag) * amplitude, s=(h, w))
    # correlated channels: a random colour mixing of three independent fields
    mixing = torch.randn(n, 3, 3, generator=g, device=device) * 0.5 + torch.eye(3, device=device)
    field = torch.einsum("ncd,ndhw->nchw", mixing, field)
    low = field.amin(dim=(1, 2, 3), keepdim=True)
    high = field.amax(dim=(1, 2, 3), keepdim=True)
    return (field - low) / (high - low).clamp_min(1e-12)


def procedural_images(
    count: int,
    size: int | tuple[int, int],
    *,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Procedural images: half dead leaves (occluding discs), half 1/f coloured noise.

    Images with natural images' occlusion edges and power-law spectra, from no data at all
    (Baradad et al., "Learning to See by Looking at Noise", 2021): inputs a transfer set can
    add where the user's images do not reach.

    Args:
        count: how many images.
        size: their side ``S`` or ``(H, W)`` in pixels.
        mean: per-channel mean the images are normalized with (ImageNet's by default).
        std: per-channel standard deviation they are normalized with.
        generator: random generator (the global one when ``None``).
        device: where to make them.

    Returns:
        ``(count, 3, H, W)`` float images, normalized like the model's inputs.

    Raises:
        CalibrationError: a bad count or size.

    Example:
        >>> x = procedural_images(4, 32, generator=torch.Generator().manual_seed(0))
        >>> x.shape
        torch.Size([4, 3, 32, 32])
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CalibrationError(f"count must be a positive int, got {count!r}")
    h, w = (size, size) if isinstance(size, int) else size
    if min(h, w) < 2:
        raise CalibrationError(f"size must be at least 2 pixels, got {size!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    leaves = count // 2 + count % 2
    parts = [_dead_leaves(leaves, h, w, generator, dev)]
    if count - leaves:
        parts.append(_spectral(count - leaves, h, w, generator, dev))
    images = torch.cat(parts)
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass
class DiverseAugment:
    """Turn a batch of images into a diverse transfer batch (pass it as ``augment=``).

    Each image gets a random crop covering between ``min_area`` and all of its area (any aspect
    from 3/4 to 4/3), a rotation up to ``rotation`` degrees, a shear up to ``shear``, a
    horizontal flip half the time (one resampling for all of these), and colour jitter
    (brightness, contrast, saturation by up to ``jitter``). A ``procedural`` share of the
    images is replaced by :func:`procedural_images`. Then, with probability ``mix``, the batch
    is mixed with a shuffled copy of itself: CutMix or mixup, half the time each. Inputs that are
    not batches of 3-channel float images are returned as they are.

    Attributes:
        min_area: the smallest fraction of an image's area a crop covers.
        rotation: the largest rotation, in degrees.
        shear: the largest shear factor.
        jitter: the largest relative change of brightness, contrast and saturation.
        procedural: the share of each batch replaced by procedural images.
        mix: the probability that a batch is CutMix-ed or mixed up.
        mean: per-channel mean of the inputs' normalization (ImageNet's by default).
        std: per-channel standard deviation of the inputs' normalization.

    Example:
        >>> augment = DiverseAugment()
        >>> augment(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
    """

    min_area: float = 0.002
    rotation: float = 30.0
    shear: float = 0.2
    jitter: float = 0.4
    procedural: float = 0.25
    mix: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        checks = (
            ("min_area", self.min_area, 0.0, 1.0, False),
            ("procedural", self.procedural, 0.0, 1.0, True),
            ("mix", self.mix, 0.0, 1.0, True),
            ("jitter", self.jitter, 0.0, 1.0, True),
        )
        for name, value, low, high, closed in checks:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not (low <= value <= high if closed else low < value <= high):
                bracket = "[" if closed else "("
                raise CalibrationError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
        for name, value in (("rotation", self.rotation), ("shear", self.shear)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise CalibrationError(f"{name} must be a number >= 0, got {value!r}")
        if len(self.mean) != len(self.std):
            raise CalibrationError(
                f"mean and std must have one value per channel, got {self.mean!r} and {self.std!r}"
            )

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not x.is_floating_point() or x.shape[1] != len(self.mean):
            return x
        n, _, h, w = x.shape
        dev = x.device
        m = torch.tensor(self.mean, device=dev, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(self.std, device=dev, dtype=x.dtype).view(1, -1, 1, 1)
        pixels = self._geometry(x * s + m)
        pixels = self._colour(pixels)
        out = (pixels - m) / s
        replaced = torch.rand(n, device=dev) < self.procedural
        count = int(replaced.sum())
        if count:
            fake = procedural_images(count, (h, w), mean=self.mean, std=self.std, device=dev)
            out[replaced] = fake.to(out.dtype)
        if n > 1 and float(torch.rand(())) < self.mix:
            out = self._cutmix(out) if float(torch.rand(())) < 0.5 else self._mixup(out)
        return out

    def _geometry(self, pixels: Tensor) -> Tensor:
        """One affine resampling per image: crop, aspect, rotation, shear and flip."""
        n, _, h, w = pixels.shape
        dev, dtype = pixels.device, pixels.dtype
        log_area = _uniform(n, math.log(self.min_area), 0.0, None, dev)
        # the aspect ratios that keep a crop of this area inside the image (1 for the whole)
        low = log_area.clamp(min=math.log(3 / 4))
        high = (-log_area).clamp(max=math.log(4 / 3))
        log_aspect = low + torch.rand(n, device=dev) * (high - low)
        sx = ((log_area + log_aspect) / 2).exp().clamp(max=1.0)
        sy = ((log_area - log_aspect) / 2).exp().clamp(max=1.0)
        cx = _uniform(n, -1.0, 1.0, None, dev) * (1 - sx)
        cy = _uniform(n, -1.0, 1.0, None, dev) * (1 - sy)
        angle = _uniform(n, -1.0, 1.0, None, dev) * math.radians(self.rotation)
        shear = _uniform(n, -1.0, 1.0, None, dev) * self.shear
        flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
        cos, sin = angle.cos(), angle.sin()
        # theta = rotation @ shear @ diag(flip * sx, sy), then the crop's centre
        a = cos * flip * sx
        b = (cos * shear - sin) * sy
        c = sin * flip * sx
        d = (sin * shear + cos) * sy
        theta = torch.stack([torch.stack([a, b, cx], -1), torch.stack([c, d, cy], -1)], 1)
        grid = F.affine_grid(theta.to(dtype), [n, pixels.shape[1], h, w], align_corners=False)
        return F.grid_sample(
            pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    def _colour(self, pixels: Tensor) -> Tensor:
        n = pixels.shape[0]
        dev = pixels.device
        if self.jitter == 0 or pixels.shape[1] != 3:
            return pixels.clamp(0, 1)
        shape = (n, 1, 1, 1)
        bright = _uniform(n, 1 - self.jitter, 1 + self.jitter, None, dev).view(shape)
        contrast = _uniform(n, 1 - self.jitter, 1 + self.jitter, None, dev).view(shape)
        saturation = _uniform(n, 1 - self.jitter, 1 + self.jitter, None, dev).view(shape)
        weights = torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=pixels.dtype)
        pixels = pixels * bright
        gray = (pixels * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
        pixels = (pixels - gray.mean(dim=(2, 3), keepdim=True)) * contrast + gray.mean(
            dim=(2, 3), keepdim=True
        )
        gray = (pixels * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
        return (gray + (pixels - gray) * saturation).clamp(0, 1)

    @staticmethod
    def _mixup(x: Tensor) -> Tensor:
        lam = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
        return lam * x + (1 - lam) * x.roll(1, 0)

    @staticmethod
    def _cutmix(x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        dev = x.device
        side = torch.rand(n, device=dev).sqrt()  # box area uniform in [0, 1]
        bh, bw = (side * h).round().long(), (side * w).round().long()
        top = (torch.rand(n, device=dev) * (h - bh + 1)).floor().long()
        left = (torch.rand(n, device=dev) * (w - bw + 1)).floor().long()
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        box = (
            (rows >= top.view(n, 1, 1))
            & (rows < (top + bh).view(n, 1, 1))
            & (cols >= left.view(n, 1, 1))
            & (cols < (left + bw).view(n, 1, 1))
        )
        return torch.where(box.unsqueeze(1), x.roll(1, 0), x)
