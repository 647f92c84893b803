"""How data becomes model inputs: one convention for every part of normswap.

Tracing (``example_inputs``), calibration, distillation, fidelity, ``convert_pretrained`` and the
``NormSwap`` callback all follow the same three rules:

* **Model inputs** are called by their type: a ``tuple`` (not a namedtuple) is the positional
  arguments, ``model(*inputs)``; a mapping is the keyword arguments, ``model(**inputs)``;
  anything else (a tensor, a list, a namedtuple) is the single argument, ``model(inputs)``.
  To pass a tuple or a dict as the single argument, wrap it: ``(my_dict,)``.
* **A batch** (what a ``DataLoader`` yields) becomes model inputs through ``batch_to_input``;
  the default, :func:`default_batch_to_input`, takes the first element of a tuple/list batch
  (``(x, y) -> x``) and keeps anything else as it is.
* **Data** is one tensor of samples (split into batches along dim 0) or any iterable of
  batches (a list, a ``DataLoader``, a generator). Iterables are streamed lazily: one batch is
  read, converted and moved to the device at a time.

Example:
    >>> batches = list(iter_inputs([(torch.zeros(2, 3), torch.tensor([0, 1]))]))
    >>> batches[0].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normswap.errors import CalibrationError

__all__ = [
    "BatchToInput",
    "call_model",
    "check_samples",
    "count_samples",
    "default_batch_to_input",
    "describe",
    "first_inputs",
    "iter_inputs",
    "model_device",
    "move",
    "split_inputs",
    "tensors",
]

#: Maps one batch of data to the model's inputs.
BatchToInput = Callable[[Any], Any]


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Model inputs as ``(args, kwargs)`` by the convention above.

    Raises:
        CalibrationError: a mapping with keys that are not strings (it cannot be keyword
            arguments); the message says how to pass it as one argument.

    Example:
        >>> split_inputs((1, 2)), split_inputs({"x": 1}), split_inputs([1, 2])
        (((1, 2), {}), ((), {'x': 1}), (([1, 2],), {}))
    """
    if isinstance(inputs, tuple) and not hasattr(inputs, "_fields"):
        return inputs, {}
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise CalibrationError(
                f"model inputs that are a mapping are passed as keyword arguments, but this one "
                f"has non-string keys {bad!r}; wrap it in a tuple to pass it as one positional "
                f"argument: (inputs,)"
            )
        return (), dict(inputs)
    return (inputs,), {}


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs`` by the convention above.

    Example:
        >>> call_model(nn.Identity(), torch.ones(1)).item()
        1.0
    """
    args, kwargs = split_inputs(inputs)
    return model(*args, **kwargs)


def default_batch_to_input(batch: Any) -> Any:
    """The model input of a batch: the first element of a tuple/list, else the batch itself.

    Example:
        >>> default_batch_to_input((torch.zeros(2, 3), torch.tensor([0, 1]))).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        if not batch:
            raise CalibrationError("an empty tuple/list batch holds no model input")
        return batch[0]
    return batch


def tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nested structure of sequences, mappings and dataclasses.

    Example:
        >>> len(list(tensors({"a": [torch.zeros(1), (torch.ones(1),)], "b": 3})))
        2
    """
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from tensors(v)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from tensors(getattr(obj, f.name))


def move(inputs: Any, device: torch.device | None) -> Any:
    """``inputs`` with every tensor moved to ``device`` (containers rebuilt, others kept).

    Example:
        >>> move((torch.zeros(1), {"k": torch.ones(1)}), torch.device("cpu"))[1]["k"].device
        device(type='cpu')
    """
    if device is None:
        return inputs
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):
        return type(inputs)(*(move(v, device) for v in inputs))
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move(v, device) for v in inputs)
    if isinstance(inputs, Mapping):
        return {k: move(v, device) for k, v in inputs.items()}
    return inputs


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer), ``None`` when it has none.

    Example:
        >>> model_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def count_samples(inputs: Any) -> int:
    """The number of samples in model inputs: dim 0 of their first tensor with a dim (0 if none).

    Example:
        >>> count_samples((torch.zeros(5, 3), torch.zeros(5)))
        5
    """
    for t in tensors(inputs):
        if t.dim():
            return int(t.shape[0])
    return 0


def describe(inputs: Any) -> str:
    """A short description of model inputs, for error messages.

    Example:
        >>> describe((torch.zeros(2, 3), {"m": torch.zeros(1)}))
        'a tuple of (a tensor of shape (2, 3), a dict with keys m)'
    """
    if isinstance(inputs, Tensor):
        return f"a tensor of shape {tuple(inputs.shape)}"
    if isinstance(inputs, tuple):
        return "a tuple of (" + ", ".join(describe(i) for i in inputs) + ")"
    if isinstance(inputs, Mapping):
        return "a dict with keys " + ", ".join(map(str, inputs))
    return f"a {type(inputs).__name__}"


def _check_data(data: Any, what: str) -> None:
    if isinstance(data, Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise CalibrationError(
                f"the {what} is a tensor of shape {tuple(data.shape)}, which holds no samples: "
                "pass at least one sample, as an (N, ...) tensor with N >= 1"
            )
        return
    if isinstance(data, (Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise CalibrationError(
            f"the {what} must be a tensor of samples or an iterable of batches (a list, a "
            f"DataLoader) of tensors, (x, y) pairs or dicts of keyword arguments, got "
            f"{type(data).__name__}"
            + (
                " (to pass one dict batch, wrap it in a list: [batch])"
                if isinstance(data, Mapping)
                else ""
            )
        )


def iter_inputs(
    data: Any,
    *,
    batch_size: int | None = None,
    batch_to_input: BatchToInput = default_batch_to_input,
    device: torch.device | None = None,
    max_batches: int | None = None,
    what: str = "data",
) -> Iterator[Any]:
    """Stream the model inputs of ``data``, one batch at a time, moved to ``device``.

    Args:
        data: one tensor of samples, or an iterable of batches.
        batch_size: samples per batch when ``data`` is a tensor (``None``: all of it at once).
        batch_to_input: maps each batch of an iterable to model inputs.
        device: move each batch's tensors there (``None``: leave them).
        max_batches: stop after this many batches.
        what: the name of ``data`` in error messages.

    Raises:
        CalibrationError: ``data`` is not a tensor or an iterable (a dict is refused: wrap one
            batch in a list), or an argument is invalid.

    Example:
        >>> [b.shape[0] for b in iter_inputs(torch.zeros(5, 2), batch_size=2)]
        [2, 2, 1]
    """
    _check_data(data, what)
    for name, value in (("batch_size", batch_size), ("max_batches", max_batches)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise CalibrationError(f"{name} must be a positive int or None, got {value!r}")
    if not callable(batch_to_input):
        raise CalibrationError(
            f"batch_to_input must be callable (batch -> inputs), got {batch_to_input!r}"
        )
    if isinstance(data, Tensor):
        chunks: Iterable[Any] = data.split(batch_size) if batch_size else (data,)
        convert: BatchToInput = _identity
    else:
        chunks, convert = data, batch_to_input
    for count, batch in enumerate(chunks, start=1):
        yield move(convert(batch), device)
        if max_batches is not None and count >= max_batches:
            return


def _identity(batch: Any) -> Any:
    return batch


def check_samples(inputs: Any, what: str = "data") -> Any:
    """Return model inputs ``inputs`` after checking that they hold at least one sample.

    Raises:
        CalibrationError: ``None`` (no batch at all), or tensors with an empty first dim.

    Example:
        >>> check_samples(torch.zeros(0, 3), "data")
        Traceback (most recent call last):
        ...
        normswap.errors.CalibrationError: the first batch of the data holds no samples (a ...
    """
    if inputs is None:
        raise CalibrationError(
            f"the {what} is empty (no batches): pass at least one batch of inputs"
        )
    batched = [t for t in tensors(inputs) if t.dim()]
    if batched and batched[0].shape[0] == 0:
        raise CalibrationError(
            f"the first batch of the {what} holds no samples ({describe(inputs)}): pass "
            "batches with at least one sample"
        )
    return inputs


def first_inputs(
    data: Any,
    *,
    batch_size: int | None = None,
    batch_to_input: BatchToInput = default_batch_to_input,
    device: torch.device | None = None,
    what: str = "data",
) -> Any:
    """The first batch of model inputs of ``data``, checked to hold at least one sample.

    Reads one batch only. A one-shot iterator (a generator) loses that batch: pass a list or a
    ``DataLoader`` where the data is read again afterwards.

    Raises:
        CalibrationError: no batch at all, or a first batch without samples.

    Example:
        >>> first_inputs([(torch.zeros(2, 3), torch.zeros(2))]).shape
        torch.Size([2, 3])
    """
    stream = iter_inputs(
        data, batch_size=batch_size, batch_to_input=batch_to_input, device=device, what=what
    )
    return check_samples(next(stream, None), what)
