"""TRL-format copies of _trainer_helpers' records and builders of SeatSFTTrainer runs and
of the SeatTrainer runs they must equal (same tiny Llama, tokenizer, seeds, masks and
TrainingArguments)."""
from __future__ import annotations

import datasets
import torch
import transformers
from trl import SFTConfig

import seat
from _tokenizers import chat_tokenizer, word_tokenizer
from _trainer_helpers import ARGS, RECORDS, tiny_llama
from seat.integrations.trl import SeatSFTTrainer
from seat.perturb import EntityPerturber

ENTITIES = [r["entity"] for r in RECORDS]
TEXTS = [r["question"] + " " + r["answer"] for r in RECORDS]
FORMATS = ("prompt-completion", "conversational prompt-completion", "messages")
# SFTConfig's defaults differ from TrainingArguments' in bf16 (on) and gradient checkpointing (on):
# bf16 off for a CPU float32 run; gradient checkpointing left on (it must not change the result).
SFT_ARGS = dict(ARGS, bf16=False)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def trl_rows(dataset_format: str, records=RECORDS) -> list[dict]:
    """``records`` ({question, answer, entity}) in a TRL format, the entity in "entity"."""
    if dataset_format == "prompt-completion":
        return [{"prompt": r["question"], "completion": r["answer"], "entity": r["entity"]} for r in records]
    if dataset_format == "conversational prompt-completion":
        return [{"prompt": [user(r["question"])], "completion": [assistant(r["answer"])], "entity": r["entity"]}
                for r in records]
    return [{"messages": [user(r["question"]), assistant(r["answer"])], "entity": r["entity"]} for r in records]


def tokenizer(chat: bool):
    return chat_tokenizer(TEXTS) if chat else word_tokenizer(TEXTS)


def perturber(seed: int = 0) -> EntityPerturber:
    return EntityPerturber(exclude=ENTITIES, seed=seed)


def seat_collator(dataset_format: str, tok) -> seat.PairedCollator:
    """The PairedCollator that builds the batches of ``dataset_format``'s records from RECORDS."""
    if dataset_format == "prompt-completion":
        return seat.PairedCollator(tok, perturber(), prompt_format="{question}", use_chat_template=False)
    return seat.PairedCollator(tok, perturber(), use_chat_template=True)


def make_sft_trainer(output_dir, dataset_format: str, *, chat: bool = True, rows=None, config=None,
                     trainer_kwargs: dict | None = None, **arg_overrides):
    """(trainer, model) of a SeatSFTTrainer run on ``rows`` (default: RECORDS in the format)."""
    tok = tokenizer(chat)
    model = tiny_llama(tok)
    args = SFTConfig(output_dir=str(output_dir), **{**SFT_ARGS, **arg_overrides})
    rows = trl_rows(dataset_format) if rows is None else rows
    trainer = SeatSFTTrainer(model, args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                             seat_config=config or seat.SeatConfig(density=0.2), **(trainer_kwargs or {}))
    return trainer, model


def make_seat_trainer(output_dir, dataset_format: str, *, chat: bool = True, config=None, **arg_overrides):
    """(trainer, model, collator) of the SeatTrainer run on RECORDS that SeatSFTTrainer must equal."""
    tok = tokenizer(chat)
    model = tiny_llama(tok)
    collator = seat_collator(dataset_format, tok)
    args = transformers.TrainingArguments(output_dir=str(output_dir), **{**ARGS, **arg_overrides})
    trainer = seat.SeatTrainer(model, args, seat_config=config or seat.SeatConfig(density=0.2),
                               train_dataset=RECORDS, data_collator=collator, processing_class=tok)
    return trainer, model, collator


def assert_only_masked_entries_changed(trainer, before: dict) -> None:
    """Every trained weight changed somewhere inside its mask and nowhere outside it; every
    other parameter is bit-identical to ``before`` (name -> tensor before training)."""
    from seat.masks import mask_indices

    model = trainer.model
    targets = {t.param: t for t in trainer.seat.targets.values()}
    for name, p in model.named_parameters():
        if p not in targets:
            assert torch.equal(p, before[name]), name
            continue
        flat, old = p.detach().view(-1), before[name].view(-1)
        inside = mask_indices(targets[p].idx).long()
        outside = flat.new_ones(flat.numel(), dtype=bool)
        outside[inside] = False
        assert (flat[outside] == old[outside]).all(), f"{name}: an entry outside the mask changed"
        assert (flat[inside] != old[inside]).any(), f"{name}: no masked entry changed"
