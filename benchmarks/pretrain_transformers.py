"""Train the two "pretrained" LayerNorm transformers of ``transformers_fidelity.py``; their data.

* ``vit``: :func:`normswap.small.tiny_vit` (patch 4, 4 blocks, width 96) trained on the
  Fashion-MNIST TRAIN images (the first 55,000; the last 5,000 are held out for conversion
  checks), 28 px, ImageNet-normalized 3-channel inputs (:func:`normswap.data.to_imagenet`).
* ``gpt``: :func:`normswap.small.tiny_gpt` (Hugging Face ``GPT2LMHeadModel``, bytes as tokens,
  4 blocks, width 128, context 128) trained on the Python standard library's own source files
  (the running interpreter's ``Lib/``, tests and ``pydoc_data`` left out), split by file.

Both train a fixed number of steps from a fixed seed (about 8 minutes of CPU each on 2 cores)
and are written with their metadata to ``.cache/pretrained/`` (``make pretrained-transformers``;
a model already there is kept). Other domains, for conversions to be checked on data no step
saw: sklearn's digits and crops of its two sample photos (ViT); the prose of the Python
documentation's topics (``pydoc_data/topics.py``, GPT).

Run: ``.venv/bin/python benchmarks/pretrain_transformers.py vit gpt``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normswap.data import load_fashion_mnist, photo_crops, to_imagenet
from normswap.pretrained.fidelity import logits_of
from normswap.small import tiny_gpt, tiny_vit

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "pretrained"
VIT_SIZE = 28
CONTEXT = 128
HELD_OUT = 5000  # the last Fashion-MNIST TRAIN images: never trained on


# --------------------------------------------------------------------------- data


def fmnist(split: str) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as the ViT sees it: ``train`` (55,000), ``held`` (the other 5,000 TRAIN
    images) or ``test`` (10,000); inputs ``(N, 3, 28, 28)`` float, labels ``(N,)``."""
    source = "test" if split == "test" else "train"
    images, labels = load_fashion_mnist(source)
    if split == "train":
        images, labels = images[:-HELD_OUT], labels[:-HELD_OUT]
    elif split == "held":
        images, labels = images[-HELD_OUT:], labels[-HELD_OUT:]
    return to_imagenet(images, VIT_SIZE), labels


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 handwritten digits (8 x 8, 17 grey levels) as 28 px ViT inputs."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).mul(255 / 16).round().to(torch.uint8)
    return to_imagenet(images, VIT_SIZE), torch.from_numpy(bunch.target).long()


def photos(count: int = 1000) -> Tensor:
    """Random crops of sklearn's two sample photos, half from each, as 28 px ViT inputs."""
    half = count // 2
    return torch.cat(
        [
            photo_crops("china.jpg", half, VIT_SIZE, seed=1),
            photo_crops("flower.jpg", count - half, VIT_SIZE, seed=2),
        ]
    )


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_corpus() -> dict[str, Tensor]:
    """The standard library's ``.py`` files as bytes, split by file: every 10th file (in
    sorted path order) is ``test``, the next one ``val``, the rest ``train``."""
    root = _stdlib()
    skip = ("test", "tests", "idle_test", "pydoc_data", "site-packages")
    files = sorted(
        p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & set(skip)
    )
    if len(files) < 50:
        raise SystemExit(f"{root} holds {len(files)} .py files: is this a full Python install?")
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for index, path in enumerate(files):
        split = {0: "test", 1: "val"}.get(index % 10, "train")
        parts[split].append(path.read_bytes())
    return {
        k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8) for k, v in parts.items()
    }


def prose_corpus() -> dict[str, Tensor]:
    """English prose no GPT step saw: the text of ``pydoc_data/topics.py`` (the Python
    documentation's topics), split in order: the first 80% ``train``, 10% ``val``, 10% ``test``."""
    path = _stdlib() / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: this Python was installed without pydoc_data")
    namespace: dict = {}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    text = "\n".join(namespace["topics"][k] for k in sorted(namespace["topics"]))
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    a, b = int(0.8 * len(data)), int(0.9 * len(data))
    return {"train": data[:a], "val": data[a:b], "test": data[b:]}


def windows(data: Tensor, count: int, seed: int, context: int = CONTEXT) -> Tensor:
    """``count`` random windows of ``context + 1`` bytes of ``data`` as ``int64 (count, T+1)``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - context - 1, (count,), generator=g)
    return torch.stack([data[s : s + context + 1] for s in starts.tolist()]).long()


def tiling(data: Tensor, context: int = CONTEXT, limit: int | None = None) -> Tensor:
    """``data`` cut into consecutive windows of ``context + 1`` bytes (overlapping by one), for
    evaluation: every byte but the first of each window is predicted once."""
    n = (len(data) - 1) // context
    if limit is not None:
        n = min(n, limit)
    idx = torch.arange(n).unsqueeze(1) * context + torch.arange(context + 1)
    return data[idx].long()


@torch.no_grad()
def perplexity(model: nn.Module, windows_: Tensor, batch: int = 64) -> float:
    """Per-byte perplexity: ``exp`` of the mean next-byte cross-entropy over ``windows_``."""
    model.eval()
    total, count = 0.0, 0
    for w in windows_.split(batch):
        logits = logits_of(model(w[:, :-1]), "model")
        total += float(F.cross_entropy(logits, w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 500) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    pred = torch.cat([model(b).argmax(-1) for b in x.split(batch)])
    return float((pred == y).float().mean())


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Recipe:
    """How one model is trained: steps, batch, AdamW peak learning rate, weight decay, warmup."""

    steps: int
    batch: int
    lr: float
    weight_decay: float
    warmup: int


RECIPES = {
    "vit": Recipe(steps=1500, batch=128, lr=2e-3, weight_decay=0.05, warmup=150),
    "gpt": Recipe(steps=1000, batch=32, lr=2e-3, weight_decay=0.01, warmup=100),
}


def train(
    model: nn.Module,
    recipe: Recipe,
    batches: Callable[[int], Iterator[tuple[Tensor, Tensor]]],
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
    seed: int = 0,
) -> list[float]:
    """AdamW with linear warmup then cosine decay; returns the mean loss of every 100 steps."""
    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": other, "weight_decay": 0},
        ],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )

    def factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        done = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses, running = [], 0.0
    for step, (x, y) in zip(range(recipe.steps), batches(seed), strict=False):
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if (step + 1) % 100 == 0:
            losses.append(round(running / 100, 4))
            print(f"  step {step + 1}/{recipe.steps} loss {losses[-1]:.4f}", flush=True)
            running = 0.0
    return losses


def _vit_batches(
    x: Tensor, y: Tensor, batch: int
) -> Callable[[int], Iterator[tuple[Tensor, Tensor]]]:
    def stream(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            images = x[idx]
            flip = torch.rand(batch, generator=g) < 0.5
            yield torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images), y[idx]

    return stream


def _class_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Next-byte cross-entropy of a causal LM on windows ``x`` (inputs) and ``y`` (shifted)."""
    return F.cross_entropy(logits_of(model(x), "model"), y.reshape(-1))


def lm_batches(data: Tensor, batch: int) -> Callable[[int], Iterator[tuple[Tensor, Tensor]]]:
    """Random windows of ``data``: ``(inputs, next bytes)`` batches, seeded per stream."""

    def stream(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        for step in range(10**9):
            w = windows(data, batch, seed=seed * 1_000_003 + step)
            yield w[:, :-1], w[:, 1:]

    return stream


def train_vit() -> dict:
    x, y = fmnist("train")
    model = tiny_vit(10, image_size=VIT_SIZE)
    recipe = RECIPES["vit"]
    losses = train(model, recipe, _vit_batches(x, y, recipe.batch), _class_loss)
    held_x, held_y = fmnist("held")
    test_x, test_y = fmnist("test")
    return {
        "model": model,
        "losses": losses,
        "held_accuracy": round(accuracy(model, held_x, held_y), 4),
        "test_accuracy": round(accuracy(model, test_x, test_y), 4),
    }


def train_gpt() -> dict:
    code = code_corpus()
    model = tiny_gpt(context=CONTEXT)
    recipe = RECIPES["gpt"]
    losses = train(model, recipe, lm_batches(code["train"], recipe.batch), lm_loss)
    return {
        "model": model,
        "losses": losses,
        "test_perplexity": round(perplexity(model, tiling(code["test"], limit=2000)), 4),
        "prose_perplexity": round(perplexity(model, tiling(prose_corpus()["test"], limit=2000)), 4),
    }


TRAINERS: dict[str, Callable[[], dict]] = {"vit": train_vit, "gpt": train_gpt}
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vit": lambda: tiny_vit(10, image_size=VIT_SIZE),
    "gpt": lambda: tiny_gpt(context=CONTEXT),
}


def load(name: str) -> nn.Module:
    """The trained model ``name`` (``"vit"`` or ``"gpt"``) from the cache, in eval mode.

    Raises:
        SystemExit: it has not been trained yet (the message names the make target).
    """
    path = CACHE / f"{name}.pt"
    if not path.is_file():
        raise SystemExit(
            f"{path} is missing: train it first with `make pretrained-transformers` "
            f"(.venv/bin/python benchmarks/pretrain_transformers.py {name}, about 8 minutes)"
        )
    model = BUILDERS[name]()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", choices=sorted(TRAINERS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="train again even if cached")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        path = CACHE / f"{name}.pt"
        if path.exists() and not args.force:
            print(f"{path} exists (--force to train again)")
            continue
        print(f"training {name} ({RECIPES[name]})", flush=True)
        start, cpu = time.perf_counter(), time.process_time()
        result = TRAINERS[name]()
        model = result.pop("model")
        result.update(
            wall_s=round(time.perf_counter() - start, 1),
            cpu_s=round(time.process_time() - cpu, 1),
            threads=args.threads,
            python=sys.version.split()[0],
            torch=torch.__version__,
            recipe=vars(RECIPES[name]),
        )
        torch.save(model.state_dict(), path)
        (CACHE / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)


if __name__ == "__main__":
    main()
