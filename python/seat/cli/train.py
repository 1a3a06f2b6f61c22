"""`seat train`: fine-tune a causal LM on a facts file with SEAT (seat.SeatTrainer).

Every argument is checked before the model is loaded (the facts, the options and their
combinations, the output folder and a resume's match with its checkpoint, the tokenizer
and the prompt lengths); a bad one ends the command with a message naming it (exit code 2).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import re
import time
from pathlib import Path

from . import _rundir
from ._options import UsageError, add_train_arguments, resolve, seat_config_fields

DESCRIPTION = ("Fine-tune a causal LM on a facts file with SEAT (sparse updates + entity-perturbation KL). "
               "Writes OUTPUT_DIR/delta (load it with seat.load_delta, or `seat merge` it into the model), "
               "OUTPUT_DIR/checkpoint-N (resumable) and OUTPUT_DIR/seat_report.json.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="fine-tune a model on a facts file with SEAT",
                                   description=DESCRIPTION,
                                   epilog="Options may also come from --config FILE (YAML or JSON; the keys are "
                                          "the flag names with underscores); flags given here override it.")
    add_train_arguments(parser)
    parser.set_defaults(command_main=main)
    return parser


def _seat_config(values: dict):
    from ..config import SeatConfig

    fields = seat_config_fields(values)
    try:
        return SeatConfig(**fields)
    except (TypeError, ValueError) as e:
        message = str(e)
        # SeatConfig's messages start with the field's name (the longest one that fits: mask_encoding, not mask)
        name = next((k for k in sorted(fields, key=len, reverse=True) if message.startswith(k)), None)
        flag = "--" + name.replace("_", "-") if name else "--density / --mask / --targets"
        raise UsageError(f"argument {flag}: {message}") from None


def _check_model_folder(model: str):
    """The model's config (a causal LM) and, for a local folder, that weights are there."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if os.path.isdir(model):
        names = os.listdir(model)
        if "config.json" not in names:
            raise UsageError(f"argument --model: {model!r} has no config.json; give a folder written by "
                             "save_pretrained (or a hub id in the local cache)")
        if not any(n.endswith((".safetensors", ".bin")) or n.endswith(".safetensors.index.json") for n in names):
            raise UsageError(f"argument --model: {model!r} holds no weights (*.safetensors / *.bin); give a folder "
                             "written by save_pretrained")
    try:
        config = transformers.AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UsageError(f"argument --model: {model!r} cannot be loaded ({e}); give a folder written by "
                         "save_pretrained, or a hub id already in the local Hugging Face cache") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"argument --model: {model!r} is a {config.model_type!r} model, which "
                         "AutoModelForCausalLM does not load; give a causal LM")
    return config


def _tokenizer(model: str):
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"argument --model: no tokenizer loads from {model!r} ({e}); save the tokenizer beside "
                         "the model (tokenizer.save_pretrained)") from None
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise UsageError(f"argument --model: the tokenizer of {model!r} has neither a pad nor an eos token; "
                             "set tokenizer.pad_token and save it")
        tok.pad_token = tok.eos_token  # padding is masked out of every loss: any token will do
        print(f"seat train: the tokenizer has no pad token; padding with its eos token {tok.eos_token!r}")
    return tok


def _collator(values: dict, tok, records: list[dict]):
    from ..data import DEFAULT_PROMPT_FORMAT, PairedCollator, check_prompt_format
    from ..perturb import EntityPerturber

    if values["prompt_format"] is None:
        values["prompt_format"] = DEFAULT_PROMPT_FORMAT
    try:
        check_prompt_format(values["prompt_format"], "--prompt-format")
    except (TypeError, ValueError) as e:
        raise UsageError(f"argument --prompt-format: {e}") from None
    try:
        perturber = EntityPerturber(exclude=sorted({r["entity"] for r in records}), seed=values["seed"])
        collator = PairedCollator(tok, perturber, max_length=values["max_length"], kl_tokens=values["kl_tokens"],
                                  prompt_format=values["prompt_format"], use_chat_template=values["chat_template"])
    except (TypeError, ValueError) as e:
        if "chat_template" in str(e) and values["chat_template"]:  # the collator's message names its keywords
            raise UsageError(f"argument --chat-template: the tokenizer of --model {values['model']!r} has no chat "
                             "template; pass --no-chat-template to use --prompt-format, or save the tokenizer "
                             "with a chat_template") from None
        raise UsageError(f"argument --model: {e}") from None
    for i, r in enumerate(records):
        if not isinstance(r["question"], str) and not collator.use_chat_template:
            raise UsageError(f"argument --data: record {i + 1} (entity {r['entity']!r}) has its question as chat "
                             "messages, which only a chat template renders, and "
                             + ("--no-chat-template is given" if values["chat_template"] is False else
                                f"the tokenizer of --model {values['model']!r} has none")
                             + "; write the question as text, or train a model whose tokenizer has a chat template")
        if values["max_length"] is not None:
            n = len(collator.encode_record(r)[0])
            if n > values["max_length"]:
                raise UsageError(f"argument --max-length: record {i + 1} (entity {r['entity']!r}) is {n} tokens "
                                 f"long, more than --max-length {values['max_length']}; raise --max-length or "
                                 "shorten the record (nothing is truncated)")
    if values["max_length"] is not None:
        _check_perturbed_lengths(values, tok, perturber, records)
    return collator


def _check_perturbed_lengths(values: dict, tok, perturber, records: list[dict]) -> None:
    """The perturbed copy x~ of each record fits --max-length too, with the fictitious
    names that take the most tokens (x~ of a short entity can be longer than x; the
    collator would otherwise refuse it at the first batch that draws a long name, mid-run)."""
    from ..data import PairedCollator
    from ..perturb import EntityPerturber, NameGenerator

    def longest(names):  # a few, so a name that clashes with a record's other names can be redrawn
        return sorted(names, key=lambda n: len(tok(" " + n, add_special_tokens=False)["input_ids"]))[-3:]

    generator = perturber.generator  # the default generator: the built-in names, less the entities' own
    worst = EntityPerturber(exclude=sorted({r["entity"] for r in records}), seed=values["seed"],
                            names=NameGenerator(values["seed"], longest(generator.first_names),
                                                longest(generator.last_names)))
    probe = PairedCollator(tok, worst, max_length=values["max_length"], kl_tokens=values["kl_tokens"],
                           prompt_format=values["prompt_format"], use_chat_template=values["chat_template"])
    for i, r in enumerate(records):
        try:
            probe([r])
        except ValueError as e:
            found = re.search(r"is (\d+) tokens", str(e))
            length = f"up to {found.group(1)} tokens long" if found else f"too long ({e})"
            raise UsageError(f"argument --max-length: record {i + 1} (entity {r['entity']!r}): its perturbed copy "
                             f"x~ is {length} with a long fictitious name, more than --max-length "
                             f"{values['max_length']}; raise --max-length (nothing is truncated)") from None


def _training_args(values: dict, use_cpu: bool):
    import dataclasses

    import transformers

    # transformers 5 renamed gradient_checkpointing (the old name warns); older ones lack the new
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    try:
        return transformers.TrainingArguments(
            output_dir=values["output_dir"], per_device_train_batch_size=values["batch_size"],
            gradient_accumulation_steps=values["grad_accum"], learning_rate=values["lr"],
            num_train_epochs=values["epochs"], max_steps=values["max_steps"] or -1,
            max_grad_norm=values["max_grad_norm"], weight_decay=values["weight_decay"],
            warmup_steps=values["warmup_steps"], lr_scheduler_type=values["lr_scheduler"],
            save_strategy="steps", save_steps=values["save_steps"],
            save_total_limit=None,  # old checkpoints: removed by the callback, after the new one is complete
            logging_strategy="steps", logging_steps=values["logging_steps"], seed=values["seed"],
            data_seed=values["seed"], dataloader_num_workers=0,  # workers would draw names on copies: no exact resume
            remove_unused_columns=False, report_to=[], use_cpu=use_cpu, disable_tqdm=not values["progress"],
            **{checkpointing: values["gradient_checkpointing"]})
    except ValueError as e:
        raise UsageError(f"the training options are refused by transformers.TrainingArguments: {e}") from None


def _callback(output_dir: Path, args_record: dict, keep: int | None):
    import shutil

    import transformers

    class SeatCliCallback(transformers.TrainerCallback):
        """Logs the last (partial) window too, so the report's means cover every step;
        marks each checkpoint complete with the run's arguments (written last); then
        removes all but the newest `keep` checkpoints. (Trainer's own save_total_limit
        removes them before this marker is written: an interrupt in between would leave
        no complete checkpoint with --save-total-limit 1.)"""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
            return control

        def on_save(self, args, state, control, **kwargs):
            checkpoint = output_dir / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                _rundir.write_args(checkpoint, args_record)
                for old in _rundir.checkpoints(output_dir)[keep:] if keep else []:
                    shutil.rmtree(old)
            return control

    return SeatCliCallback()


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _loss_summary(log_history: list[dict]) -> dict:
    """final (the last logged window's mean) and mean (over every step, the windows
    weighted by their steps) of loss, ce and kl."""
    out, windows, previous = {}, [], 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            windows.append((entry["step"] - previous, entry))
            previous = entry["step"]
    for key in ("loss", "ce", "kl"):
        pairs = [(w, float(e[key])) for w, e in windows if key in e and _finite(float(e[key])) is not None]
        steps = sum(w for w, _ in pairs)
        out[key] = {"final": pairs[-1][1] if pairs else None,
                    "mean": sum(w * v for w, v in pairs) / steps if steps else None}
    return out


def _report(values, record, trainer, model, resumed_from, started) -> dict:
    import torch
    import transformers

    from .. import __version__

    handle = trainer.seat
    per_weight = handle.targeting_report().trained_entries
    target_numel = sum(t.param.numel() for t in handle.targets.values())
    return {
        "format": "seat-train-report", "format_version": 1,
        "arguments": values,
        "versions": {"seat": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "resumed": resumed_from is not None, "resumed_from": str(resumed_from) if resumed_from else None,
        "records": record["records"], "data_sha256": record["data_sha256"],
        "device": str(trainer.args.device), "model_dtype": str(model.dtype).replace("torch.", ""),
        "steps": trainer.state.global_step, "epochs": _finite(trainer.state.epoch),
        **_loss_summary(trainer.state.log_history),
        "nonfinite_skipped": trainer.nonfinite_skipped,
        "trained_entries": {"total": handle.num_trainable, "per_weight": per_weight,
                            "fraction_of_targets": handle.num_trainable / target_numel if target_numel else None},
        "wall_time_s": round(time.time() - started, 3),
        "delta": _rundir.DELTA,
    }


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    started = time.time()
    values, _ = resolve(args)
    for key in ("data", "output_dir") + (("model",) if os.path.exists(values["model"]) else ()):
        values[key] = os.path.abspath(values[key])  # the report says which files, wherever it is read
    seat_config = _seat_config(values)
    from ._facts import fingerprint, load_facts

    records = load_facts(values["data"], values["question_key"], values["answer_key"], values["entity_key"])
    resume_from = _rundir.plan(values["output_dir"], values["resume"])
    _rundir.ensure_writable(values["output_dir"])

    import importlib.util

    import torch

    if values["device"] == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    use_cpu = values["device"] == "cpu" or not torch.cuda.is_available()
    if values["state_bits"] == 8 and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("argument --state-bits: 8-bit state needs bitsandbytes (pip install bitsandbytes, or "
                         "seat[lean]); or use --state-bits 32")
    _check_model_folder(values["model"])
    tok = _tokenizer(values["model"])
    collator = _collator(values, tok, records)
    training_args = _training_args(values, use_cpu)
    record = _rundir.args_record(values, fingerprint(records), len(records))
    if resume_from is not None:
        _rundir.check_same_run(resume_from, record)

    # ---- every argument checked: load and train
    import transformers
    from safetensors import SafetensorError

    from ..trainer import SeatTrainer
    from ..trainer_resume import ResumeMismatchError

    dtype = "auto" if values["dtype"] == "auto" else getattr(torch, values["dtype"])
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(values["model"], dtype=dtype)
    except (OSError, ValueError, SafetensorError) as e:  # damaged weight files (the folder was checked above)
        raise UsageError(f"argument --model: the weights of {values['model']!r} do not load: {e}") from None
    optimizer_kwargs = {"grad_dtype": torch.bfloat16 if values["grad_dtype"] == "bfloat16" else None,
                        "update_in_backward": values["update_in_backward"], "state_bits": values["state_bits"]}
    out = Path(values["output_dir"])
    started_in = _rundir.FolderState(out)  # Trainer() makes the folder: note what was there before
    try:
        trainer = SeatTrainer(model, training_args, seat_config=seat_config, optimizer_kwargs=optimizer_kwargs,
                              nonfinite=values["nonfinite"], train_dataset=records, data_collator=collator,
                              processing_class=tok, callbacks=[_callback(out, record, values["save_total_limit"])])
    except ValueError as e:  # --targets patterns that match no weight of this model, a model seat cannot patch
        flag = "--targets" if "targets" in str(e) else "--model"
        raise UsageError(f"argument {flag}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    _rundir.write_args(out, record)
    print(f"seat train: {len(records)} records, {trainer.seat.num_trainable:,} trained entries in "
          f"{len(trainer.seat.targets)} weights" + (f"; resuming from {resume_from}" if resume_from else ""))
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except ResumeMismatchError as e:  # found when the checkpoint loads (e.g. the delta of another base model)
        started_in.restore()
        raise UsageError(f"argument --resume: {e}") from None
    except ValueError as e:
        if "longer than max_length" not in str(e):
            raise
        raise UsageError(f"argument --max-length: {e}; raise --max-length and start again in a new --output-dir "
                         "(a resume keeps --max-length)") from None
    trainer.seat.save_delta(out / _rundir.DELTA)
    report = _report(values, record, trainer, model, resume_from, started)
    from ..evaluate import write_json_atomically

    write_json_atomically(str(out / _rundir.REPORT_FILE), report)
    loss = report["loss"]
    print(f"seat train: {report['steps']} steps, loss final {loss['final']} mean {loss['mean']}; "
          f"delta: {out / _rundir.DELTA}; report: {out / _rundir.REPORT_FILE}")
    return 0
