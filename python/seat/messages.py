"""Chat messages as a record's prompt: checks, Unicode normalization and entity replacement.

A prompt given as messages is a list of ``{"role": str, "content": str}`` dicts (the
conversation before the answer: a system message, earlier user and assistant turns, the
last user turn). seat.data renders it with the tokenizer's chat template; x~ is the same
list with the entity replaced in every message's content. Other keys are refused unless
they are None (a datasets/Arrow column of messages gives every message every key seen in
the column, None where absent): a key the template might render (tool calls, names) would
carry the entity into x~ unreplaced.
"""
from __future__ import annotations

import unicodedata
from typing import Mapping

from .perturb import count_mentions

MESSAGE_KEYS = ("role", "content")


def check_messages(where: str, what: str, messages) -> None:
    """A non-empty list of {role, content} dicts with str values; errors name ``where``
    (the record) and ``what`` (the field, e.g. "'question'")."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, (list, tuple)):
        raise TypeError(f"{where}: {what} must be a list of chat messages ({{'role': ..., 'content': ...}}); "
                        f"got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{where}: {what} is an empty list of messages; give at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"{where}: {what}[{i}] must be a dict with 'role' and 'content'; got {type(m).__name__}")
        for key in MESSAGE_KEYS:
            if not isinstance(m.get(key), str):
                got = "missing" if m.get(key) is None else type(m[key]).__name__
                raise TypeError(f"{where}: {what}[{i}][{key!r}] must be a str; got {got} (text-only messages "
                                "{'role': str, 'content': str} are supported)")
        if not m["role"].strip():
            raise ValueError(f"{where}: {what}[{i}]['role'] is empty; give the speaker (system, user, assistant)")
        extra = sorted(k for k, v in m.items() if k not in MESSAGE_KEYS and v is not None)
        if extra:
            raise ValueError(f"{where}: {what}[{i}] has keys {extra}; only 'role' and 'content' are supported "
                             "(the entity would not be replaced in the others): drop them")


def nfc_messages(messages) -> list[dict]:
    """Copies holding only role and content, the content in Unicode NFC (as x~'s is)."""
    return [{"role": m["role"], "content": unicodedata.normalize("NFC", m["content"])} for m in messages]


def perturb_messages(perturber, messages, entity: str, fake: str) -> tuple[list[dict], int]:
    """``(copies with the entity replaced by fake in every content, mentions replaced)``."""
    replace_parts = getattr(perturber, "replace_parts", True)
    count = sum(count_mentions(m["content"], entity, replace_parts=replace_parts) for m in messages)
    return [{"role": m["role"], "content": perturber.perturb(m["content"], entity, fake)} for m in messages], count


def message_texts(question) -> list[str]:
    """The texts of a prompt: [question] for a str, every message's content for a list."""
    return [question] if isinstance(question, str) else [m["content"] for m in question]
