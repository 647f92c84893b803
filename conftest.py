"""Doctest set-up for the docstring examples in normswap/ (run by `make test`).

Every example may use ``torch``, ``nn`` (``torch.nn``), ``F`` (``torch.nn.functional``) and
``normswap`` without importing them, as the README's snippets do, and starts from the same
random seed, so an example's output does not depend on what ran before it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _pytest.doctest import DoctestItem
from torch import nn

import normswap


@pytest.fixture(autouse=True, scope="session")
def _doctest_names(doctest_namespace: dict) -> None:
    doctest_namespace.update(torch=torch, nn=nn, F=F, normswap=normswap)


@pytest.fixture(autouse=True)
def _doctest_seed(request: pytest.FixtureRequest) -> None:
    if isinstance(request.node, DoctestItem):
        torch.manual_seed(0)
