"""SeatTrainer: transformers.Trainer wired for SEAT (see the class docstring).

The SEAT behaviour lives in SeatTrainerMixin, which goes before a transformers.Trainer
subclass in the bases: SeatTrainer = SeatTrainerMixin + transformers.Trainer, and
seat.integrations.trl.SeatSFTTrainer = SeatTrainerMixin + trl.SFTTrainer. The mixin
overrides the Trainer's own hooks (compute_loss, training_step, get_batch_samples,
_clip_grad_norm, log, _save, _load_from_checkpoint, _set_signature_columns_if_needed,
get_eval_dataloader, get_test_dataloader) and
calls super() for the rest, so the trainer after it in the MRO keeps its own behaviour."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import torch
import transformers

from .config import SeatConfig
from .delta import DeltaMismatchError, load_delta
from .loss import kl_row_mask
from .masks import mask_indices
from .patching import handle_of, patch
from .distributed import global_counts, global_sum
from .trainer_collator import DRAW_KEY, DrawTaggingCollator, evaluation_collator, is_stateful
from .trainer_dp import check_data_parallel, check_fsdp, keep_model_unwrapped, wants_fsdp
from .trainer_resume import RUN_FILE, ResumeMismatchError, check_delta, check_resume, run_record

DELTA_DIR = "seat_delta"
COLLATOR_STATE = "seat_collator.json"
# What a resume reads beside seat_run.json (the Trainer's own file names).
# (The RNG state: rng_state.pth from one process, rng_state_<rank>.pth from several.)
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", ("rng_state.pth", "rng_state_0.pth"))
# The keys of a batch that SeatHandle.loss reads (seat.data's batch layout).
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pert_input_ids", "pert_attention_mask", "pert_kl_mask")
NONFINITE_MODES = ("skip", "raise")


class _NonFiniteLoss(Exception):
    """Raised by compute_loss (before any backward) when a training loss is not finite."""

    def __init__(self, value: float):
        super().__init__(value)
        self.value = value


# TrainingArguments -> what SparseAdamW's param group holds (a reused optimizer keeps its own).
_GROUP_HYPERPARAMETERS = (("learning_rate", lambda g: g.get("initial_lr", g["lr"])),
                          ("adam_beta1", lambda g: g["betas"][0]), ("adam_beta2", lambda g: g["betas"][1]),
                          ("adam_epsilon", lambda g: g["eps"]), ("weight_decay", lambda g: g["weight_decay"]))


def _check_reused_optimizer(optimizer, args, trainer: str) -> None:
    """Refuse TrainingArguments whose lr, betas, eps or weight decay differ from those of
    the optimizer the handle already made (by handle.optimizer() or an earlier trainer on
    this model): that optimizer keeps its own, and the LR scheduler starts from its
    group's initial_lr, so the arguments would be silently ignored."""
    group = optimizer.param_groups[0]
    differ = [f"{name}={getattr(args, name)!r} (the optimizer has {float(read(group))!r})"
              for name, read in _GROUP_HYPERPARAMETERS if float(getattr(args, name)) != float(read(group))]
    if differ:
        raise ValueError(f"the model's SEAT optimizer already exists (made by handle.optimizer() or an earlier "
                         f"trainer on this model) and {trainer} trains with it, but the TrainingArguments set "
                         f"{', '.join(differ)}: set them to the optimizer's values to go on with it; to train with "
                         "new values, call handle.unpatch() (it keeps the trained weights) and build the trainer "
                         "again, which patches the model anew")


def _sums() -> dict:
    return {"loss": 0.0, "ce": 0.0, "kl": 0.0, "steps": 0}


class SeatTrainerMixin:
    """The SEAT behaviour of a transformers.Trainer (subclass); put it first in the bases.

      * patches the model (or takes an already patched one) and trains with the handle's
        SparseAdamW (lr, betas, eps and weight decay from TrainingArguments; the Trainer's
        LR scheduler drives it); optimizer_kwargs go to it, e.g. the lean modes
        dict(grad_dtype=torch.bfloat16, update_in_backward=True, state_bits=8) (see
        seat.optim). update_in_backward=True needs gradient_accumulation_steps=1 and
        max_grad_norm=0 (the update is applied during backward: nothing to accumulate
        into, and no global norm before it); other values are refused.
      * the loss is handle.loss(batch): CE normalized by the label tokens of the whole
        accumulated batch (num_items_in_batch) and KL by the x~ positions of the whole
        accumulated batch, so gradient accumulation equals one large batch; clipping is
        by global norm on the compact gradients (max_grad_norm).
      * logs loss, ce and kl as means over the optimizer steps of the logging window
        that trained, and nonfinite_skipped (see below).
      * keeps the columns its collator reads (seat.PairedCollator: question, answer,
        entity) with the default remove_unused_columns=True, as it keeps the model's.
      * a model already patched keeps its handle; a handle whose optimizer exists (made
        by handle.optimizer() or an earlier trainer on the model) is trained with that
        optimizer, and TrainingArguments whose lr, betas, eps or weight decay differ
        from it are refused (handle.unpatch() keeps the trained weights for a new run).
      * evaluation (evaluate, predict, eval_strategy) perturbs its rows with a copy of
        the collator at draw 0 (seat.trainer_collator.evaluation_collator): it never
        moves the names training draws, and its losses compare across evaluations.
      * on several processes (torchrun, accelerate launch): compact-gradient data
        parallelism, no DDP wrapper; CE/KL normalized by the global batch's counts, so the
        trajectory does not depend on the number of ranks (see seat.trainer_dp);
        TrainingArguments(fsdp=True) shards the model with FSDP2 instead
        (seat.distributed.shard), with checkpoints of the whole weights that resume on
        any number of ranks.
      * a refused set-up leaves the model as it was given (a patch made here is reverted).

    Non-finite losses (nonfinite=): the loss of every micro-batch is checked before its
    backward, so no NaN/inf ever reaches a gradient, the optimizer state or a weight
    (nor, with update_in_backward, an update applied during backward).
      "skip" (default: a long unattended run should not die on one bad batch): the whole
        optimizer step of that micro-batch is skipped. Its other micro-batches' gradients
        are dropped (accumulated ones of earlier micro-batches are zeroed, later ones are
        not run), so a step never applies part of its accumulated batch; weights and
        optimizer state stay as they were. The step still counts (global step, LR
        schedule and the collator's draws advance as in a run without the bad batch).
        A RuntimeWarning names the step and the micro-batch; nonfinite_skipped (the
        count so far) is logged with every loss and saved in checkpoints. A logging
        window whose every step was skipped logs loss = nan (never 0.0).
      "raise": RuntimeError naming the step and micro-batch, before its backward: the
        weights and optimizer state are those after the previous step (the step's
        accumulated gradients are zeroed) and nothing is written.

    Checkpoints (checkpoint-N/) hold the sparse delta (seat_delta/, see seat.delta)
    instead of the full model (save_full_model=True writes both), the optimizer state
    (with its masks), the collator's counter of perturbation draws (seat_collator.json)
    and the record of the run (seat_run.json, see seat.trainer_resume). resume_from_checkpoint
    continues bit-exactly from a fresh copy of the base model (with
    dataloader_num_workers=0: worker processes draw on copies of the collator), or
    refuses with ResumeMismatchError, before anything is loaded, naming each missing
    piece or each difference from this run (SeatConfig, masks, optimizer options,
    trajectory-shaping TrainingArguments, collator).
    """

    def __init__(self, model=None, args: transformers.TrainingArguments | None = None, *,
                 seat_config: SeatConfig | None = None, save_full_model: bool = False,
                 optimizer_kwargs: dict | None = None, nonfinite: str = "skip", **kwargs):
        if model is None or args is None:
            raise ValueError(f"{type(self).__name__} needs a model and TrainingArguments")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be 'skip' (skip the optimizer step, warn and count) or 'raise' "
                             f"(stop with an error naming the step); got {nonfinite!r}")
        if "optimizers" in kwargs or "optimizer_cls_and_kwargs" in kwargs:
            raise ValueError(f"{type(self).__name__} makes its own optimizer (seat.optim.SparseAdamW over the masks); "
                             "set lr, betas, eps and weight_decay in TrainingArguments")
        handle = created = handle_of(model)
        if handle is None:
            handle = patch(model, seat_config or SeatConfig())
        had_optimizer = handle._optimizer is not None
        try:
            self._seat_setup(model, args, handle, seat_config, save_full_model, optimizer_kwargs, nonfinite, kwargs)
        except BaseException:
            # leave the model as it was given: unpatched, or patched without an optimizer
            # made here (a trainer built next would have to take this one's options)
            if created is None:
                handle.revert()
            elif not had_optimizer and handle._optimizer is not None:
                handle._optimizer.remove_hooks()
                handle._optimizer = None
            raise

    def _seat_setup(self, model, args, handle, seat_config, save_full_model, optimizer_kwargs, nonfinite,
                    kwargs) -> None:
        if seat_config is not None and seat_config != handle.config:
            raise ValueError("the model is already patched with another SeatConfig")
        self._seat_dp = args.world_size > 1  # several processes (see seat.trainer_dp)
        self._seat_fsdp = wants_fsdp(args)  # sharded with FSDP2 (seat.distributed.shard)
        optimizer_kwargs = dict(optimizer_kwargs or {})
        if self._seat_fsdp:
            check_fsdp(args, handle, optimizer_kwargs, save_full_model, type(self).__name__)
        elif self._seat_dp:
            optimizer_kwargs = check_data_parallel(args, handle, optimizer_kwargs, type(self).__name__)
        collator = kwargs.get("data_collator")
        if collator is not None and hasattr(collator, "data_rank"):
            collator.data_rank = args.process_index if self._seat_dp else 0
        if collator is not None and is_stateful(collator):
            kwargs["data_collator"] = DrawTaggingCollator(collator)
        collator_kl_tokens = getattr(collator, "kl_tokens", None)
        if collator_kl_tokens is not None and collator_kl_tokens != handle.config.kl_tokens:
            raise ValueError(f"data_collator builds KL masks for kl_tokens={collator_kl_tokens!r} but the SeatConfig "
                             f"says kl_tokens={handle.config.kl_tokens!r}; build both with the same value")
        if handle._optimizer is not None and optimizer_kwargs:
            raise ValueError("the handle already made its optimizer: optimizer_kwargs cannot change it; pass them "
                             f"to {type(self).__name__} before calling handle.optimizer(), or drop them")
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
        if handle._optimizer is not None:
            _check_reused_optimizer(handle._optimizer, args, type(self).__name__)
        self.seat = handle
        self.save_full_model = save_full_model
        self.nonfinite = nonfinite
        if self._seat_fsdp:  # the last step of set-up that can be refused is done: shard
            from .distributed import shard

            shard(handle, reduce="sum")
            # the Trainer and accelerate must not apply their own FSDP to the sharded model
            args = dataclasses.replace(args, fsdp="", fsdp_config=None)
        optimizer = handle._optimizer or handle.optimizer(
            lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            weight_decay=args.weight_decay, **optimizer_kwargs)
        # The Trainer zeroes model grads only; the compact ones live in the optimizer.
        optimizer.register_step_post_hook(lambda opt, *_: opt.zero_grad())
        with _trainable_quantized(model, handle):
            super().__init__(model=model, args=args, optimizers=(optimizer, None), **kwargs)
        # We normalize by token counts ourselves: have the Trainer count label tokens over
        # the accumulated micro-batches and not divide the loss again.
        self.model_accepts_loss_kwargs = True
        self._seat_kl_items = None
        self._seat_next_draw = None  # collator step after the last batch trained on
        self._seat_step = None  # the optimizer step in progress: micro-batches, the bad one, sums
        self._seat_window = _sums()  # trained steps since the last log
        self._seat_totals = _sums()  # trained steps of this train() call
        self.nonfinite_skipped = 0  # optimizer steps skipped for a non-finite loss (kept in checkpoints)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self._seat_dp:
            keep_model_unwrapped(self.accelerator)

    def train(self, *args, **kwargs):
        self._seat_totals = _sums()
        return super().train(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps what the model's forward takes; SEAT records are
        # read by the collator (its record_keys) and batches by SeatHandle.loss.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            keep = list(BATCH_KEYS) + list(getattr(self.data_collator, "record_keys", ()))
            self._signature_columns = list(dict.fromkeys(self._signature_columns + keep))

    # ------------------------------------------------------------------ evaluation
    def get_eval_dataloader(self, eval_dataset=None):
        return self._with_collator(evaluation_collator(self.data_collator), super().get_eval_dataloader,
                                   eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._with_collator(evaluation_collator(self.data_collator), super().get_test_dataloader,
                                   test_dataset)

    def _with_collator(self, collator, build, *args):
        """``build(*args)`` (a data loader, which keeps its collate_fn) with ``collator`` as
        self.data_collator meanwhile."""
        training, self.data_collator = self.data_collator, collator
        try:
            return build(*args)
        finally:
            self.data_collator = training

    # ------------------------------------------------------------------ loss
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._seat_dp:  # the global batch's counts (transformers' own may be per rank)
            ce_items, kl_items = global_counts(batch_samples)
            num_items = torch.tensor(ce_items, device=device)
            self._seat_kl_items = kl_items or None
        else:
            self._seat_kl_items = sum(int(kl_row_mask(b).sum()) for b in batch_samples) or None
        self._seat_step = {"size": len(batch_samples), "seen": 0, "bad": None, "skipped": False, **_sums()}
        return batch_samples, num_items

    def _note_draw(self, inputs) -> None:
        draw = inputs.pop(DRAW_KEY, None)
        if draw is not None:
            self._seat_next_draw = int(draw) + 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._note_draw(inputs)
        else:
            inputs.pop(DRAW_KEY, None)
            # evaluation: the batch's own means. The Trainer's count for an eval batch is
            # summed over the ranks (a rank's loss would shrink with their number), and
            # _seat_kl_items is the last training step's KL count, not this batch's.
            num_items_in_batch = None
        kl_items = self._seat_kl_items if num_items_in_batch is not None else None
        out = self.seat.loss(inputs, num_items_in_batch=num_items_in_batch, kl_num_items=kl_items)
        if model.training and self._seat_step is not None:
            values = [out.loss.item(), out.ce.item(), out.kl.item()]
            if self._seat_dp:  # each rank holds its share of the global loss: every rank decides alike
                values = global_sum(values, dtype=torch.float64)
            if not math.isfinite(values[0]):
                raise _NonFiniteLoss(values[0])  # before the Trainer's backward can see it
            step = self._seat_step
            step["loss"] += values[0]
            step["ce"] += values[1]
            step["kl"] += values[2]
        return (out.loss, {"ce": out.ce, "kl": out.kl}) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._seat_step is None or self._seat_step["seen"] >= self._seat_step["size"]:
            # called outside the training loop: a step of one micro-batch
            self._seat_step = {"size": 1, "seen": 0, "bad": None, "skipped": False, **_sums()}
        step = self._seat_step
        index = step["seen"]
        step["seen"] += 1
        loss = None
        if step["bad"] is None:
            last = step["seen"] >= step["size"]  # a step's last micro-batch sends the gradients
            try:
                with contextlib.nullcontext() if last or not self._seat_dp else self.seat._optimizer.no_sync():
                    loss = super().training_step(model, inputs, num_items_in_batch)
            except _NonFiniteLoss as e:
                step["bad"] = (index, e.value)
                self.seat._optimizer.zero_grad()  # the step's earlier micro-batches: never applied
                if self.nonfinite == "raise":
                    self._seat_step = None
                    raise RuntimeError(f"{self._describe_bad(step)}; stopped before its backward (nonfinite='raise'): "
                                       "the weights and optimizer state are those after the previous step. Check "
                                       "that batch's data and the learning rate, or pass nonfinite='skip'") from None
        else:
            self._note_draw(inputs)  # a later micro-batch of a skipped step: not run, its draws used
        if step["seen"] >= step["size"]:
            self._end_step(step)
        return loss if loss is not None else torch.zeros((), device=self.args.device)

    def _describe_bad(self, step) -> str:
        index, value = step["bad"]
        return (f"the loss of micro-batch {index + 1} of {step['size']} of optimizer step "
                f"{self.state.global_step + 1} is {value} (not finite)")

    def _end_step(self, step) -> None:
        if step["bad"] is None:
            for sums in (self._seat_window, self._seat_totals):
                for key in ("loss", "ce", "kl"):
                    sums[key] += step[key]
                sums["steps"] += 1
        else:
            step["skipped"] = True
            self.nonfinite_skipped += 1
            # The loop calls optimizer.step() next; the accelerate-wrapped optimizer steps
            # only while gradients are to be synced, so this step is not applied.
            self.accelerator.gradient_state._set_sync_gradients(False)
            warnings.warn(f"{type(self).__name__}: {self._describe_bad(step)}; skipped the whole optimizer step "
                          f"(nonfinite='skip'; {self.nonfinite_skipped} skipped so far)", RuntimeWarning,
                          stacklevel=2)

    def _clip_grad_norm(self, model):
        if self._seat_step is not None and self._seat_step["skipped"]:
            return float("nan")  # no gradients: the step is skipped
        return self.seat._optimizer.clip_grad_norm_(self.args.max_grad_norm)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            # means over the window's trained steps (each micro-batch's values are sums
            # over its share of the accumulated batch's tokens: a step's sum is its mean)
            window, steps = self._seat_window, self._seat_window["steps"]
            logs["loss"] = window["loss"] / steps if steps else float("nan")
            logs["ce"] = round(window["ce"] / steps, 6) if steps else float("nan")
            if self.seat.config.kl_weight:  # with no KL weight the KL is not computed (NaN)
                logs["kl"] = round(window["kl"] / steps, 8) if steps else float("nan")
            logs["nonfinite_skipped"] = self.nonfinite_skipped
            self._seat_window = _sums()
        if "train_loss" in logs:
            totals = self._seat_totals
            logs["train_loss"] = totals["loss"] / totals["steps"] if totals["steps"] else float("nan")
            logs["nonfinite_skipped"] = self.nonfinite_skipped
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _run_record(self) -> dict:
        collator = getattr(self.data_collator, "inner", self.data_collator)
        return run_record(self.seat, self.seat._optimizer, self.args, collator, self.nonfinite,
                          self.nonfinite_skipped)

    def _stateful_collator(self) -> bool:
        return callable(getattr(self.data_collator, "load_state_dict", None))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self._seat_fsdp:  # every rank: the delta is gathered from the shards
            self._save(output_dir)
            return
        super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._seat_fsdp:
            return super()._save_optimizer_and_scheduler(output_dir)
        # every rank gathers the optimizer state of the whole weights (a collective);
        # rank 0 saves it where the Trainer saves an optimizer's state_dict()
        optimizer = self.seat._optimizer
        whole = optimizer.whole_state_dict()
        optimizer.state_dict = lambda: whole
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del optimizer.state_dict

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.save_full_model:
            super()._save(output_dir, state_dict=state_dict)
        if self._seat_fsdp:  # every rank takes part, rank 0 writes
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
            self.seat.save_delta(Path(output_dir) / DELTA_DIR)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if not self._seat_fsdp:
            self.seat.save_delta(Path(output_dir) / DELTA_DIR)
        if self._stateful_collator():
            state = self.data_collator.state_dict()
            if self._seat_next_draw is not None:
                state["step"] = self._seat_next_draw
            (Path(output_dir) / COLLATOR_STATE).write_text(json.dumps(state))
        (Path(output_dir) / RUN_FILE).write_text(json.dumps(self._run_record(), indent=1))
        if self.processing_class is not None and not self.save_full_model:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Everything is checked before anything is loaded; a failure leaves the
        weights, the optimizer and the collator as they were."""
        checkpoint = Path(resume_from_checkpoint)
        stateful = self._stateful_collator()
        required = [DELTA_DIR, *TRAINER_FILES] + ([COLLATOR_STATE] if stateful else [])
        saved = check_resume(checkpoint, self._run_record(), required)
        check_delta(checkpoint / DELTA_DIR, self.seat)
        collator_state = None
        if stateful:
            collator_state = _read_collator_state(checkpoint / COLLATOR_STATE)
            try:  # on a copy: validates, changes nothing
                copy.copy(self.data_collator.inner).load_state_dict(collator_state)
            except (TypeError, ValueError) as e:
                raise ResumeMismatchError(f"{checkpoint / COLLATOR_STATE}: {e}") from None
        optimizer = self.seat._optimizer
        previous = optimizer.state_dict()
        try:  # SparseAdamW checks the saved masks against its own (the Trainer loads it again later)
            optimizer.load_state_dict(torch.load(checkpoint / TRAINER_FILES[0], map_location="cpu",
                                                 weights_only=True))
        except Exception as e:
            optimizer.load_state_dict(previous)
            raise ResumeMismatchError(f"{checkpoint / TRAINER_FILES[0]} does not fit this run's optimizer: {e}") from e
        if self._seat_fsdp:  # each rank writes its rows of the whole delta; checked first on every rank
            from .distributed._fsdp import load_delta_shards

            try:
                load_delta_shards(self.seat, checkpoint / DELTA_DIR)
            except Exception as e:
                optimizer.load_state_dict(previous)
                if isinstance(e, DeltaMismatchError):
                    raise ResumeMismatchError(f"{checkpoint / DELTA_DIR}: {e}") from e
                raise
            self._finish_load(collator_state, saved)
            return
        targets = list(self.seat.targets.values())
        index = [mask_indices(t.idx).long() for t in targets]
        before = [t.param.detach().view(-1)[i].clone() for t, i in zip(targets, index)]
        try:
            # The delta's base-value check compares with the base model the run started
            # from: put the base values back at the masks, then write the trained ones.
            with torch.no_grad():
                for t, i in zip(targets, index):
                    t.param.data.view(-1)[i] = t.original
            load_delta(self.model, checkpoint / DELTA_DIR)
        except Exception as e:
            with torch.no_grad():
                for t, i, values in zip(targets, index, before):
                    t.param.data.view(-1)[i] = values
            optimizer.load_state_dict(previous)
            if isinstance(e, DeltaMismatchError):
                raise ResumeMismatchError(f"{checkpoint / DELTA_DIR}: {e}") from e
            raise
        self._finish_load(collator_state, saved)

    def _finish_load(self, collator_state, saved: dict) -> None:
        if collator_state is not None:
            self.data_collator.load_state_dict(collator_state)
        self.nonfinite_skipped = saved["nonfinite"]["skipped"]


class SeatTrainer(SeatTrainerMixin, transformers.Trainer):
    __doc__ = "transformers.Trainer for SEAT.\n" + SeatTrainerMixin.__doc__.split("\n", 1)[1]


@contextlib.contextmanager
def _trainable_quantized(model, handle):
    """transformers' Trainer refuses a quantized model without PEFT adapters ("purely
    quantized"); a model seat patched with 4-bit targets trains its QSEAT deltas, which
    play the adapters' part. The flag that check reads is set for the check only."""
    if not handle._quant_targets():
        yield
        return
    key = "_hf_peft_config_loaded"
    had, before = key in model.__dict__, model.__dict__.get(key)
    model.__dict__[key] = True
    try:
        yield
    finally:
        if had:
            model.__dict__[key] = before
        else:
            model.__dict__.pop(key, None)


def _read_collator_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeMismatchError(f"{path} is not readable JSON ({e}); resume from a complete checkpoint") from None
