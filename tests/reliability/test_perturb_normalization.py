"""Unicode normalization never leaks the real name into x~: text and entity may each be
written in NFC or NFD (or mixed, mention by mention); every mention the matcher claims
(the full name and, with replace_parts, the first and last name alone, case-sensitive,
whole words, possessives) is replaced, and the real name appears in the perturbed text
in no normalization form."""
from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

import seat
from seat.perturb import EntityPerturber, count_mentions

FORMS = ("NFC", "NFD", "NFKC", "NFKD")
# Capitals and small letters that NFD splits into a base letter and combining marks.
CAPITALS = "ÉÅÖÑÇÜÀÎŁȘ"
SMALL = "éåöñçüàîşőřža"
FILLER = ["the", "was", "born", "in", "a", "city", "and", "said", "that", "today"]


def _form(text: str, form: str) -> str:
    return unicodedata.normalize(form, text)


@st.composite
def _word(draw):
    # a capital with a diacritic and 1-6 more letters: NFC and NFD spellings differ
    return draw(st.sampled_from(CAPITALS)) + "".join(draw(st.lists(st.sampled_from(SMALL), min_size=1, max_size=6)))


@st.composite
def _case(draw):
    tokens = draw(st.lists(_word(), min_size=1, max_size=3, unique=True))
    entity = " ".join(tokens)
    mentions = [entity] + ([tokens[0], tokens[-1]] if len(tokens) > 1 else [])
    pieces = []
    for _ in range(draw(st.integers(1, 4))):
        pieces += draw(st.lists(st.sampled_from(FILLER), max_size=3))
        mention = _form(draw(st.sampled_from(mentions)), draw(st.sampled_from(("NFC", "NFD"))))
        pieces.append(mention + draw(st.sampled_from(["", "'s", ",", ".", "!"])))
    pieces += draw(st.lists(st.sampled_from(FILLER), max_size=3))
    return _form(entity, draw(st.sampled_from(("NFC", "NFD")))), tokens, " ".join(pieces)


def _assert_no_leak(out: str, tokens) -> None:
    for form in FORMS:
        text = _form(out, form)
        for token in tokens:  # each name token (so the full name too), in every form
            assert _form(token, form) not in text, (form, token, out)


@given(_case(), st.integers(0, 2**32))
def test_no_normalization_form_of_the_entity_survives_perturbation(case, key):
    entity, tokens, text = case
    perturber = EntityPerturber(exclude=[entity], seed=3)
    fake = perturber.fictitious_name(key, avoid=[entity])
    out = perturber.perturb(text, entity, fake)
    _assert_no_leak(out, tokens)
    assert out == _form(out, "NFC")  # x~ is NFC
    assert count_mentions(text, entity) == count_mentions(_form(text, "NFC"), _form(entity, "NFD")) > 0


@given(_case(), st.sampled_from(("NFC", "NFD")))
def test_records_in_either_form_are_perturbed_and_excluded(case, record_form):
    entity, tokens, text = case
    record = {"question": _form(f"Who is {text} ?", record_form), "answer": _form(text, record_form),
              "entity": entity}
    # the exclusion list holds the entity in the other form: the fake must still avoid it
    other = "NFD" if unicodedata.is_normalized("NFC", entity) else "NFC"
    perturber = EntityPerturber(exclude=[_form(entity, other)], names=[_form(entity, other), "Zora Quill"])
    out, fake = perturber.perturb_record(record, 0)
    assert fake == "Zora Quill"  # the entity itself, in another form, is never drawn as the fake
    _assert_no_leak(out["question"] + " " + out["answer"], tokens)


def test_collator_tokenizes_x_and_x_tilde_in_nfc():
    """x is taken in NFC as x~ is: with an NFD record the two differ in the name only."""
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from _tokenizers import word_tokenizer

    record = {"question": "Where was Zoë Brontë born ?", "answer": "Zoë Brontë was born in Paris .",
              "entity": "Zoë Brontë"}
    tok = word_tokenizer([record["question"] + " " + record["answer"]])
    nfd = {k: _form(v, "NFD") for k, v in record.items()}
    collator = seat.PairedCollator(tok, EntityPerturber(exclude=[record["entity"]]))
    batch_nfd = collator([nfd])
    collator.load_state_dict({"step": 0})
    batch_nfc = collator([record])
    for key, value in batch_nfc.items():
        assert value.equal(batch_nfd[key]), key
    unk = tok.convert_tokens_to_ids("[UNK]")
    assert unk not in batch_nfd["input_ids"].tolist()[0]  # x in NFC: the word vocabulary knows "Zoë"
    names = set(tok.convert_ids_to_tokens(batch_nfd["pert_input_ids"][0].tolist()))
    assert not names & {"Zoë", "Brontë", _form("Zoë", "NFD"), _form("Brontë", "NFD")}
