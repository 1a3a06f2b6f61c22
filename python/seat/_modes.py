"""Module train/eval flags, switched for a block and put back one module at a time."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module of `model` in eval mode inside the block; on exit (even by an
    exception) each module gets its own flag back. model.train(was_training) would not:
    it sets one flag on all of them, losing a submodule the user had put in eval mode."""
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in training.items():
            module.training = flag
