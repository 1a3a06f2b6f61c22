"""TRL's SFT dataset formats as SEAT records, and the collator that reads them.

TRL (trl.SFTTrainer) takes datasets in these formats; each SEAT record also carries the
subject entity (the person the record is about) in its own column, "entity" by default:

  "prompt-completion"                  {"prompt": str, "completion": str, "entity": str}
  "conversational prompt-completion"   {"prompt": [message, ...],
                                        "completion": [{"role": "assistant", "content": str}],
                                        "entity": str}
  "messages"                           {"messages": [message, ..., {"role": "assistant",
                                                                   "content": str}],
                                        "entity": str}

A message is {"role": str, "content": str} (see seat.messages). Each becomes the
seat.data record {"question", "answer", "entity"}: the answer is the completion (or the
last message, which must be the assistant's), the question the prompt (or every message
before the last). Plain prompts are used verbatim (no prompt_format, no chat template, as
TRL does; a space goes between prompt and completion unless one of them has whitespace
at the boundary); message prompts are rendered by the tokenizer's chat template with the
generation prompt, for x and x~ alike. Labels cover the answer (and eos) only: TRL's
completion-only loss.

Not SEAT formats: language modeling text ({"text": ...}, no prompt/answer split) and
ShareGPT "conversations" ({"from", "value"}: convert them to messages first).

This module does not import TRL.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from .data import PairedCollator, _check_record
from .messages import check_messages

FORMATS = ("prompt-completion", "conversational prompt-completion", "messages")


def columns_of(dataset_format: str, entity_column: str) -> tuple[str, ...]:
    """The record keys (dataset columns) a format reads."""
    return ("messages", entity_column) if dataset_format == "messages" else ("prompt", "completion", entity_column)


def detect_format(record, where: str = "the first record") -> str:
    """The format of ``record`` (one of FORMATS), as TRL decides it from a dataset's first
    record; ValueError naming what is there and what SEAT reads otherwise."""
    if not isinstance(record, Mapping):
        raise TypeError(f"{where} must be a dict (a dataset row); got {type(record).__name__}")
    keys = sorted(record)
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        prompt = record["prompt"]
        return "prompt-completion" if isinstance(prompt, str) else "conversational prompt-completion"
    if "text" in record:
        raise ValueError(f"{where} is language modeling text (a 'text' column, keys {keys}): SEAT needs a prompt and "
                         "an answer to train on; use the prompt-completion format ('prompt', 'completion') or "
                         "'messages' whose last message is the assistant's answer")
    if "conversations" in record:
        raise ValueError(f"{where} has 'conversations' (ShareGPT from/value turns): convert them to 'messages' "
                         "first, e.g. with trl.data_utils.maybe_convert_to_chatml")
    raise ValueError(f"{where} has keys {keys}; SEAT reads TRL's prompt-completion format ('prompt', "
                     "'completion') or conversational 'messages', each with the entity column")


def _describe(where: str, record, entity_column: str) -> str:
    entity = record.get(entity_column) if isinstance(record, Mapping) else None
    return f"{where} (entity {entity!r})" if isinstance(entity, str) else where


def to_seat_record(record, dataset_format: str, entity_column: str = "entity", where: str = "record") -> dict:
    """``record`` in ``dataset_format`` as a seat.data record {question, answer, entity}
    (checked as PairedCollator checks it); errors name ``where`` and TRL's field names."""
    if not isinstance(record, Mapping):
        raise TypeError(f"{where} must be a dict (a dataset row); got {type(record).__name__}")
    where = _describe(where, record, entity_column)
    entity = record.get(entity_column)
    if entity is None:
        raise ValueError(f"{where} has no {entity_column!r}: SEAT needs each record's subject entity to build its "
                         f"perturbed copy; add a column {entity_column!r} with the name of the person the record is "
                         "about (or name your column with entity_column=...)")
    if not isinstance(entity, str):
        raise TypeError(f"{where}: {entity_column!r} must be a str (the entity's name); got {type(entity).__name__}")
    if dataset_format == "messages":
        messages = record.get("messages")
        check_messages(where, "'messages'", messages)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: 'messages' must end with the assistant's answer after at least one prompt "
                             f"message; got roles {[m['role'] for m in messages]}")
        question, answer = list(messages[:-1]), messages[-1]["content"]
    elif dataset_format in FORMATS:
        missing = [k for k in ("prompt", "completion") if k not in record]
        if missing:
            raise ValueError(f"{where} is missing {', '.join(map(repr, missing))} (a {dataset_format} dataset)")
        question, completion = record["prompt"], record["completion"]
        if dataset_format == "prompt-completion":
            for key in ("prompt", "completion"):
                if not isinstance(record[key], str):
                    raise TypeError(f"{where}: {key!r} must be a str in a prompt-completion dataset (the format of "
                                    f"its first record); got {type(record[key]).__name__}")
            answer = completion
        else:
            check_messages(where, "'prompt'", question)
            check_messages(where, "'completion'", completion)
            if len(completion) != 1 or completion[0]["role"] != "assistant":
                raise ValueError(f"{where}: 'completion' must be one assistant message (SEAT trains on one answer); "
                                 f"got roles {[m['role'] for m in completion]}")
            question, answer = list(question), completion[0]["content"]
    else:
        raise ValueError(f"dataset_format must be one of {', '.join(map(repr, FORMATS))}; got {dataset_format!r}")
    out = {"question": question, "answer": answer, "entity": entity}
    _check_record(where, out)
    return out


class SFTPairedCollator(PairedCollator):
    """seat.PairedCollator over TRL's SFT dataset formats (module docstring).

    Args:
        tokenizer, perturber, max_length, kl_tokens, add_eos: as PairedCollator.
        dataset_format: one of FORMATS (see ``detect_format``). The conversational
            formats need the tokenizer's chat template.
        entity_column: the record key that holds the subject entity.

    The batches are PairedCollator's for the converted records, built with
    ``prompt_format="{question}"`` and ``use_chat_template`` on for the conversational
    formats and off for plain prompts (TRL renders plain prompts without the template).
    ``record_keys`` are the format's columns.
    """

    def __init__(self, tokenizer, perturber, *, dataset_format: str, entity_column: str = "entity",
                 max_length: int | None = None, kl_tokens: str = "all", add_eos: bool = True):
        if dataset_format not in FORMATS:
            raise ValueError(f"dataset_format must be one of {', '.join(map(repr, FORMATS))}; got {dataset_format!r}")
        if not isinstance(entity_column, str) or not entity_column:
            raise TypeError(f"entity_column must be a non-empty str (a column name); got {entity_column!r}")
        chat = dataset_format != "prompt-completion"
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"a {dataset_format} dataset is rendered with the tokenizer's chat template, but the "
                             "tokenizer has none; set tokenizer.chat_template (or use plain prompt/completion strings)")
        super().__init__(tokenizer, perturber, max_length=max_length, kl_tokens=kl_tokens, prompt_format="{question}",
                         add_eos=add_eos, use_chat_template=chat)
        self.dataset_format = dataset_format
        self.entity_column = entity_column
        self.record_keys = columns_of(dataset_format, entity_column)

    def __call__(self, records: Sequence[Mapping]):
        if isinstance(records, Mapping) or not isinstance(records, Sequence):
            raise TypeError(f"records must be a list of dicts; got {type(records).__name__}")
        return super().__call__([to_seat_record(r, self.dataset_format, self.entity_column, f"record {i}")
                                 for i, r in enumerate(records)])

    def config(self) -> dict:
        return {**super().config(), "dataset_format": self.dataset_format, "entity_column": self.entity_column}

    def __repr__(self) -> str:
        return (f"SFTPairedCollator(format={self.dataset_format!r}, entity_column={self.entity_column!r}, "
                f"step={self.step}, kl_tokens={self.kl_tokens!r}, max_length={self.max_length})")
