"""The demo's world: deterministic, disjoint name sets, a tokenizer that saves and reloads."""
from __future__ import annotations

import pytest

from seat.demo.world import (ATTRIBUTES, GROUPS, IDK_ANSWER, PROMPT_FORMAT, WorldConfig, build_tokenizer,
                             load_world, make_world, save_world)
from seat.perturb import FIRST_NAMES, LAST_NAMES, EntityPerturber


def _names(world, group):
    return [p["name"] for p in world.people[group]]


def test_same_seed_same_world_and_other_seed_other_world():
    assert make_world(3).to_json() == make_world(3).to_json()
    assert make_world(3).fingerprint() != make_world(4).fingerprint()


@pytest.mark.parametrize("config", [WorldConfig(), WorldConfig.quick()])
def test_name_sets_are_disjoint_down_to_the_name_tokens(config):
    world = make_world(0, config)
    sizes = {"known": config.n_known, "unknown_train": config.n_unknown_train,
             "unknown_eval": config.n_unknown_eval, "unknown_alt": config.n_unknown_alt, "new": config.n_new}
    tokens = {}
    for group in GROUPS:
        assert len(_names(world, group)) == sizes[group]
        parts = 3 if group == "unknown_alt" else 2  # the other generator: three-part names
        assert all(len(n.split()) == parts for n in _names(world, group))
        tokens[group] = {t for n in _names(world, group) for t in n.split()}
        assert len(tokens[group]) == parts * sizes[group]  # no name token repeats, even inside a group
    for i, a in enumerate(GROUPS):
        for b in GROUPS[i + 1:]:
            assert not tokens[a] & tokens[b], (a, b)
    every = set().union(*tokens.values())
    assert not every & {n for n in (*FIRST_NAMES, *LAST_NAMES)}  # perturbation names stay unfamiliar


def test_records_cover_every_attribute_and_refuse_only_on_unknown_train():
    world = make_world(0, WorldConfig.quick())
    base = world.base_records()
    known = [r for r in base if r["group"] == "known"]
    refusals = [r for r in base if r["group"] == "unknown_train"]
    assert len(known) == world.config.n_known * len(ATTRIBUTES) * 3  # every wording
    assert all(r["answer"] != IDK_ANSWER and r["value"] in r["answer"] for r in known)
    assert refusals and all(r["answer"] == IDK_ANSWER for r in refusals)
    train_names = {r["entity"] for r in base}
    held_out = set(_names(world, "unknown_eval")) | set(_names(world, "unknown_alt")) | set(_names(world, "new"))
    assert not train_names & held_out
    ft = world.finetune_records()
    assert {r["entity"] for r in ft} == set(_names(world, "new"))
    assert all(r["answer"] != IDK_ANSWER for r in ft)
    questions = world.eval_questions()
    assert {q["group"] for q in questions} == {"unknown", "unknown_alt", "unknown_wording", "new", "new_wording",
                                               "known"}
    # the held-out wording: in the base data, never in fine-tuning, and what the *_wording groups ask
    wording = lambda q: q["question"].replace(q["entity"], "{name}")  # noqa: E731
    ft_wordings = {wording(r) for r in ft}
    held_out_wordings = {wording(q) for q in questions if q["group"].endswith("_wording")}
    assert held_out_wordings and not held_out_wordings & ft_wordings
    assert held_out_wordings <= {wording(r) for r in base}
    assert all(wording(q) in ft_wordings for q in questions if q["group"] in ("unknown", "unknown_alt", "new"))


def test_world_round_trips_through_json(tmp_path):
    world = make_world(1, WorldConfig.quick())
    save_world(world, tmp_path / "world.json")
    assert load_world(tmp_path / "world.json").to_json() == world.to_json()


def test_tokenizer_saves_reloads_and_covers_the_world(tmp_path):
    transformers = pytest.importorskip("transformers")
    world = make_world(0, WorldConfig.quick())
    tok = build_tokenizer(world)
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tok)
    records = world.base_records() + world.finetune_records() + world.eval_questions()
    perturber = EntityPerturber(exclude=[r["entity"] for r in world.finetune_records()])
    fakes = [perturber.fictitious_name(k) for k in range(20)]
    texts = [PROMPT_FORMAT.format(question=r["question"]) + " " + r["answer"] for r in records] + fakes
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == again(text)["input_ids"]
        assert tok.unk_token_id not in ids, text
    assert again.decode(again(IDK_ANSWER, add_special_tokens=False)["input_ids"]) == "I don ' t know ."
    assert (again.pad_token, again.eos_token, again.bos_token) == ("[PAD]", "[EOS]", "[BOS]")


def test_known_repeats_repeat_the_known_facts_only():
    world = make_world(0, WorldConfig.quick())
    once, four = world.base_records(), world.base_records(known_repeats=4)
    known = [r for r in once if r["group"] == "known"]
    assert [r for r in four if r["group"] == "known"] == known * 4
    assert [r for r in four if r["group"] != "known"] == [r for r in once if r["group"] != "known"]
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="known_repeats"):
            world.base_records(known_repeats=bad)
