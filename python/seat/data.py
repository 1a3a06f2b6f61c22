"""Paired batches for SEAT: each example x and its entity-perturbed copy x~.

A record is a dict ``{"question": str | list[message], "answer": str, "entity": str}``
(other keys are ignored). The question is a str, or the conversation before the answer as
chat messages ``[{"role": str, "content": str}, ...]`` (a system message, earlier turns;
see seat.messages), which the tokenizer's chat template renders. ``PairedCollator`` turns
a list of records into one batch holding x (the record) and x~ (the record with its entity
replaced by a fresh fictitious name, see seat.perturb), tokenized the same way and padded
to one common length T.

Batch layout (B records, T = the longest of the 2B sequences, all tensors (B, T)):

  input_ids            int64  tokens of x, padded with tokenizer.pad_token_id
  attention_mask       int64  1 on real tokens of x, 0 on padding
  labels               int64  the token id on the answer tokens of x (the answer and,
                              with add_eos, the eos token), -100 everywhere else
                              (prompt and padding). Not shifted (Hugging Face
                              convention): the logits at position t-1 predict labels[t].
  pert_input_ids       int64  tokens of x~, padded likewise
  pert_attention_mask  int64  1 on real tokens of x~, 0 on padding
  pert_kl_mask         bool   True at the positions t of x~ whose next-token
                              distribution (the logits at t, which predict token t+1)
                              enters the KL term. Already shifted: use it on the logits
                              directly, no further shift.
                              kl_tokens="all": every real position except the last real
                                token of the row (it predicts nothing), i.e. the real
                                positions t for which t+1 is also real;
                              kl_tokens="answer": only the positions predicting an
                                answer token (incl. eos): from the last prompt token to
                                the second-to-last real token.

Padding follows ``tokenizer.padding_side`` ("right": tokens at [0, L), "left": at
[T-L, T)), read on every call. Sequences are never truncated: one longer than
max_length is an error.

Tokenization of one record (x and x~ alike): question and answer are taken in Unicode
NFC (as seat.perturb matches the entity in NFC, so x and x~ differ in the name only,
whichever normalization the record was written in); the prompt and the answer are tokenized
separately and concatenated, so the prompt/answer boundary is exact:

  prompt  with a chat template (``tokenizer.chat_template`` set, unless
          use_chat_template=False): ``tokenizer.apply_chat_template([{"role": "user",
          "content": question}], add_generation_prompt=True, tokenize=True)``; a
          question given as messages: ``apply_chat_template(messages, ...)`` alike
          (it needs the chat template: use_chat_template=False refuses it);
          otherwise ``tokenizer(prompt_format.format(question=question))`` with the
          tokenizer's special tokens (e.g. BOS);
  answer  ``tokenizer(answer, add_special_tokens=False)``; in the plain format with a
          leading space (unless the formatted prompt ends in, or the answer starts
          with, whitespace); then ``tokenizer.eos_token_id`` if add_eos. For a chat
          model make sure eos_token is the end-of-turn token (e.g. <|eot_id|>, <|im_end|>).

Fictitious names: a fresh one per example per call. The collator counts its calls in
``step``; example i of call ``step`` uses the key ``stable_key(step, i)`` (SHA-256, the
same on every run), so a run is reproducible and resumes exactly from
``state_dict()`` / ``load_state_dict()``. Inside a DataLoader worker process the
worker id enters the key too (each worker holds its own copy and counter; without it
the workers would repeat each other's names).

Errors name the record (its index in the batch and its entity) and say what to do.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import string
import unicodedata
from typing import Any, Mapping, Sequence

import torch

from .messages import check_messages, nfc_messages, perturb_messages, record_mentions
from .perturb import EntityPerturber, stable_key

__all__ = ["PairedCollator", "load_records", "KL_TOKENS", "DEFAULT_PROMPT_FORMAT", "IGNORE_INDEX"]

KL_TOKENS = ("all", "answer")
DEFAULT_PROMPT_FORMAT = "Question: {question}\nAnswer:"
from ._constants import IGNORE_INDEX
_KEYS = ("question", "answer", "entity")


def _describe(i: int, record) -> str:
    entity = record.get("entity") if isinstance(record, Mapping) else None
    return f"record {i} (entity {entity!r})" if isinstance(entity, str) else f"record {i} (no entity)"


def _check_record(where: str, record) -> None:
    """Keys, types and non-empty entity / answer; ``where`` names the record."""
    if not isinstance(record, Mapping):
        raise TypeError(f"{where} must be a dict with 'question', 'answer' and 'entity'; got {type(record).__name__}")
    missing = [k for k in _KEYS if k not in record]
    if missing:
        raise ValueError(f"{where} is missing {', '.join(map(repr, missing))}; each record needs 'question', "
                         "'answer' and 'entity' (str)")
    if isinstance(record["question"], (list, tuple)):
        check_messages(where, "'question'", record["question"])
    elif not isinstance(record["question"], str):
        raise TypeError(f"{where}: 'question' must be a str or a list of chat messages "
                        f"({{'role': ..., 'content': ...}}); got {type(record['question']).__name__}")
    for k in _KEYS[1:]:
        if not isinstance(record[k], str):
            raise TypeError(f"{where}: {k!r} must be a str; got {type(record[k]).__name__}")
    if not record["entity"].strip():
        raise ValueError(f"{where}: 'entity' is empty; give the name of the person the record is about")
    if not record["answer"].strip():
        raise ValueError(f"{where}: 'answer' is empty; every record needs an answer to train on "
                         "(drop the record or fill in its answer)")


def check_prompt_format(prompt_format, name: str = "prompt_format") -> str:
    """``prompt_format`` if it is a str format with exactly one field, ``{question}``
    (literal braces doubled); TypeError / ValueError naming ``name`` otherwise."""
    if not isinstance(prompt_format, str):
        raise TypeError(f"{name} must be a str; got {type(prompt_format).__name__}")
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(prompt_format) if field is not None}
    except ValueError as e:
        raise ValueError(f"{name} is not a valid format string ({e}); use '{{question}}' for the question "
                         "and '{{' / '}}' for literal braces") from None
    if fields != {"question"}:
        raise ValueError(f"{name} must use exactly one field, '{{question}}' (literal braces as '{{{{' and "
                         f"'}}}}'); got fields {sorted(fields)} in {prompt_format!r}")
    return prompt_format


class PairedCollator:
    """Collate records into paired (x, x~) batches (layout in the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer (fast or slow) with a pad token.
        perturber: a ``seat.perturb.EntityPerturber`` built with every training entity
            in ``exclude``.
        max_length: None, or the longest allowed sequence (x or x~, in tokens); longer
            records raise instead of being truncated. A fictitious name may take more
            tokens than the entity (BPE): when x fits and x~ does not, other names are
            drawn (up to MAX_NAME_DRAWS, key-derived: reproducible) before raising.
        kl_tokens: "all" (every real position of x~ but the last) or "answer" (the
            positions predicting answer tokens of x~), see ``pert_kl_mask``.
        prompt_format: the plain prompt, a format string with one field ``{question}``;
            used when the tokenizer has no chat template (or use_chat_template=False).
        add_eos: append ``tokenizer.eos_token_id`` to every answer (it is trained on).
        use_chat_template: None (default) uses the tokenizer's chat template when it has
            one; True requires one; False always uses prompt_format.

    ``collator(records) -> dict[str, torch.Tensor]``; each call increments ``step``.
    ``record_keys``: the keys it reads from a record (a trainer keeps these columns).
    ``data_rank``: under data parallelism, this process's rank (SeatTrainer sets it): a
    call's rows are then rows data_rank * len(records) + i of the global batch, and their
    fictitious names are drawn for those global positions, as one process collating the
    whole global batch draws them (0 for one process).
    """

    record_keys = _KEYS
    MAX_NAME_DRAWS = 16  # fictitious names tried per example for an x~ that fits max_length

    def __init__(self, tokenizer, perturber: EntityPerturber, *, max_length: int | None = None,
                 kl_tokens: str = "all", prompt_format: str = DEFAULT_PROMPT_FORMAT, add_eos: bool = True,
                 use_chat_template: bool | None = None):
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer; got {type(tokenizer).__name__}")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("tokenizer has no pad token; set one before building the collator, e.g. "
                             "`tokenizer.pad_token = tokenizer.eos_token` (padding is masked out of every loss)")
        if not hasattr(perturber, "perturb_record"):
            raise TypeError("perturber must be a seat.perturb.EntityPerturber (built with every training entity "
                            f"in exclude); got {type(perturber).__name__}")
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
                raise TypeError(f"max_length must be None or an int; got {type(max_length).__name__}")
            if max_length <= 0:
                raise ValueError(f"max_length must be > 0 (tokens); got {max_length}")
            max_length = int(max_length)
        if kl_tokens not in KL_TOKENS:
            raise ValueError(f"kl_tokens must be one of {', '.join(map(repr, KL_TOKENS))}; got {kl_tokens!r}")
        check_prompt_format(prompt_format)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template is None:
            use_chat_template = has_template
        elif use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template; set "
                             "tokenizer.chat_template or pass use_chat_template=False to use prompt_format")
        if add_eos and getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("add_eos=True but the tokenizer has no eos token; set tokenizer.eos_token "
                             "(for a chat model, its end-of-turn token) or pass add_eos=False")
        self.tokenizer = tokenizer
        self.perturber = perturber
        self.max_length = max_length
        self.kl_tokens = kl_tokens
        self.prompt_format = prompt_format
        self.add_eos = bool(add_eos)
        self.use_chat_template = bool(use_chat_template)
        self.step = 0
        self.data_rank = 0
        self.last_fake_names: list[str] = []  # the fictitious names of the last batch (for inspection)

    # -- tokenization ----------------------------------------------------------------

    def _chat_prompt_ids(self, messages: list) -> list[int]:
        out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        if isinstance(out, Mapping):
            out = out["input_ids"]
        return [int(t) for t in out]

    def encode(self, question, answer: str) -> tuple[list[int], int]:
        """Token ids of prompt + answer (+ eos) and the prompt length in tokens;
        ``question`` a str or a list of chat messages (rendered by the chat template)."""
        tok = self.tokenizer
        if not isinstance(question, str):
            if not self.use_chat_template:
                raise ValueError("a question given as chat messages needs the chat template, but "
                                 "use_chat_template=False; give the question as a str or build the collator "
                                 "with use_chat_template=True")
            prompt = self._chat_prompt_ids(question)
        elif self.use_chat_template:
            prompt = self._chat_prompt_ids([{"role": "user", "content": question}])
        else:
            text = self.prompt_format.format(question=question)
            prompt = [int(t) for t in tok(text, add_special_tokens=True)["input_ids"]]
            if not answer[:1].isspace() and not text[-1:].isspace():
                answer = " " + answer  # the answer follows the prompt as a separate word
        ids = [int(t) for t in tok(answer, add_special_tokens=False)["input_ids"]]
        if self.add_eos:
            ids.append(int(tok.eos_token_id))
        return prompt + ids, len(prompt)

    def encode_record(self, record: Mapping) -> tuple[list[int], int]:
        """``encode`` of a checked record's x (question and answer in Unicode NFC)."""
        question = record["question"]
        question = unicodedata.normalize("NFC", question) if isinstance(question, str) else nfc_messages(question)
        return self.encode(question, unicodedata.normalize("NFC", record["answer"]))

    def _perturb(self, record: Mapping, key: int) -> tuple[dict, str]:
        """x~'s record and its fictitious name; a messages question has the entity
        replaced in every message's content (the same draw as perturb_record's)."""
        if isinstance(record["question"], str):
            return self.perturber.perturb_record(record, key)
        entity = record["entity"]
        fake = self.perturber.fictitious_name(key, avoid=(entity,))
        parts = getattr(self.perturber, "replace_parts", True)
        if record_mentions(record["question"], record["answer"], entity, replace_parts=parts) == 0:
            raise ValueError(f"entity {entity!r} is mentioned in neither the question's messages nor the answer; "
                             "the entity must appear in the text as a whole word, spelled and capitalized exactly "
                             "as in 'entity'")
        question = perturb_messages(self.perturber, record["question"], entity, fake)
        return {**record, "question": question, "answer": self.perturber.perturb(record["answer"], entity, fake),
                "entity": fake}, fake

    # -- keys and state --------------------------------------------------------------

    @staticmethod
    def example_key(step: int, index: int, worker: int | None = None) -> int:
        """The fictitious-name key of example ``index`` in call ``step`` (SHA-256 based)."""
        if worker is None:
            return stable_key("seat.PairedCollator", step, index)
        return stable_key("seat.PairedCollator", step, index, "worker", worker)

    def config(self) -> dict:
        """What decides this collator's batches beside ``step``: JSON-able, compared when
        a training run resumes (the tokenizer's vocabulary and chat template as SHA-256
        digests, the perturber's ``config()``)."""
        tok = self.tokenizer
        vocab = tok.get_vocab() if callable(getattr(tok, "get_vocab", None)) else {}
        template = getattr(tok, "chat_template", None) if self.use_chat_template else None
        perturber = getattr(self.perturber, "config", None)
        return {
            "class": type(self).__name__, "kl_tokens": self.kl_tokens, "max_length": self.max_length,
            "prompt_format": self.prompt_format, "add_eos": self.add_eos, "use_chat_template": self.use_chat_template,
            "tokenizer": {"class": type(tok).__name__, "pad_token_id": tok.pad_token_id,
                          "eos_token_id": getattr(tok, "eos_token_id", None),
                          "vocab_sha256": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
                          "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest()},
            "perturber": perturber() if callable(perturber) else {"class": type(self.perturber).__name__},
        }

    def state_dict(self) -> dict[str, int]:
        """``{"step": int}``: enough to resume the same sequence of fictitious names."""
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError("state must be a dict with 'step' (from PairedCollator.state_dict()); "
                             f"got {state!r:.80}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state['step'] must be an int >= 0; got {step!r}")
        self.step = int(step)

    # -- collation -------------------------------------------------------------------

    def __call__(self, records: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if isinstance(records, Mapping) or not isinstance(records, Sequence):
            raise TypeError(f"records must be a list of dicts; got {type(records).__name__}")
        if len(records) == 0:
            raise ValueError("records is empty; a batch needs at least one record")
        side = getattr(self.tokenizer, "padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"tokenizer.padding_side must be 'left' or 'right'; got {side!r}")
        worker_info = torch.utils.data.get_worker_info()
        worker = None if worker_info is None else worker_info.id

        rows = []  # (ids, prompt_len, pert_ids, pert_prompt_len)
        fakes = []
        for i, record in enumerate(records):
            where = _describe(i, record)
            _check_record(where, record)
            question = record["question"]
            if not isinstance(question, str) and not self.use_chat_template:
                raise ValueError(f"{where}: 'question' is a list of chat messages, which only a chat template "
                                 "renders, but use_chat_template=False; give it as a str or build the collator "
                                 "with use_chat_template=True")
            ids, n_prompt = self.encode_record(record)
            key = self.example_key(self.step, getattr(self, "data_rank", 0) * len(records) + i, worker)
            for attempt in range(self.MAX_NAME_DRAWS):
                try:
                    pert, fake = self._perturb(record, key)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                pert_ids, pert_n_prompt = self.encode(pert["question"], pert["answer"])
                # A fictitious name can take more BPE tokens than the entity: if x fits and
                # x~ does not, draw another name (key-derived, so still reproducible).
                if self.max_length is None or len(pert_ids) <= self.max_length or len(ids) > self.max_length:
                    break
                key = stable_key("seat.PairedCollator.redraw", key, attempt)
            for what, seq, n in (("x", ids, n_prompt), ("x~ (perturbed)", pert_ids, pert_n_prompt)):
                if len(seq) == n:
                    raise ValueError(f"{where}: the answer of {what} has no tokens; give a non-empty answer")
                if self.max_length is not None and len(seq) > self.max_length:
                    tried = f" ({self.MAX_NAME_DRAWS} fictitious names tried)" if seq is pert_ids else ""
                    raise ValueError(f"{where}: {what} is {len(seq)} tokens, longer than max_length="
                                     f"{self.max_length}; raise max_length or shorten or drop the record{tried}")
            rows.append((ids, n_prompt, pert_ids, pert_n_prompt))
            fakes.append(fake)

        B = len(rows)
        T = max(max(len(r[0]), len(r[2])) for r in rows)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((B, T), pad, dtype=torch.int64)
        attention_mask = torch.zeros((B, T), dtype=torch.int64)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
        pert_input_ids = torch.full((B, T), pad, dtype=torch.int64)
        pert_attention_mask = torch.zeros((B, T), dtype=torch.int64)
        pert_kl_mask = torch.zeros((B, T), dtype=torch.bool)
        for b, (ids, n_prompt, pert_ids, pert_n_prompt) in enumerate(rows):
            L = len(ids)
            o = T - L if side == "left" else 0
            input_ids[b, o:o + L] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[b, o:o + L] = 1
            labels[b, o + n_prompt:o + L] = input_ids[b, o + n_prompt:o + L]
            L = len(pert_ids)
            o = T - L if side == "left" else 0
            pert_input_ids[b, o:o + L] = torch.tensor(pert_ids, dtype=torch.int64)
            pert_attention_mask[b, o:o + L] = 1
            first = 0 if self.kl_tokens == "all" else pert_n_prompt - 1
            pert_kl_mask[b, o + first:o + L - 1] = True

        self.step += 1
        self.last_fake_names = fakes
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pert_input_ids": pert_input_ids,
            "pert_attention_mask": pert_attention_mask,
            "pert_kl_mask": pert_kl_mask,
        }

    def __repr__(self) -> str:
        return (f"PairedCollator(step={self.step}, kl_tokens={self.kl_tokens!r}, max_length={self.max_length}, "
                f"chat_template={self.use_chat_template}, add_eos={self.add_eos})")


# ----------------------------------------------------------------------------- files


def load_records(path: str | os.PathLike, *, require_entity: bool = True) -> list[dict]:
    """Read a JSONL file of records ``{"question", "answer", "entity"}`` (one JSON object
    per line; blank lines skipped; extra keys kept).

    Checks every line: valid JSON, an object, the three keys (question a str or chat
    messages, answer and entity str), non-empty entity
    and answer, and (require_entity) that the entity is mentioned in the question or
    answer as seat.perturb matches it (whole word, case-sensitive, or its first or last
    name alone). Errors say ``path:line``.
    """
    path = os.fspath(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                 'JSON object {"question": ..., "answer": ..., "entity": ...}') from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with 'question', 'answer' and 'entity'; "
                                 f"got {type(record).__name__}")
            _check_record(f"{where} (entity {record.get('entity')!r})", record)
            if require_entity:
                entity = record["entity"]
                if record_mentions(record["question"], record["answer"], entity) == 0:
                    raise ValueError(f"{where}: entity {entity!r} is mentioned in neither the question nor the "
                                     "answer; spell it exactly as in the text (whole word, same capitalization) "
                                     "or pass require_entity=False")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records; expected one JSON object per line")
    return records
