"""Small transformers that train on a CPU in minutes: a ViT and a GPT, both LayerNorm models.

They are the "pretrained" models of the transformer conversion benchmark
(``benchmarks/transformers_fidelity.py``; ``make pretrained-transformers`` trains them) and the
model of the ``vit_norms`` recipe (``model.source=normswap model.name=tiny_vit``). Both are the
real classes users bring: torchvision's :class:`~torchvision.models.VisionTransformer` and
Hugging Face's ``GPT2LMHeadModel`` (whose projections are ``Conv1D`` layers), built small.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torchvision
from torch import nn

from normswap.errors import ModelError
from normswap.registry import Registry

__all__ = ["SMALL_CLASSIFIERS", "SMALL_MODELS", "tiny_gpt", "tiny_vit"]


def tiny_vit(
    num_classes: int = 10,
    *,
    image_size: int = 28,
    patch_size: int = 4,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 96,
    mlp_dim: int = 192,
) -> nn.Module:
    """A torchvision Vision Transformer small enough to train on Fashion-MNIST on a CPU.

    Pre-norm blocks with a LayerNorm before attention, before the MLP and at the end, as in
    ``vit_b_16``; a 28 px image is 7 x 7 patches of 4 px (49 tokens and the class token).

    Args:
        num_classes: size of the classification head.
        image_size: the side of the (square) input images; a multiple of ``patch_size``.
        patch_size: the side of a patch.
        num_layers: encoder blocks.
        num_heads: attention heads per block.
        hidden_dim: token width.
        mlp_dim: hidden width of each block's MLP.

    Raises:
        ModelError: ``image_size`` is not a multiple of ``patch_size``.

    Example:
        >>> import torch
        >>> tiny_vit()(torch.zeros(2, 3, 28, 28)).shape
        torch.Size([2, 10])
    """
    if image_size % patch_size:
        raise ModelError(
            f"tiny_vit: image_size={image_size} is not a multiple of patch_size={patch_size}; "
            f"use an input size such as {image_size - image_size % patch_size}"
        )
    return torchvision.models.VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
    )


def tiny_gpt(
    vocab_size: int = 256,
    *,
    context: int = 128,
    width: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
) -> nn.Module:
    """A Hugging Face ``GPT2LMHeadModel`` built from a config (nothing is downloaded).

    The default vocabulary is bytes (256 tokens), so any text is its own tokenization. GPT-2's
    layout: a LayerNorm before attention and before the MLP of each block, one at the end, and
    an output head tied to the token embedding; dropout is off.

    Args:
        vocab_size: tokens of the vocabulary.
        context: the longest sequence (positions).
        width: token width.
        num_layers: transformer blocks.
        num_heads: attention heads per block.

    Raises:
        ModelError: the ``transformers`` package is missing (``pip install transformers``).

    Example:
        >>> import torch
        >>> tiny_gpt()(torch.zeros(2, 16, dtype=torch.long)).logits.shape
        torch.Size([2, 16, 256])
    """
    if importlib.util.find_spec("transformers") is None:
        raise ModelError("tiny_gpt needs the package 'transformers': pip install transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        n_embd=width,
        n_layer=num_layers,
        n_head=num_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


#: The small models by name (the ``normswap`` model source): name -> builder.
SMALL_MODELS: Registry[str, Callable[..., nn.Module]] = Registry("small model")
SMALL_MODELS.register("tiny_vit", tiny_vit)
SMALL_MODELS.register("tiny_gpt", tiny_gpt)

#: The image classifiers among them (``model.name`` choices of the app).
SMALL_CLASSIFIERS = ("tiny_vit",)
