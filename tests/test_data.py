"""seat.data: PairedCollator batch layout (left and right padding, chat template and
plain prompts), labels on answer tokens only, the KL mask in both modes with its shift
convention, fictitious names in x~ (fresh per call, reproducible, resumable), errors
naming the record, and load_records."""
from __future__ import annotations

import json
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _tokenizers import bpe_tokenizer, chat_tokenizer, word_tokenizer  # noqa: E402

from seat.data import IGNORE_INDEX, PairedCollator, load_records  # noqa: E402
from seat.perturb import EntityPerturber, stable_key  # noqa: E402

RECORDS = [
    {"question": "Where was Ann Lee born?", "answer": "Ann Lee was born in Oslo, and Lee's parents too.",
     "entity": "Ann Lee"},
    {"question": "What did Bo Stone write?", "answer": "He wrote poems.", "entity": "Bo Stone", "extra": 1},
    # a one-token entity gets a two-token fake: x~ is longer than x
    {"question": "Who taught Plato?", "answer": "Socrates taught Plato.", "entity": "Plato"},
]
ENTITIES = [r["entity"] for r in RECORDS]
TEXTS = [r["question"] + " " + r["answer"] for r in RECORDS] + ["Zed Mora Annie Q A { }"]

KEYS = ("input_ids", "attention_mask", "labels", "pert_input_ids", "pert_attention_mask", "pert_kl_mask")


def make_tok(chat: bool, side: str = "right"):
    return chat_tokenizer(TEXTS, padding_side=side) if chat else word_tokenizer(TEXTS, padding_side=side)


def make(chat=False, side="right", **kw):
    tok = make_tok(chat, side)
    return tok, PairedCollator(tok, EntityPerturber(ENTITIES, seed=0), **kw)


def real(row_mask: torch.Tensor) -> torch.Tensor:
    return row_mask.nonzero().squeeze(1)


def expected_ids(tok, question: str, answer: str, chat: bool, add_eos: bool = True) -> tuple[list[int], int]:
    """Tokenization written out independently of the collator."""
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        ans = tok(answer, add_special_tokens=False)["input_ids"]
    else:
        prompt = tok(f"Question: {question}\nAnswer:")["input_ids"]
        ans = tok(" " + answer, add_special_tokens=False)["input_ids"]
    return list(prompt) + list(ans) + ([tok.eos_token_id] if add_eos else []), len(prompt)


params_layout = pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
params_side = pytest.mark.parametrize("side", ["right", "left"])


# ----------------------------------------------------------------------------- layout


@params_layout
@params_side
def test_batch_layout_and_padding(chat, side):
    tok, c = make(chat, side)
    batch = c(RECORDS)
    assert set(batch) == set(KEYS)
    B = len(RECORDS)
    lengths = [int(batch[k].sum(1).max()) for k in ("attention_mask", "pert_attention_mask")]
    T = batch["input_ids"].shape[1]
    assert T == max(lengths)
    for k in KEYS:
        assert batch[k].shape == (B, T), k
        assert batch[k].dtype == (torch.bool if k == "pert_kl_mask" else torch.int64), k
    pad = tok.pad_token_id
    for ids_key, mask_key in (("input_ids", "attention_mask"), ("pert_input_ids", "pert_attention_mask")):
        for b in range(B):
            m = batch[mask_key][b]
            L = int(m.sum())
            expected_mask = torch.zeros(T, dtype=torch.int64)
            if side == "right":
                expected_mask[:L] = 1
            else:
                expected_mask[T - L:] = 1
            assert torch.equal(m, expected_mask)
            assert (batch[ids_key][b][m == 0] == pad).all()
            assert (batch[ids_key][b][m == 1] != pad).all()
    # x~ of the one-token entity is longer than x: T comes from x~
    assert batch["pert_attention_mask"][2].sum() > batch["attention_mask"][2].sum()
    # the tokenizer is not mutated and later calls follow a changed padding side
    tok.padding_side = "left" if side == "right" else "right"
    flipped = c(RECORDS)
    assert flipped["attention_mask"][1, 0] == (1 if side == "left" else 0)


@params_layout
@params_side
def test_tokens_and_labels(chat, side):
    tok, c = make(chat, side)
    batch = c(RECORDS)
    for b, rec in enumerate(RECORDS):
        ids, n_prompt = expected_ids(tok, rec["question"], rec["answer"], chat)
        pos = real(batch["attention_mask"][b])
        assert batch["input_ids"][b, pos].tolist() == ids
        labels = batch["labels"][b]
        assert labels[pos[n_prompt:]].tolist() == ids[n_prompt:]  # answer + eos
        assert ids[-1] == tok.eos_token_id
        keep = labels != IGNORE_INDEX
        assert int(keep.sum()) == len(ids) - n_prompt
        assert (labels[~keep] == IGNORE_INDEX).all()
        assert tok.decode(labels[keep]).split() == tok.decode(ids[n_prompt:]).split()
        assert "Question" not in tok.decode(labels[keep]) and "[USER]" not in tok.decode(labels[keep])
        if chat:
            assert tok.convert_ids_to_tokens(ids[:2]) == ["[BOS]", "[USER]"] and "[ASSISTANT]" in \
                tok.convert_ids_to_tokens(ids[:n_prompt])
        else:
            assert tok.convert_ids_to_tokens(ids[:3]) == ["[BOS]", "Question", ":"]


@params_layout
def test_pert_tokens_are_the_perturbed_record(chat):
    tok, c = make(chat)
    batch = c(RECORDS)
    perturber = c.perturber
    for b, rec in enumerate(RECORDS):
        pert, fake = perturber.perturb_record(rec, PairedCollator.example_key(0, b))
        assert fake == c.last_fake_names[b]
        ids, _ = expected_ids(tok, pert["question"], pert["answer"], chat)
        assert batch["pert_input_ids"][b, real(batch["pert_attention_mask"][b])].tolist() == ids
        text = tok.decode(batch["pert_input_ids"][b], skip_special_tokens=True)
        assert fake in text
        words = text.split()
        for part in rec["entity"].split():
            assert part not in words
        original = tok.decode(batch["input_ids"][b], skip_special_tokens=True)
        assert rec["entity"] in original
    # everything but the entity is kept
    first, last = c.last_fake_names[0].split()
    expected = tok.decode(batch["input_ids"][0], skip_special_tokens=True) \
        .replace("Ann Lee", "@").replace("Lee", last).replace("@", f"{first} {last}")
    assert tok.decode(batch["pert_input_ids"][0], skip_special_tokens=True) == expected


# ----------------------------------------------------------------------------- KL mask


@params_layout
@params_side
def test_kl_mask_all(chat, side):
    _, c = make(chat, side, kl_tokens="all")
    batch = c(RECORDS)
    for b in range(len(RECORDS)):
        m = batch["pert_attention_mask"][b].bool()
        pos = real(m)
        expected = m.clone()
        expected[pos[-1]] = False  # the last real token predicts nothing
        assert torch.equal(batch["pert_kl_mask"][b], expected)
        assert int(batch["pert_kl_mask"][b].sum()) == len(pos) - 1
        # position t counts <=> t and t+1 are both real tokens
        t = real(batch["pert_kl_mask"][b])
        assert m[t + 1].all()


@params_layout
@params_side
def test_kl_mask_answer(chat, side):
    tok, c = make(chat, side, kl_tokens="answer")
    batch = c(RECORDS)
    for b, rec in enumerate(RECORDS):
        pert, _ = c.perturber.perturb_record(rec, PairedCollator.example_key(0, b))
        ids, n_prompt = expected_ids(tok, pert["question"], pert["answer"], chat)
        pos = real(batch["pert_attention_mask"][b])
        kl = batch["pert_kl_mask"][b]
        t = real(kl)
        # the positions predicting the answer tokens (incl. eos): last prompt token .. second-to-last token
        assert t.tolist() == pos[n_prompt - 1:-1].tolist()
        assert batch["pert_input_ids"][b, t + 1].tolist() == ids[n_prompt:]
        assert int(kl.sum()) == len(ids) - n_prompt


def test_kl_mask_answer_is_a_subset_of_all():
    _, c_all = make(kl_tokens="all")
    _, c_ans = make(kl_tokens="answer")
    a, s = c_all(RECORDS), c_ans(RECORDS)
    assert torch.equal(a["pert_input_ids"], s["pert_input_ids"])
    assert (s["pert_kl_mask"] <= a["pert_kl_mask"]).all()
    assert s["pert_kl_mask"].sum() < a["pert_kl_mask"].sum()


# ----------------------------------------------------------------------------- prompt options


def test_chat_template_can_be_switched_off_and_is_required_when_asked():
    tok = make_tok(chat=True)
    plain = PairedCollator(tok, EntityPerturber(ENTITIES), use_chat_template=False)
    ids, _ = expected_ids(tok, RECORDS[1]["question"], RECORDS[1]["answer"], chat=False)
    batch = plain(RECORDS)
    assert batch["input_ids"][1, real(batch["attention_mask"][1])].tolist() == ids
    with pytest.raises(ValueError, match="use_chat_template=True but the tokenizer has no chat_template"):
        PairedCollator(make_tok(chat=False), EntityPerturber(ENTITIES), use_chat_template=True)


def test_add_eos_false():
    tok, c = make(add_eos=False)
    batch = c(RECORDS)
    for b, rec in enumerate(RECORDS):
        ids, n_prompt = expected_ids(tok, rec["question"], rec["answer"], chat=False, add_eos=False)
        pos = real(batch["attention_mask"][b])
        assert batch["input_ids"][b, pos].tolist() == ids
        assert tok.eos_token_id not in ids
        assert int((batch["labels"][b] != IGNORE_INDEX).sum()) == len(ids) - n_prompt


def test_custom_prompt_format():
    tok, c = make(prompt_format="Q : {question} A :")
    batch = c(RECORDS[:1])
    words = tok.decode(batch["input_ids"][0], skip_special_tokens=True).split()
    assert words[:2] == ["Q", ":"] and "Question" not in words and words[words.index("A") + 1] == ":"


def test_byte_level_bpe_prompt_answer_boundary():
    """GPT-2 style BPE: the answer keeps its leading space, so x equals the whole text
    tokenized at once, and the labels decode to exactly " answer" + eos."""
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in RECORDS] * 4
    tok = bpe_tokenizer(texts)
    c = PairedCollator(tok, EntityPerturber(ENTITIES))
    batch = c(RECORDS)
    for b, rec in enumerate(RECORDS):
        whole = tok(f"Question: {rec['question']}\nAnswer: {rec['answer']}")["input_ids"] + [tok.eos_token_id]
        assert batch["input_ids"][b, real(batch["attention_mask"][b])].tolist() == whole
        labels = batch["labels"][b]
        assert tok.decode(labels[labels != IGNORE_INDEX]) == " " + rec["answer"] + "[EOS]"
    # a prompt that ends in a space gets no second space
    c2 = PairedCollator(tok, EntityPerturber(ENTITIES), prompt_format="Question: {question}\nAnswer: ")
    labels = c2(RECORDS[:1])["labels"][0]
    assert tok.decode(labels[labels != IGNORE_INDEX]) == RECORDS[0]["answer"] + "[EOS]"


# ----------------------------------------------------------------------------- names over calls


def test_fresh_names_each_call_and_reproducible():
    _, c1 = make()
    _, c2 = make()
    b1, b2 = c1(RECORDS), c2(RECORDS)
    for k in KEYS:
        assert torch.equal(b1[k], b2[k])
    assert c1.step == 1
    names1 = list(c1.last_fake_names)
    n1 = c1(RECORDS)
    assert c1.step == 2
    assert c1.last_fake_names != names1
    assert torch.equal(n1["input_ids"], b1["input_ids"])  # x never changes
    assert not torch.equal(n1["pert_input_ids"], b1["pert_input_ids"])
    assert len(set(names1)) == len(names1)  # different examples, different names
    assert all(not c1.perturber.is_excluded(n) for n in names1 + c1.last_fake_names)


def test_state_dict_resumes_the_name_sequence():
    _, c1 = make()
    batches = [c1(RECORDS) for _ in range(3)]
    names = c1.last_fake_names
    assert c1.state_dict() == {"step": 3}
    _, c2 = make()
    c2.load_state_dict({"step": 2})
    resumed = c2(RECORDS)
    assert c2.last_fake_names == names
    for k in KEYS:
        assert torch.equal(resumed[k], batches[2][k])
    assert c2.state_dict() == {"step": 3}


@pytest.mark.parametrize("state", [{}, {"step": -1}, {"step": 1.5}, {"step": True}, 3])
def test_load_state_dict_rejects_bad_state(state):
    _, c = make()
    with pytest.raises(ValueError, match="step"):
        c.load_state_dict(state)


def test_example_key_is_stable():
    assert PairedCollator.example_key(4, 2) == stable_key("seat.PairedCollator", 4, 2)
    assert PairedCollator.example_key(4, 2) != PairedCollator.example_key(2, 4)
    assert PairedCollator.example_key(4, 2) != PairedCollator.example_key(4, 2, worker=0)


def test_dataloader_workers_get_different_names(monkeypatch):
    _, c = make()
    c(RECORDS)
    main = c.last_fake_names
    c.load_state_dict({"step": 0})
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: types.SimpleNamespace(id=1))
    c(RECORDS)
    assert c.last_fake_names != main


def test_works_as_dataloader_collate_fn():
    _, c = make()
    loader = torch.utils.data.DataLoader(RECORDS, batch_size=2, collate_fn=c)
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert c.step == 2


# ----------------------------------------------------------------------------- errors


def test_record_without_its_entity_names_the_record():
    _, c = make()
    bad = {"question": "Who is she?", "answer": "Nobody knows.", "entity": "Zed Mora"}
    with pytest.raises(ValueError, match=r"record 1 \(entity 'Zed Mora'\): entity 'Zed Mora' is mentioned in "
                                         r"neither the question nor the answer"):
        c([RECORDS[0], bad])
    assert c.step == 0  # a failed call does not advance the name sequence
    lower = {"question": "Who is ann lee?", "answer": "A poet.", "entity": "Ann Lee"}
    with pytest.raises(ValueError, match=r"record 0 \(entity 'Ann Lee'\).*capitalized exactly"):
        c([lower])


@pytest.mark.parametrize("record, exc, match", [
    ({"question": "Who is Ann Lee?", "answer": "", "entity": "Ann Lee"}, ValueError,
     r"record 1 \(entity 'Ann Lee'\): 'answer' is empty"),
    ({"question": "Who is Ann Lee?", "answer": "  \n", "entity": "Ann Lee"}, ValueError,
     r"record 1 \(entity 'Ann Lee'\): 'answer' is empty"),
    ({"question": "Who is Ann Lee?", "entity": "Ann Lee"}, ValueError,
     r"record 1 \(entity 'Ann Lee'\) is missing 'answer'; each record needs"),
    ({"question": "Who is Ann Lee?", "answer": "A poet."}, ValueError, r"record 1 \(no entity\) is missing 'entity'"),
    ({"question": "Who is Ann Lee?", "answer": "A poet.", "entity": " "}, ValueError,
     r"record 1 \(entity ' '\): 'entity' is empty"),
    ({"question": 3, "answer": "A poet.", "entity": "Ann Lee"}, TypeError,
     r"record 1 \(entity 'Ann Lee'\): 'question' must be a str"),
    (["Who is Ann Lee?", "A poet.", "Ann Lee"], TypeError, r"record 1 \(no entity\) must be a dict"),
])
def test_bad_records_name_the_record(record, exc, match):
    _, c = make()
    with pytest.raises(exc, match=match):
        c([RECORDS[0], record])


def test_max_length():
    plato = [RECORDS[2]]  # its x~ is two tokens longer than its x (two mentions, two-token fake)
    _, c = make()
    batch = c(plato)
    T = batch["input_ids"].shape[1]
    assert int(batch["pert_attention_mask"].sum()) == T == int(batch["attention_mask"].sum()) + 2
    _, ok = make(max_length=T)
    assert ok(plato)["input_ids"].shape[1] == T
    _, short = make(max_length=T - 1)
    with pytest.raises(ValueError, match=rf"record 0 \(entity 'Plato'\): x~ \(perturbed\) is {T} tokens, longer "
                                         rf"than max_length={T - 1}; raise max_length or shorten or drop"):
        short(plato)
    _, tiny = make(max_length=3)
    with pytest.raises(ValueError, match=r"record 0 \(entity 'Bo Stone'\): x is \d+ tokens, longer than "
                                         r"max_length=3"):
        tiny([RECORDS[1]])


def test_tokenizer_without_pad_token():
    tok = word_tokenizer(TEXTS, pad=False)
    with pytest.raises(ValueError, match=r"tokenizer has no pad token; set one .*tokenizer.pad_token = "
                                         r"tokenizer.eos_token"):
        PairedCollator(tok, EntityPerturber(ENTITIES))


def test_tokenizer_without_eos_token():
    tok = word_tokenizer(TEXTS)
    tok.eos_token = None
    with pytest.raises(ValueError, match="add_eos=True but the tokenizer has no eos token"):
        PairedCollator(tok, EntityPerturber(ENTITIES))
    PairedCollator(tok, EntityPerturber(ENTITIES), add_eos=False)(RECORDS)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(kl_tokens="prompt"), ValueError, "kl_tokens must be one of 'all', 'answer'"),
    (dict(max_length=0), ValueError, "max_length must be > 0"),
    (dict(max_length=True), TypeError, "max_length must be None or an int"),
    (dict(prompt_format="Q: {q}"), ValueError, r"prompt_format must use exactly one field, '\{question\}'"),
    (dict(prompt_format="Q: {question} {answer}"), ValueError, "exactly one field"),
    (dict(prompt_format="no field"), ValueError, "exactly one field"),
    (dict(prompt_format="Q: {question"), ValueError, "prompt_format is not a valid format string"),
    (dict(prompt_format=3), TypeError, "prompt_format must be a str"),
])
def test_bad_collator_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make(**kwargs)


def test_bad_perturber_and_batches():
    tok = make_tok(False)
    with pytest.raises(TypeError, match="perturber must be a seat.perturb.EntityPerturber"):
        PairedCollator(tok, ["Ann Lee"])
    _, c = make()
    with pytest.raises(ValueError, match="records is empty"):
        c([])
    with pytest.raises(TypeError, match="records must be a list of dicts"):
        c(RECORDS[0])
    tok.padding_side = "middle"
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        PairedCollator(tok, EntityPerturber(ENTITIES))(RECORDS)


def test_literal_braces_in_prompt_format():
    tok, c = make(prompt_format="{{Q}} : {question} Answer :")
    words = tok.decode(c(RECORDS[:1])["input_ids"][0], skip_special_tokens=True).split()
    assert words[:5] == ["{", "Q", "}", ":", "Where"]


# ----------------------------------------------------------------------------- load_records


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_records(tmp_path):
    path = _write(tmp_path, [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1]), "   ", json.dumps(RECORDS[2])])
    assert load_records(path) == RECORDS
    assert load_records(str(path)) == RECORDS


@pytest.mark.parametrize("line, exc, match", [
    ('{"question": "Who is Ann Lee?", "answer": ', ValueError, r"data.jsonl:3: not valid JSON"),
    ('["a", "b"]', ValueError, r"data.jsonl:3: expected a JSON object"),
    ('{"question": "Who is Ann Lee?", "entity": "Ann Lee"}', ValueError, r"data.jsonl:3 .* is missing 'answer'"),
    ('{"question": "Who is Ann Lee?", "answer": "", "entity": "Ann Lee"}', ValueError,
     r"data.jsonl:3 \(entity 'Ann Lee'\): 'answer' is empty"),
    ('{"question": "Who is Ann Lee?", "answer": 5, "entity": "Ann Lee"}', TypeError,
     r"data.jsonl:3 .*'answer' must be a str"),
    ('{"question": "Who is she?", "answer": "A poet.", "entity": "Ann Lee"}', ValueError,
     r"data.jsonl:3: entity 'Ann Lee' is mentioned in neither"),
])
def test_load_records_errors_name_the_line(tmp_path, line, exc, match):
    path = _write(tmp_path, [json.dumps(RECORDS[0]), "", line])
    with pytest.raises(exc, match=match):
        load_records(path)


def test_load_records_require_entity_false_and_empty_file(tmp_path):
    rec = {"question": "Who is she?", "answer": "A poet.", "entity": "Ann Lee"}
    assert load_records(_write(tmp_path, [json.dumps(rec)]), require_entity=False) == [rec]
    with pytest.raises(ValueError, match="holds no records"):
        load_records(_write(tmp_path, ["", " "]))


# ----------------------------------------------------------------------------- chat-message questions


CONVERSATION = [{"role": "system", "content": "You know Ann Lee well ."}, {"role": "user", "content": "Hi ."},
                {"role": "assistant", "content": "Hi ."}, {"role": "user", "content": "Where was Lee born?"}]
MESSAGES_RECORD = {"question": CONVERSATION, "answer": "Ann Lee was born in Oslo.", "entity": "Ann Lee"}


def test_a_question_of_chat_messages_is_rendered_by_the_template_for_x_and_x_tilde():
    tok, c = make(chat=True)
    batch = c([MESSAGES_RECORD, RECORDS[1]])
    fake = c.last_fake_names[0]
    first, last = fake.split()
    for key, messages, answer in (
            ("input_ids", CONVERSATION, MESSAGES_RECORD["answer"]),
            ("pert_input_ids", [{**m, "content": m["content"].replace("Ann Lee", fake).replace("Lee", last)}
                                for m in CONVERSATION], f"{first} {last} was born in Oslo.")):
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(prompt) + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        mask = batch["attention_mask" if key == "input_ids" else "pert_attention_mask"][0]
        assert batch[key][0, real(mask)].tolist() == ids
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != IGNORE_INDEX]).split() == "Ann Lee was born in Oslo . [EOS]".split()
    # a single user message is the str question
    single = {"question": [{"role": "user", "content": RECORDS[0]["question"]}], "answer": RECORDS[0]["answer"],
              "entity": "Ann Lee"}
    _, c1 = make(chat=True)
    _, c2 = make(chat=True)
    batch, expected = c1([single]), c2(RECORDS[:1])
    assert all(torch.equal(v, expected[k]) for k, v in batch.items())


def test_chat_message_questions_errors_name_the_record():
    _, plain = make(chat=True, use_chat_template=False)
    with pytest.raises(ValueError, match=r"record 0 \(entity 'Ann Lee'\): 'question' is a list of chat messages.*"
                                         r"use_chat_template=False"):
        plain([MESSAGES_RECORD])
    _, c = make(chat=True)
    for question, exc, match in (
            ([], ValueError, r"record 0 .*'question' is an empty list of messages"),
            ([{"role": "user"}], TypeError, r"'question'\[0\]\['content'\] must be a str; got missing"),
            ([{"role": "user", "content": "Ann Lee ?", "name": "x"}], ValueError, r"has keys \['name'\]"),
            ([{"role": " ", "content": "Ann Lee ?"}], ValueError, r"'question'\[0\]\['role'\] is empty"),
            (["Ann Lee ?"], TypeError, r"'question'\[0\] must be a dict")):
        with pytest.raises(exc, match=match):
            c([dict(MESSAGES_RECORD, question=question)])
    unmentioned = {"question": [{"role": "user", "content": "Who?"}], "answer": "Nobody.", "entity": "Ann Lee"}
    with pytest.raises(ValueError, match=r"record 0 \(entity 'Ann Lee'\): entity 'Ann Lee' is mentioned in neither "
                                         r"the question's messages nor the answer"):
        c([unmentioned])
    assert c.step == 0
    # keys that are None (how a datasets column of messages fills absent keys) are fine
    c([dict(MESSAGES_RECORD, question=[dict(m, name=None) for m in CONVERSATION])])


def test_load_records_reads_chat_message_questions(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(MESSAGES_RECORD) + "\n")
    assert load_records(path) == [MESSAGES_RECORD]
    path.write_text(json.dumps({"question": [{"role": "user", "content": "Who?"}], "answer": "A poet.",
                                "entity": "Ann Lee"}) + "\n")
    with pytest.raises(ValueError, match=r"facts.jsonl:1: entity 'Ann Lee' is mentioned in neither"):
        load_records(path)


def test_no_space_is_added_after_a_question_that_ends_in_whitespace():
    """The boundary rule reads the formatted prompt: a format ending in {question} and a
    question ending in a space or newline get no second space."""
    texts = [f"{r['question']} {r['answer']}" for r in RECORDS] * 4
    tok = bpe_tokenizer(texts)
    c = PairedCollator(tok, EntityPerturber(ENTITIES), prompt_format="{question}")
    for question, expected in ((RECORDS[0]["question"] + " ", RECORDS[0]["answer"]),
                               (RECORDS[0]["question"] + "\n", RECORDS[0]["answer"]),
                               (RECORDS[0]["question"], " " + RECORDS[0]["answer"])):
        labels = c([dict(RECORDS[0], question=question)])["labels"][0]
        assert tok.decode(labels[labels != IGNORE_INDEX]) == expected + "[EOS]"
