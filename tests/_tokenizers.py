"""Tokenizers built in code for tests (no model hub).

``word_tokenizer`` builds a word-level ``PreTrainedTokenizerFast``: a WordLevel model
over a vocabulary from the given texts and words (plus every built-in fictitious first
and last name of seat.perturb), a Whitespace + Punctuation pre-tokenizer (so "Lee's"
is "Lee", "'", "s" and "Answer:" is "Answer", ":"), special tokens [PAD] [UNK] [EOS]
[BOS] (ids 0-3), a post-processor that prepends [BOS] when special tokens are added,
and decoding that joins tokens with spaces. ``chat_tokenizer`` is the same with the
chat markers [USER] / [ASSISTANT] and a small Jinja ``chat_template``.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from seat.perturb import FIRST_NAMES, LAST_NAMES

SPECIALS = ("[PAD]", "[UNK]", "[EOS]", "[BOS]")
CHAT_MARKERS = ("[USER]", "[ASSISTANT]")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[USER] {{ message['content'] }} "
    "{% else %}[ASSISTANT] {{ message['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
)
BASE_WORDS = "Question Answer : ? . , ' s - \" ( ) ! ;".split()


def _pre_tokenizer():
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])


def build_vocab(texts: Iterable[str] = (), words: Iterable[str] = (), *, chat: bool = False) -> dict[str, int]:
    """Specials first (ids 0..3, then the chat markers), then every word, in first-seen order."""
    pre = _pre_tokenizer()
    vocab: dict[str, int] = {}
    for w in (*SPECIALS, *(CHAT_MARKERS if chat else ()), *BASE_WORDS, *FIRST_NAMES, *LAST_NAMES, *words):
        vocab.setdefault(w, len(vocab))
    for text in texts:
        for w, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(w, len(vocab))
    return vocab


def word_tokenizer(texts: Iterable[str] = (), words: Iterable[str] = (), *, padding_side: str = "right",
                   add_bos: bool = True, pad: bool = True, chat: bool = False) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer whose vocabulary covers ``texts`` and ``words``.

    pad=False leaves the pad token unset (to test the collator's error); chat=True adds
    [USER] / [ASSISTANT] and CHAT_TEMPLATE.
    """
    vocab = build_vocab(texts, words, chat=chat)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
    kwargs = dict(unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]", padding_side=padding_side)
    if pad:
        kwargs["pad_token"] = "[PAD]"
    if chat:
        kwargs["additional_special_tokens"] = list(CHAT_MARKERS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_tokenizer(texts: Iterable[str] = (), words: Iterable[str] = (), *, padding_side: str = "right",
                   pad: bool = True) -> PreTrainedTokenizerFast:
    """``word_tokenizer`` with [USER] / [ASSISTANT] markers and a Jinja chat template."""
    return word_tokenizer(texts, words, padding_side=padding_side, pad=pad, chat=True)


def bpe_tokenizer(texts: Iterable[str], *, padding_side: str = "right",
                  vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style: a leading space is part of the next
    token) trained in code on ``texts``; [PAD] and [EOS] specials, no BOS."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[EOS]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                   padding_side=padding_side)
