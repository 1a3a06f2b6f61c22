"""seat.data_formats: TRL's SFT formats as SEAT records (detect_format, to_seat_record) and
SFTPairedCollator's batches (PairedCollator's for the converted records, plain prompts
verbatim, conversational ones through the chat template), with errors that name the record."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _tokenizers import bpe_tokenizer, chat_tokenizer  # noqa: E402

from seat.data import IGNORE_INDEX, PairedCollator  # noqa: E402
from seat.data_formats import FORMATS, SFTPairedCollator, detect_format, to_seat_record  # noqa: E402
from seat.perturb import EntityPerturber  # noqa: E402

USER = {"role": "user", "content": "Where was Ann Lee born?"}
ANSWER = "Ann Lee was born in Oslo."
ROWS = {
    "prompt-completion": {"prompt": "Q: Where was Ann Lee born?\nA:", "completion": " " + ANSWER, "entity": "Ann Lee"},
    "conversational prompt-completion": {"prompt": [USER], "completion": [{"role": "assistant", "content": ANSWER}],
                                         "entity": "Ann Lee"},
    "messages": {"messages": [USER, {"role": "assistant", "content": ANSWER}], "entity": "Ann Lee"},
}


@pytest.mark.parametrize("dataset_format", FORMATS)
def test_each_format_converts_to_a_seat_record(dataset_format):
    row = ROWS[dataset_format]
    assert detect_format(row) == dataset_format
    record = to_seat_record(dict(row, extra=1), dataset_format)
    question = row["prompt"] if dataset_format == "prompt-completion" else [USER]
    assert record == {"question": question, "answer": ANSWER if dataset_format != "prompt-completion"
                      else " " + ANSWER, "entity": "Ann Lee"}


def test_entity_column_is_configurable_and_required():
    row = {"messages": ROWS["messages"]["messages"], "person": "Ann Lee"}
    assert to_seat_record(row, "messages", "person")["entity"] == "Ann Lee"
    with pytest.raises(ValueError, match=r"row 7 has no 'entity': SEAT needs .*entity_column="):
        to_seat_record(row, "messages", where="row 7")
    with pytest.raises(ValueError, match="dataset_format must be one of"):
        to_seat_record(row, "text", "person")


def test_plain_prompts_are_used_verbatim_and_boundaries_kept():
    """Plain prompt-completion: no prompt_format, no chat template even when the tokenizer
    has one; with a byte-level BPE the completion keeps its own leading space."""
    texts = [ROWS["prompt-completion"]["prompt"] + ROWS["prompt-completion"]["completion"]] * 8
    tok = bpe_tokenizer(texts)
    tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    c = SFTPairedCollator(tok, EntityPerturber(["Ann Lee"]), dataset_format="prompt-completion")
    assert c.record_keys == ("prompt", "completion", "entity") and not c.use_chat_template
    batch = c([ROWS["prompt-completion"]])
    whole = tok(texts[0])["input_ids"] + [tok.eos_token_id]
    assert batch["input_ids"][0, batch["attention_mask"][0].bool()].tolist() == whole
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != IGNORE_INDEX]) == " " + ANSWER + "[EOS]"


@pytest.mark.parametrize("dataset_format", FORMATS[1:])
def test_conversational_batches_are_paired_collators(dataset_format):
    tok = chat_tokenizer([USER["content"], ANSWER])
    c = SFTPairedCollator(tok, EntityPerturber(["Ann Lee"], seed=2), dataset_format=dataset_format, kl_tokens="answer")
    ref = PairedCollator(tok, EntityPerturber(["Ann Lee"], seed=2), kl_tokens="answer")
    batch, expected = c([ROWS[dataset_format]] * 2), ref([{"question": USER["content"], "answer": ANSWER,
                                                           "entity": "Ann Lee"}] * 2)
    assert all(torch.equal(v, expected[k]) for k, v in batch.items())
    assert c.config()["dataset_format"] == dataset_format and c.config()["class"] == "SFTPairedCollator"


def test_collator_errors():
    tok = chat_tokenizer([USER["content"], ANSWER])
    with pytest.raises(ValueError, match="dataset_format must be one of"):
        SFTPairedCollator(tok, EntityPerturber(["Ann Lee"]), dataset_format="text")
    with pytest.raises(TypeError, match="entity_column must be a non-empty str"):
        SFTPairedCollator(tok, EntityPerturber(["Ann Lee"]), dataset_format="messages", entity_column="")
    c = SFTPairedCollator(tok, EntityPerturber(["Ann Lee"]), dataset_format="messages")
    with pytest.raises(ValueError, match=r"record 1 \(entity 'Ann Lee'\): 'messages' must end with the assistant"):
        c([ROWS["messages"], dict(ROWS["messages"], messages=[USER])])
    with pytest.raises(ValueError, match=r"record 0 \(entity 'A'\) is missing 'completion'"):
        SFTPairedCollator(tok, EntityPerturber(["Ann Lee"]), dataset_format="prompt-completion")([{"prompt": "x",
                                                                                                   "entity": "A"}])
    assert c.step == 0
