"""What a SeatTrainer checkpoint records about its run, and the check that a resume
continues that same run.

checkpoint-N/seat_run.json (written with the delta) holds

  format, format_version
  seat_config     the SeatConfig (SeatConfig.to_dict())
  masks           per trained weight: its mask's spec (a mask defined by a few numbers,
                  e.g. implicit) or the sha256 of its int32 indices
  optimizer       the SparseAdamW options that shape the trajectory
  training_args   the TrainingArguments that shape the trajectory (lr, betas, schedule,
                  batch size, accumulation, clipping, length of the run, seeds)
  collator        what builds the batches: its config() (seat.PairedCollator) or its
                  class, and whether it keeps a draw counter
  nonfinite       {"mode": "skip" | "raise", "skipped": optimizer steps skipped so far}

A resume reproduces the uninterrupted run bit-exactly only when every one of these is
the same and every piece of the checkpoint is there; `check_resume` raises
ResumeMismatchError naming what differs or what is missing, before anything is loaded.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

FORMAT = "seat-trainer-run"
FORMAT_VERSION = 1
RUN_FILE = "seat_run.json"

# TrainingArguments that change which batches are drawn, in which order, and what each
# optimizer step does with them.
TRAJECTORY_ARGS = (
    "learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm",
    "gradient_accumulation_steps", "lr_scheduler_type", "lr_scheduler_kwargs",
    "warmup_steps", "warmup_ratio", "max_steps", "num_train_epochs", "seed", "data_seed", "dataloader_drop_last",
    "group_by_length", "ignore_data_skip",
)
# The rows of one micro-batch over all ranks (per_device_train_batch_size * world_size) stands
# for the per-rank size: a checkpoint resumes on another number of ranks with the same global batch.
GLOBAL_BATCH = "global_train_batch_size"
# SparseAdamW attributes (beside its param group hyperparameters) that change its updates.
OPTIMIZER_OPTIONS = ("seed", "compact_grads", "dense_state", "grad_dtype", "update_in_backward", "state_bits")
GROUP_OPTIONS = ("amsgrad", "maximize", "master_weights", "stochastic_rounding")


class ResumeMismatchError(ValueError):
    """The checkpoint cannot continue this run bit-exactly (a piece is missing or differs)."""


def _jsonable(value):
    """value as JSON would give it back (tuples as lists, dtypes and enums as strings)."""
    return json.loads(json.dumps(value, default=str))


def mask_fingerprints(handle) -> dict[str, object]:
    """Per trained weight of a SeatHandle: its mask's spec, or the sha256 of its indices."""
    from .masks import as_mask

    out = {}
    for name, t in handle.targets.items():
        if getattr(t, "shard", None) is not None:  # FSDP2: the whole mask's, taken when it was cut
            out[name] = t.shard.fingerprint
            continue
        if hasattr(t, "weight_mask"):  # a 4-bit target: its mask over the weight, not the delta's (seat.quant)
            mask = as_mask(t.weight_mask, t.weight_numel, name)
        else:
            mask = as_mask(t.idx, t.param.numel(), name)
        out[name] = mask_fingerprint(mask)
    return _jsonable(out)


def mask_fingerprint(mask) -> dict:
    """A mask's spec, or the number and sha256 of its indices."""
    spec = mask.spec()
    if spec is None:
        idx = mask.indices().to(torch.int32).cpu().contiguous()
        spec = {"nnz": mask.nnz, "indices_sha256": hashlib.sha256(idx.numpy().tobytes()).hexdigest()}
    return spec


def collator_description(collator) -> dict:
    """What builds the batches: PairedCollator.config() (or any collator's config()), else
    its class; and whether it keeps a draw counter that the checkpoint must carry."""
    config = getattr(collator, "config", None)
    described = dict(config()) if callable(config) else {"class": type(collator).__name__}
    described["stateful"] = callable(getattr(collator, "load_state_dict", None))
    return _jsonable(described)


def run_record(handle, optimizer, args, collator, nonfinite: str, skipped: int) -> dict:
    """The seat_run.json contents of the run as it is now (module docstring)."""
    group = optimizer.param_groups[0]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seat_config": _jsonable(handle.config.to_dict()),
        "masks": mask_fingerprints(handle),
        "optimizer": _jsonable({**{k: getattr(optimizer, k) for k in OPTIMIZER_OPTIONS},
                                **{k: group.get(k) for k in GROUP_OPTIONS}}),
        "training_args": _jsonable({**{k: getattr(args, k, None) for k in TRAJECTORY_ARGS},
                                    GLOBAL_BATCH: args.per_device_train_batch_size * max(1, args.world_size)}),
        "collator": collator_description(collator),
        "nonfinite": {"mode": nonfinite, "skipped": int(skipped)},
    }


def _differences(saved, current, path: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in list(saved) + [k for k in current if k not in saved]:
            out += _differences(saved.get(key, "<absent>"), current.get(key, "<absent>"), f"{path}.{key}")
        return out
    return [] if saved == current else [f"{path}: checkpoint {saved!r:.80}, this run {current!r:.80}"]


_FIXES = {
    "seat_config": "build the SeatTrainer with the checkpoint's SeatConfig (seat_run.json 'seat_config')",
    "masks": "patch the model with the masks the checkpoint was trained with (same SeatConfig seed, density, "
             "mask and targets, or the same masks=)",
    "optimizer": "pass the checkpoint's optimizer_kwargs to SeatTrainer",
    "training_args": "use the checkpoint's TrainingArguments; to go on training from its weights as a new run, "
                     "load its seat_delta (seat.load_delta) into the base model and start a new run",
    "collator": "build the data collator (tokenizer, perturber, prompt format, kl_tokens) as the checkpoint's run did",
}


def check_resume(checkpoint: Path, current: dict, required: list[str]) -> dict:
    """The checkpoint's seat_run.json, after checking that every path in `required`
    exists and that the run it records is `current`; ResumeMismatchError otherwise."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ResumeMismatchError(f"resume_from_checkpoint={str(checkpoint)!r} is not a directory; pass a "
                                  "checkpoint-N directory written by SeatTrainer")
    # an entry of `required` may be a tuple of alternatives (the RNG state: one file per rank)
    missing = [name if isinstance(name, str) else name[0] for name in [RUN_FILE] + list(required)
               if not any((checkpoint / n).exists() for n in ((name,) if isinstance(name, str) else name))]
    if missing:
        raise ResumeMismatchError(
            f"{checkpoint} cannot resume this run bit-exactly: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (a SeatTrainer checkpoint holds {RUN_FILE}, the delta, "
            "the optimizer and scheduler state, the RNG state, the trainer state and, with a stateful collator, its "
            "draw counter); resume from a complete checkpoint")
    try:
        saved = json.loads((checkpoint / RUN_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeMismatchError(f"{checkpoint / RUN_FILE} is not readable JSON ({e}); resume from a complete "
                                  "checkpoint") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("format_version") != FORMAT_VERSION:
        raise ResumeMismatchError(f"{checkpoint / RUN_FILE} is not a {FORMAT} v{FORMAT_VERSION} record")
    args = saved.get("training_args")
    if isinstance(args, dict) and "per_device_train_batch_size" in args and GLOBAL_BATCH not in args:
        # a record from before multi-process training: one process, so the global batch is the per-device one
        args[GLOBAL_BATCH] = args.pop("per_device_train_batch_size")
    problems = []
    for section, fix in _FIXES.items():
        diffs = _differences(saved.get(section, "<absent>"), current[section], section)
        if diffs:
            shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            problems.append(f"{shown} (fix: {fix})")
    if problems:
        raise ResumeMismatchError(f"{checkpoint} was written by another run, so resuming it would not continue "
                                  "that run: " + " | ".join(problems))
    skipped = saved.get("nonfinite", {}).get("skipped") if isinstance(saved.get("nonfinite"), dict) else None
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ResumeMismatchError(f"{checkpoint / RUN_FILE}: nonfinite.skipped must be an int >= 0; got {skipped!r}")
    return saved


def check_delta(directory: Path, handle) -> None:
    """The delta in a checkpoint was trained with the handle's config and masks
    (ResumeMismatchError otherwise); its values are checked when load_delta writes them.
    Reads the delta's metadata and its index tensors only, one at a time."""
    from safetensors import SafetensorError, safe_open

    from .delta import CONFIG_FILE, WEIGHTS_FILE

    directory = Path(directory)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as tensors:
            stored = {}
            for name, info in meta["weights"].items():
                if "mask" in info:
                    stored[name] = info["mask"]
                elif f"idx/{name}" in tensors.keys():
                    idx = tensors.get_tensor(f"idx/{name}").to(torch.int32).contiguous()
                    stored[name] = {"nnz": idx.numel(),
                                    "indices_sha256": hashlib.sha256(idx.numpy().tobytes()).hexdigest()}
                else:
                    stored[name] = "<no mask>"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise ResumeMismatchError(f"{directory} is not a readable seat delta ({type(e).__name__}: {e}); resume "
                                  "from a complete checkpoint") from None
    diffs = _differences(meta.get("config"), _jsonable(handle.config.to_dict()), "seat_config")
    mine = mask_fingerprints(handle)
    diffs += [f"the mask of {name}" for name in stored if _jsonable(stored[name]) != mine.get(name)]
    diffs += [f"{name} is not in the delta" for name in mine if name not in stored]
    if diffs:
        raise ResumeMismatchError(f"{directory} was not trained with this run's SeatConfig and masks: "
                                  f"{'; '.join(diffs[:4])}{f'; and {len(diffs) - 4} more' if len(diffs) > 4 else ''}"
                                  f" (fix: {_FIXES['masks']})")
