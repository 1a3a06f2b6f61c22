"""The collator side of SeatTrainer: which draws of a stateful collator (seat.PairedCollator,
whose counter picks each record's fictitious name) training consumed, and the collator
evaluation uses so that it consumes none of them."""
from __future__ import annotations

import copy

import torch

from .data import PairedCollator

DRAW_KEY = "seat_collator_step"  # batch key: the collator step that built the batch


class DrawTaggingCollator:
    """Wraps a stateful collator (seat.PairedCollator) so each batch says which of its
    steps built it (int64 scalar under DRAW_KEY). The data loader builds batches ahead of
    their use, so the collator's own counter at checkpoint time is ahead of what training
    consumed; the trainer checkpoints the step after the last batch it trained on instead."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, records):
        step = self.inner.step
        batch = self.inner(records)
        batch[DRAW_KEY] = torch.tensor(step, dtype=torch.int64)
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def is_stateful(collator) -> bool:
    return hasattr(collator, "step") and callable(getattr(collator, "load_state_dict", None))


def evaluation_collator(collator):
    """The collator evaluation batches come from: for a training collator that keeps a
    draw counter, a copy of it, so evaluating never moves the names training draws next
    (a resume then continues bit-exactly whenever evaluation ran). A PairedCollator's copy
    starts at draw 0, so every evaluation perturbs each row with the same name and its
    losses compare across steps; another stateful collator is deep-copied as it is."""
    inner = collator.inner if isinstance(collator, DrawTaggingCollator) else collator
    if not is_stateful(inner):
        return collator
    if isinstance(inner, PairedCollator):  # its state is the counter alone (rebound, never mutated)
        evaluation = copy.copy(inner)
        evaluation.load_state_dict({"step": 0})
        return evaluation
    return copy.deepcopy(inner)
