"""SeatTrainer: transformers.Trainer wired for SEAT.

  * patches the model (or takes an already patched one) and trains with the handle's
    SparseAdamW (lr, betas, eps and weight decay from TrainingArguments; the Trainer's
    LR scheduler drives it);
  * the loss is handle.loss(batch): CE normalized by the label tokens of the whole
    accumulated batch (num_items_in_batch) and KL by the x~ positions of the whole
    accumulated batch, so gradient accumulation equals one large batch;
  * clips by global norm on the compact gradients (max_grad_norm);
  * logs ce and kl beside the loss;
  * checkpoints hold the sparse delta (checkpoint-N/seat_delta, see seat.delta) instead of
    the full model (save_full_model=True writes both), the optimizer state (with its
    masks), and the collator's counter of perturbation draws, so resume_from_checkpoint
    continues bit-exactly from a fresh copy of the base model (with
    dataloader_num_workers=0: worker processes draw on copies of the collator).
  * one process only for now (world_size > 1 is refused).
  * optimizer_kwargs go to the handle's SparseAdamW, e.g. the lean modes
    dict(grad_dtype=torch.bfloat16, update_in_backward=True, state_bits=8) (see
    seat.optim). update_in_backward=True needs gradient_accumulation_steps=1 and
    max_grad_norm=0 (the update is applied during backward: nothing to accumulate into,
    and no global norm before it); other values are refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers

from .config import SeatConfig
from .delta import load_delta
from .loss import kl_row_mask
from .masks import mask_indices
from .patching import handle_of, patch

DELTA_DIR = "seat_delta"
COLLATOR_STATE = "seat_collator.json"
DRAW_KEY = "seat_collator_step"  # batch key: the collator step that built the batch


class _DrawTaggingCollator:
    """Wraps a stateful collator (seat.PairedCollator) so each batch says which of its
    steps built it. The data loader builds batches ahead of their use, so the collator's
    own counter at checkpoint time is ahead of what training consumed; the trainer
    checkpoints the step after the last batch it actually trained on instead."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, records):
        step = self.inner.step
        batch = self.inner(records)
        batch[DRAW_KEY] = torch.tensor(step, dtype=torch.int64)
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


class SeatTrainer(transformers.Trainer):
    def __init__(self, model=None, args: transformers.TrainingArguments | None = None, *,
                 seat_config: SeatConfig | None = None, save_full_model: bool = False,
                 optimizer_kwargs: dict | None = None, **kwargs):
        if model is None or args is None:
            raise ValueError("SeatTrainer needs a model and TrainingArguments")
        if "optimizers" in kwargs or "optimizer_cls_and_kwargs" in kwargs:
            raise ValueError("SeatTrainer makes its own optimizer (seat.optim.SparseAdamW over the masks); "
                             "set lr, betas, eps and weight_decay in TrainingArguments")
        handle = handle_of(model)
        if handle is None:
            handle = patch(model, seat_config or SeatConfig())
        elif seat_config is not None and seat_config != handle.config:
            raise ValueError("the model is already patched with another SeatConfig")
        if args.world_size > 1:
            raise ValueError("SeatTrainer runs on one process for now: the compaction hooks free each gradient "
                             "before a distributed all-reduce could see it, and the KL token count is per rank")
        collator = kwargs.get("data_collator")
        if collator is not None and hasattr(collator, "step") and hasattr(collator, "load_state_dict"):
            kwargs["data_collator"] = _DrawTaggingCollator(collator)
        collator_kl_tokens = getattr(collator, "kl_tokens", None)
        if collator_kl_tokens is not None and collator_kl_tokens != handle.config.kl_tokens:
            raise ValueError(f"data_collator builds KL masks for kl_tokens={collator_kl_tokens!r} but the SeatConfig "
                             f"says kl_tokens={handle.config.kl_tokens!r}; build both with the same value")
        optimizer_kwargs = dict(optimizer_kwargs or {})
        if handle._optimizer is not None and optimizer_kwargs:
            raise ValueError("the handle already made its optimizer: optimizer_kwargs cannot change it; pass them "
                             "to SeatTrainer before calling handle.optimizer(), or drop them")
        in_backward = (handle._optimizer.update_in_backward if handle._optimizer is not None
                       else bool(optimizer_kwargs.get("update_in_backward", False)))
        if in_backward:
            if args.gradient_accumulation_steps > 1:
                raise ValueError(f"update_in_backward=True applies each update during backward and cannot "
                                 f"accumulate gradients: set gradient_accumulation_steps=1 (got "
                                 f"{args.gradient_accumulation_steps}; raise per_device_train_batch_size instead), "
                                 "or drop update_in_backward")
            if args.max_grad_norm:
                raise ValueError(f"update_in_backward=True cannot clip gradients (each parameter is updated before "
                                 f"the global norm is known): set max_grad_norm=0 in TrainingArguments (got "
                                 f"{args.max_grad_norm}), or drop update_in_backward")
        self.seat = handle
        self.save_full_model = save_full_model
        optimizer = handle._optimizer or handle.optimizer(
            lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            weight_decay=args.weight_decay, **optimizer_kwargs)
        # The Trainer zeroes model grads only; the compact ones live in the optimizer.
        optimizer.register_step_post_hook(lambda opt, *_: opt.zero_grad())
        super().__init__(model=model, args=args, optimizers=(optimizer, None), **kwargs)
        # We normalize by token counts ourselves: have the Trainer count label tokens over
        # the accumulated micro-batches and not divide the loss again.
        self.model_accepts_loss_kwargs = True
        self._seat_kl_items = None
        self._seat_sums = {"ce": 0.0, "kl": 0.0, "n": 0}
        self._seat_next_draw = None  # collator step after the last batch trained on

    # ------------------------------------------------------------------ loss
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._seat_kl_items = sum(int(kl_row_mask(b).sum()) for b in batch_samples) or None
        return batch_samples, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        draw = inputs.pop(DRAW_KEY, None)
        if draw is not None and model.training:
            self._seat_next_draw = int(draw) + 1
        kl_items = self._seat_kl_items if num_items_in_batch is not None else None
        out = self.seat.loss(inputs, num_items_in_batch=num_items_in_batch, kl_num_items=kl_items)
        if model.training:
            self._seat_sums["ce"] += out.ce.item()
            self._seat_sums["kl"] += out.kl.item()
            self._seat_sums["n"] += 1
        return (out.loss, {"ce": out.ce, "kl": out.kl}) if return_outputs else out.loss

    def _clip_grad_norm(self, model):
        return self.seat._optimizer.clip_grad_norm_(self.args.max_grad_norm)

    def log(self, logs: dict, *args, **kwargs) -> None:
        sums = self._seat_sums
        if "loss" in logs and sums["n"]:
            # per micro-batch values are sums over its share of the accumulated batch's
            # tokens: their sum per optimizer step is the step's mean
            steps = max(1, sums["n"] / max(1, self.args.gradient_accumulation_steps))
            logs["ce"] = round(sums["ce"] / steps, 6)
            if self.seat.config.kl_weight:  # with no KL weight the KL is not computed (NaN)
                logs["kl"] = round(sums["kl"] / steps, 8)
            self._seat_sums = {"ce": 0.0, "kl": 0.0, "n": 0}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.save_full_model:
            super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.seat.save_delta(Path(output_dir) / DELTA_DIR)
        collator_state = getattr(self.data_collator, "state_dict", None)
        if callable(collator_state):
            state = collator_state()
            if self._seat_next_draw is not None:
                state["step"] = self._seat_next_draw
            (Path(output_dir) / COLLATOR_STATE).write_text(json.dumps(state))
        if self.processing_class is not None and not self.save_full_model:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        checkpoint = Path(resume_from_checkpoint)
        if (checkpoint / DELTA_DIR).is_dir():
            # The model in memory is the base model the run started from: the delta's
            # base-value check holds, and its trained values are written bit-exactly.
            with torch.no_grad():
                for t in self.seat.targets.values():
                    t.param.data.view(-1)[mask_indices(t.idx).long()] = t.original
            load_delta(self.model, checkpoint / DELTA_DIR)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        state_file = checkpoint / COLLATOR_STATE
        if state_file.is_file() and hasattr(self.data_collator, "load_state_dict"):
            self.data_collator.load_state_dict(json.loads(state_file.read_text()))
