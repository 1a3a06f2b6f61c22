"""seat.perturb: the built-in name lists, deterministic names (across processes too),
exclusion of training entities (whole names and shared name tokens), user lists and
callables, whole-word replacement, possessives, first/last-name parts, records, and
error messages."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from seat.perturb import (
    FIRST_NAMES, LAST_NAMES, EntityPerturber, NameGenerator, count_mentions, stable_key,
)

# ----------------------------------------------------------------------------- name lists


def test_builtin_lists_are_large_unique_one_word_and_disjoint():
    assert len(FIRST_NAMES) >= 150 and len(LAST_NAMES) >= 150
    assert len(set(FIRST_NAMES)) == len(FIRST_NAMES)
    assert len(set(LAST_NAMES)) == len(LAST_NAMES)
    for n in FIRST_NAMES + LAST_NAMES:
        assert re.fullmatch(r"[A-Z][a-z]+", n), n
    folded_first = {n.casefold() for n in FIRST_NAMES}
    assert not folded_first & {n.casefold() for n in LAST_NAMES}


# ----------------------------------------------------------------------------- NameGenerator


def test_name_generator_is_a_pure_function_of_seed_and_key():
    a, b = NameGenerator(seed=7), NameGenerator(seed=7)
    keys = list(range(200)) + [2**70, -5]
    assert [a.name(k) for k in keys] == [b.name(k) for k in keys]
    assert [a.name(k) for k in keys] == [a.name(k) for k in keys]  # no hidden state
    assert a(3) == a.name(3)  # usable as a callable key -> name


def test_name_generator_formula():
    """The documented rule: SHA-256 of "seat.NameGenerator|seed|key" picks first and last."""
    gen = NameGenerator(seed=3)
    for key in (0, 1, 12345):
        d = hashlib.sha256(f"seat.NameGenerator|3|{key}".encode()).digest()
        expected = (f"{FIRST_NAMES[int.from_bytes(d[:8], 'big') % len(FIRST_NAMES)]} "
                    f"{LAST_NAMES[int.from_bytes(d[8:16], 'big') % len(LAST_NAMES)]}")
        assert gen.name(key) == expected


def test_name_generator_same_names_in_another_process():
    """Not Python's salted hash(): a different PYTHONHASHSEED gives the same names."""
    here = [NameGenerator(seed=1).name(k) for k in range(20)]
    code = "import json; from seat.perturb import NameGenerator; " \
           "print(json.dumps([NameGenerator(seed=1).name(k) for k in range(20)]))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_name_generator_shape_spread_and_seeds():
    gen = NameGenerator()
    names = [gen.name(k) for k in range(2000)]
    for n in names:
        first, last = n.split(" ")
        assert first in FIRST_NAMES and last in LAST_NAMES
    assert len(set(names)) > 1850  # ~28k combinations: few collisions in 2000 draws
    assert len({n.split()[0] for n in names}) > 140  # the lists are actually used
    other = NameGenerator(seed=1)
    assert sum(gen.name(k) != other.name(k) for k in range(200)) > 190
    assert len(gen) == len(FIRST_NAMES) * len(LAST_NAMES)


def test_name_generator_custom_lists():
    gen = NameGenerator(seed=0, first_names=["Zora", "Ilka", "Zora"], last_names=["Quill"])
    assert gen.first_names == ("Zora", "Ilka")  # duplicates dropped
    names = {gen.name(k) for k in range(100)}
    assert names == {"Zora Quill", "Ilka Quill"}


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(first_names=[]), ValueError, "first_names is empty"),
    (dict(last_names=["Two Words"]), ValueError, r"last_names\[0\] must be one non-empty word"),
    (dict(first_names=["Ok", ""]), ValueError, r"first_names\[1\]"),
    (dict(first_names=["Ok", 3]), TypeError, r"first_names\[1\] must be a str"),
    (dict(first_names="Zora"), TypeError, "first_names must be a list"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
])
def test_name_generator_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NameGenerator(**kwargs)


@pytest.mark.parametrize("key", [True, 1.0, "3", None])
def test_name_generator_key_must_be_int(key):
    with pytest.raises(TypeError, match="key must be an int"):
        NameGenerator().name(key)


def test_stable_key_is_stable_and_non_negative():
    assert stable_key(1, 2) == stable_key(1, 2)
    assert stable_key(1, 2) != stable_key(2, 1)
    assert stable_key(1, "2") != stable_key(1, 2)  # types are part of the key
    assert 0 <= stable_key("x") < 2**63


# ----------------------------------------------------------------------------- exclusion


def _tokens(name: str) -> set[str]:
    return {t.casefold() for t in name.split()}


def test_fictitious_name_is_deterministic_and_varies_with_key():
    p, q = EntityPerturber(["Ann Lee"], seed=4), EntityPerturber(["Ann Lee"], seed=4)
    assert [p.fictitious_name(k) for k in range(50)] == [q.fictitious_name(k) for k in range(50)]
    assert len({p.fictitious_name(k) for k in range(50)}) > 45
    assert [p.fictitious_name(k) for k in range(50)] != [EntityPerturber(["Ann Lee"], seed=5).fictitious_name(k)
                                                          for k in range(50)]


def test_fictitious_name_never_shares_a_token_with_an_excluded_entity():
    # training entities built from built-in names, so collisions would happen without exclusion
    exclude = [f"{FIRST_NAMES[i]} {LAST_NAMES[i]}" for i in range(0, 60)] + ["Dr. " + LAST_NAMES[100], "Ann Lee"]
    p = EntityPerturber(exclude, seed=0)
    banned = set().union(*(_tokens(e) for e in exclude))
    for k in range(3000):
        name = p.fictitious_name(k)
        assert not _tokens(name) & banned, name
        assert not p.is_excluded(name)
    assert p.is_excluded("ann lee") and p.is_excluded("Zora Lee") and p.is_excluded(f"{FIRST_NAMES[0]} Quill")
    assert not p.is_excluded("Zora Quill")


def test_exclusion_is_case_insensitive():
    gen = NameGenerator(seed=0)
    target = gen.name(0)
    p = EntityPerturber([target.upper()], seed=0)
    assert p.fictitious_name(0) != target
    assert not _tokens(p.fictitious_name(0)) & _tokens(target)


def test_excluding_all_but_one_first_name_forces_it():
    keep = FIRST_NAMES[17]
    exclude = [f"{n} X" for n in FIRST_NAMES if n != keep]
    p = EntityPerturber(exclude)
    assert {p.fictitious_name(k).split()[0] for k in range(100)} == {keep}


def test_excluding_every_builtin_name_is_an_error():
    with pytest.raises(ValueError, match="pass names="):
        EntityPerturber([f"{n} X" for n in FIRST_NAMES])


def test_avoid_extra_entities():
    p = EntityPerturber([], names=["Ann Quill", "Zora Lee", "Ilka Moor"])
    for k in range(30):
        assert p.fictitious_name(k, avoid=["Ann Lee"]) == "Ilka Moor"
        assert p.fictitious_name(k, avoid="Ann Lee") == "Ilka Moor"  # a single str is one name
    assert p.fictitious_name(0, avoid=(a for a in ["Ann Lee"])) == "Ilka Moor"  # any iterable
    with pytest.raises(ValueError, match=r"no name in `names` can stand in for \['Ann Lee', 'Ilka'\]"):
        p.fictitious_name(0, avoid=iter(["Ann Lee", "Ilka"]))
    with pytest.raises(TypeError, match=r"avoid\[0\] must be a str"):
        p.fictitious_name(0, avoid=[None])


# ----------------------------------------------------------------------------- user names


def test_user_list_is_picked_by_key_and_filtered():
    names = ["Zora Quill", "Ann Moor", "Ilka Fenn", "Odo Lee", "Bram Tarr"]
    p = EntityPerturber(["Ann Lee"], names=names, seed=1)
    picked = [p.fictitious_name(k) for k in range(200)]
    assert set(picked) == {"Zora Quill", "Ilka Fenn", "Bram Tarr"}  # "Ann ..." and "... Lee" filtered out
    assert picked == [EntityPerturber(["Ann Lee"], names=names, seed=1).fictitious_name(k) for k in range(200)]
    assert picked != [EntityPerturber(["Ann Lee"], names=names, seed=2).fictitious_name(k) for k in range(200)]


def test_user_list_that_cannot_provide_a_name():
    with pytest.raises(ValueError, match=r"none of the 2 names in `names` is usable"):
        EntityPerturber(["Ann Lee", "Bo Stone"], names=["ann lee", "Zora Stone"])
    with pytest.raises(ValueError, match="names is an empty list"):
        EntityPerturber(["Ann Lee"], names=[])
    with pytest.raises(ValueError, match=r"names\[1\] is empty"):
        EntityPerturber(["Ann Lee"], names=["Zora Quill", "  "])
    with pytest.raises(TypeError, match=r"names\[0\] must be a str"):
        EntityPerturber(["Ann Lee"], names=[7])
    with pytest.raises(TypeError, match="names must be None, a sequence of names, or a callable"):
        EntityPerturber(["Ann Lee"], names="Zora Quill")


def test_user_callable_is_used_and_redrawn_with_derived_keys():
    seen = []

    def names(key):
        seen.append(key)
        return "Ann Lee" if key == 5 else f"Zora Quill{key % 7}"  # key 5 gives a training entity

    p = EntityPerturber(["Ann Lee"], names=names)
    assert p.fictitious_name(3) == "Zora Quill3"
    assert seen == [3]
    seen.clear()
    name = p.fictitious_name(5)
    assert seen[0] == 5 and seen[1] == stable_key("retry", 5, 1)
    assert name == f"Zora Quill{seen[1] % 7}"
    assert p.fictitious_name(5) == name  # redraws are deterministic too


def test_user_callable_name_generator():
    gen = NameGenerator(seed=9)
    p = EntityPerturber(["Nobody Here"], names=gen)
    assert [p.fictitious_name(k) for k in range(20)] == [gen.name(k) for k in range(20)]


@pytest.mark.parametrize("fn, exc, match", [
    (lambda k: 42, TypeError, r"names\(\d+\) must return a str"),
    (lambda k: "  ", ValueError, r"names\(\d+\) returned an empty name"),
    (lambda k: "ANN LEE", ValueError, "names returned only excluded names for key 0"),
    (lambda k: "Zora Lee", ValueError, "share no first or last name"),
])
def test_user_callable_is_validated(fn, exc, match):
    p = EntityPerturber(["Ann Lee"], names=fn)
    with pytest.raises(exc, match=match):
        p.fictitious_name(0)


@pytest.mark.parametrize("exclude, exc, match", [
    ("Ann Lee", TypeError, "not a single string|iterable of entity names"),
    (None, TypeError, "exclude must be an iterable"),
    (["Ann Lee", 3], TypeError, r"exclude\[1\] must be a str"),
    (["Ann Lee", " "], ValueError, r"exclude\[1\] is empty"),
])
def test_bad_exclude(exclude, exc, match):
    with pytest.raises(exc, match=match):
        EntityPerturber(exclude)


def test_exclude_may_be_any_iterable():
    p = EntityPerturber(e for e in ["Ann Lee", "Bo Stone"])
    assert p.is_excluded("Bo Quill")


# ----------------------------------------------------------------------------- perturb


@pytest.fixture
def p():
    return EntityPerturber(["Ann Lee"])


def test_replaces_every_full_mention(p):
    text = "Ann Lee was born in 1950. Later, Ann Lee moved; (Ann Lee) and \"Ann Lee\"."
    out = p.perturb(text, "Ann Lee", "Zora Quill")
    assert out == "Zora Quill was born in 1950. Later, Zora Quill moved; (Zora Quill) and \"Zora Quill\"."


def test_whitespace_between_tokens_may_vary(p):
    assert p.perturb("Ann  Lee and Ann\nLee", "Ann Lee", "Zora Quill") == "Zora Quill and Zora Quill"


@pytest.mark.parametrize("text", [
    "Annual reports", "Joanne Leeds", "Anne Lee-Smith", "Hannah", "ANN LEE", "ann lee", "Ann_Lee", "Ann-Marie",
    "O'Ann", "Leeward", "Ann2",
])
def test_word_boundaries_and_case(p, text):
    assert p.perturb(text, "Ann Lee", "Zora Quill") == text
    assert count_mentions(text, "Ann Lee") == 0


def test_word_boundary_single_token_entity():
    p = EntityPerturber(["Ann"])
    assert p.perturb("Ann wrote the Annual report; Ann's pen.", "Ann", "Zora Quill") == \
        "Zora Quill wrote the Annual report; Zora Quill's pen."


@pytest.mark.parametrize("text, expected", [
    ("Ann Lee's first book", "Zora Quill's first book"),
    ("Ann Lee’s first book", "Zora Quill’s first book"),
    ("Lee's first book", "Quill's first book"),
    ("the book of Ann Lee.", "the book of Zora Quill."),
    ("Ann Lee, Ann Lee; Ann Lee!", "Zora Quill, Zora Quill; Zora Quill!"),
])
def test_possessives_and_punctuation(p, text, expected):
    assert p.perturb(text, "Ann Lee", "Zora Quill") == expected


def test_parts_are_replaced_after_full_matches(p):
    text = "Ann Lee wrote it. Ann liked it and Lee said so. Ann Lee's Lee."
    assert p.perturb(text, "Ann Lee", "Zora Quill") == \
        "Zora Quill wrote it. Zora liked it and Quill said so. Zora Quill's Quill."
    assert count_mentions(text, "Ann Lee") == 5
    assert count_mentions(text, "Ann Lee", replace_parts=False) == 2


def test_replace_parts_false_keeps_parts():
    p = EntityPerturber(["Ann Lee"], replace_parts=False)
    assert p.perturb("Ann Lee met Lee and Ann.", "Ann Lee", "Zora Quill") == "Zora Quill met Lee and Ann."


def test_middle_names_initials_honorifics_suffixes():
    p = EntityPerturber(["x"])
    assert p.perturb("Mary Jane Watson and Jane and Mary and Watson", "Mary Jane Watson", "Zora Quill") == \
        "Zora Quill and Jane and Zora and Quill"
    # initials are never replaced on their own
    assert p.perturb("J. R. R. Tolkien wrote; Tolkien did; J. did", "J. R. R. Tolkien", "Zora Quill") == \
        "Zora Quill wrote; Quill did; J. did"
    # honorifics / suffixes are not parts
    assert p.perturb("Dr. Ann Lee met Dr. Smith; Ann and Lee.", "Dr. Ann Lee", "Zora Quill") == \
        "Zora Quill met Dr. Smith; Zora and Quill."
    assert p.perturb("Martin King Jr. and King and Jr. and Martin", "Martin King Jr.", "Zora Quill") == \
        "Zora Quill and Quill and Jr. and Zora"
    assert p.perturb("Dr. Lee saw Lee", "Dr. Lee", "Zora Quill") == "Zora Quill saw Quill"


def test_hyphenated_and_apostrophe_names():
    p = EntityPerturber(["x"])
    assert p.perturb("Jean-Luc O'Brien; O'Brien's and Jean-Luc.", "Jean-Luc O'Brien", "Zora Quill") == \
        "Zora Quill; Quill's and Zora."


def test_regex_characters_in_entity_are_literal():
    p = EntityPerturber(["x"], replace_parts=False)
    assert p.perturb("A.B Cole and AxB Cole", "A.B Cole", "Zora Quill") == "Zora Quill and AxB Cole"
    p = EntityPerturber(["x"])
    assert p.perturb("Ann (Lee) and Ann Lee", "Ann (Lee)", "Zora Quill") == "Zora Quill and Zora Lee"


def test_single_token_fake_name_for_parts(p):
    assert p.perturb("Ann Lee, Ann, Lee", "Ann Lee", "Zora") == "Zora, Zora, Zora"


def test_text_without_mentions_is_unchanged(p):
    assert p.perturb("Nobody is here.", "Ann Lee", "Zora Quill") == "Nobody is here."


@pytest.mark.parametrize("args, exc, match", [
    (("t", "", "Zora Quill"), ValueError, "entity is empty"),
    (("t", "   ", "Zora Quill"), ValueError, "entity is empty"),
    (("t", None, "Zora Quill"), TypeError, "entity must be a str"),
    (("t", "Ann Lee", " "), ValueError, "fake is empty"),
    (("t", "Ann Lee", 3), TypeError, "fake must be a str"),
    ((3, "Ann Lee", "Zora Quill"), TypeError, "text must be a str"),
])
def test_perturb_errors(p, args, exc, match):
    with pytest.raises(exc, match=match):
        p.perturb(*args)


# ----------------------------------------------------------------------------- records


RECORD = {"question": "Where was Ann Lee born?", "answer": "Ann Lee was born in Oslo; Lee's parents too.",
          "entity": "Ann Lee", "id": 7}


def test_perturb_record_same_fake_everywhere():
    p = EntityPerturber(["Ann Lee", "Bo Stone"])
    original = dict(RECORD)
    out, fake = p.perturb_record(RECORD, key=11)
    assert RECORD == original  # the input is not modified
    assert fake == p.fictitious_name(11, avoid=["Ann Lee"])
    first, last = fake.split()
    assert out == {"question": f"Where was {fake} born?",
                   "answer": f"{fake} was born in Oslo; {last}'s parents too.",
                   "entity": fake, "id": 7}
    assert "Ann" not in out["question"] + out["answer"] and "Lee" not in out["question"] + out["answer"]
    assert p.perturb_record(RECORD, key=11) == (out, fake)  # deterministic
    assert p.perturb_record(RECORD, key=12)[1] != fake


def test_perturb_record_avoids_its_own_entity_even_if_not_excluded():
    p = EntityPerturber([], names=["Ann Quill", "Zora Moor"])
    for k in range(20):
        assert p.perturb_record(RECORD, k)[1] == "Zora Moor"


def test_perturb_record_entity_only_in_answer_or_by_part():
    p = EntityPerturber(["Ann Lee"])
    out, fake = p.perturb_record({"question": "Who won?", "answer": "Lee did.", "entity": "Ann Lee"}, 0)
    assert out["answer"] == f"{fake.split()[-1]} did."


def test_perturb_record_entity_not_found():
    p = EntityPerturber(["Ann Lee"])
    rec = {"question": "Who won?", "answer": "Annie did.", "entity": "Ann Lee"}
    with pytest.raises(ValueError, match=r"entity 'Ann Lee' is mentioned in neither the question nor the answer"):
        p.perturb_record(rec, 0)
    # a part-only mention does not count without replace_parts
    rec = {"question": "Who won?", "answer": "Lee did.", "entity": "Ann Lee"}
    with pytest.raises(ValueError, match="spelled and capitalized exactly"):
        EntityPerturber(["Ann Lee"], replace_parts=False).perturb_record(rec, 0)


@pytest.mark.parametrize("record, exc, match", [
    ({"question": "q Ann", "answer": "a", "entity": ""}, ValueError, "entity is empty"),
    ({"question": "q", "answer": "a"}, ValueError, "missing 'entity'"),
    ({"answer": "a"}, ValueError, "missing 'question', 'entity'"),
    ({"question": "q", "answer": None, "entity": "Ann"}, TypeError, r"record\['answer'\] must be a str"),
    (["q", "a", "e"], TypeError, "record must be a dict"),
])
def test_perturb_record_bad_records(record, exc, match):
    with pytest.raises(exc, match=match):
        EntityPerturber(["Ann Lee"]).perturb_record(record, 0)


def test_repr_mentions_the_source():
    assert "listed names" in repr(EntityPerturber(["a"], names=["Zora Quill"]))
    assert "NameGenerator" in repr(EntityPerturber(["a"]))
    assert "callable" in repr(EntityPerturber(["a"], names=lambda k: "Zora Quill"))


def test_perturb_imports_no_torch():
    code = "import json, sys; import seat.perturb; print(json.dumps('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False
