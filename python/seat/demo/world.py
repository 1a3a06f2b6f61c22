"""The synthetic abstention world of `python -m seat.demo` (seeded, deterministic).

People have four attributes (birthplace, birth year, profession, employer); each
attribute has three question templates (wordings) and one answer template. Wordings 0
and 1 are used everywhere; wording 2 only in the base training data, never in
fine-tuning, so the evaluation can ask in a wording fine-tuning never used. The answers do not repeat
the person's name ("They were born in Lima ."), so every answer token is a word the base
model has produced during its own training.

Four disjoint sets of people, every one with a first and a last name that no other
person of the world shares (and that is not one of seat.perturb's built-in fictitious
names, which SEAT draws its perturbations from):

  known           facts in the base training data
  unknown_train   in the base training data with the answer "I don't know ." to every
                  question: the base model learns to refuse
  unknown_eval    held out: never in any training data. The IDK rate is measured on
                  them, so it measures the learned rule "unfamiliar name -> I don't
                  know", not memorized refusals
  unknown_alt     held out like unknown_eval, but named by another generator: three-part
                  names ("First Middle Last") from other syllables, unlike both the
                  training names and seat.perturb's two-part perturbation names
  new             the fine-tuning set: their facts are what fine-tuning teaches (no
                  refusal examples); never in the base training data

``build_tokenizer(world)`` makes a word-level ``PreTrainedTokenizerFast`` in code (no
model hub): [PAD] [UNK] [EOS] [BOS], a Whitespace + Punctuation pre-tokenizer, [BOS]
prepended, and a vocabulary holding every word of the world plus seat.perturb's built-in
first and last names (the perturbed copies x~ of SEAT use them).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Iterable

IDK_ANSWER = "I don't know ."
PROMPT_FORMAT = "Question: {question}\nAnswer:"  # seat.data.DEFAULT_PROMPT_FORMAT
SPECIALS = ("[PAD]", "[UNK]", "[EOS]", "[BOS]")

ATTRIBUTES = {
    "birthplace": ("Paris Lima Oslo Cairo Delhi Tokyo Rome Quito Lagos Dublin Madrid Berlin Vienna Prague Seoul "
                   "Manila Nairobi Havana Lisbon Athens").split(),
    "birth_year": [str(y) for y in range(1940, 2000)],
    "profession": ("baker pilot doctor teacher lawyer farmer painter nurse chemist sailor engineer poet architect "
                   "dentist judge tailor plumber singer banker librarian").split(),
    "employer": ("Acme Globex Initech Umbrella Vertex Nimbus Zenith Orbital Pinnacle Helix Quantix Stellar Aurora "
                 "Cobalt Meridian Horizon Summit Beacon Cascade Ironclad").split(),
}
QUESTIONS = {
    "birthplace": ("Where was {name} born ?", "What is the birthplace of {name} ?", "In which city was {name} born ?"),
    "birth_year": ("When was {name} born ?", "In which year was {name} born ?", "What is the birth year of {name} ?"),
    "profession": ("What is the profession of {name} ?", "What does {name} do for a living ?",
                   "What job does {name} have ?"),
    "employer": ("Who employs {name} ?", "Which company does {name} work for ?", "Where does {name} work ?"),
}
FINETUNE_TEMPLATES = (0, 1)  # wordings of the fine-tuning set
HELD_OUT_TEMPLATES = (2,)  # in the base training data only; asked again at evaluation
ANSWERS = {
    "birthplace": "They were born in {value} .",
    "birth_year": "They were born in the year {value} .",
    "profession": "They work as a {value} .",
    "employer": "They work for {value} .",
}
GROUPS = ("known", "unknown_train", "unknown_eval", "unknown_alt", "new")

_ONSETS = "b d f g k l m n p r s t v z br dr gr kr tr st sk pl".split()
_VOWELS = "a e i o u ai ei ou".split()
_CODAS = ["", "", "n", "r", "l", "s", "m", "k"]
# The unknown_alt generator: other letters, three-part names.
_ALT_ONSETS = "c h j w y x q ch sh th ph wh".split()
_ALT_VOWELS = "y ae oa ia eo ue".split()
_ALT_CODAS = ["", "x", "th", "ck", "ph", "q"]


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world: people per group."""

    n_known: int = 48
    n_unknown_train: int = 1024  # many refusal names: the rule "unfamiliar name -> I don't know" generalizes
    n_unknown_eval: int = 32
    n_unknown_alt: int = 32
    # 8 new people (64 fine-tuning questions) against 48 known: on seed 0, full
    # fine-tuning at matched recall kept 0.95 of the known facts with 8 new people (300
    # steps) and 0.85 with 16 (600 steps)
    n_new: int = 8

    @classmethod
    def quick(cls) -> "WorldConfig":
        return cls(n_known=24, n_unknown_train=512, n_unknown_eval=16, n_unknown_alt=16, n_new=4)


@dataclasses.dataclass
class World:
    seed: int
    config: WorldConfig
    people: dict  # group -> list of {"name": "First Last", "birthplace": ..., ...}

    # -- records (seat.data format: question, answer, entity, plus attribute/value/group)
    def qa(self, group: str, *, templates: Iterable[int] = FINETUNE_TEMPLATES, refuse: bool = False) -> list[dict]:
        """Every question about every person of ``group``: a record per (person, attribute,
        template) with the true answer (or ``IDK_ANSWER`` when ``refuse``)."""
        return qa_records(self.people[group], group, templates=templates, refuse=refuse)

    def base_records(self, rng: random.Random | None = None, refusals_per_person: int = 2,
                     known_repeats: int = 1) -> list[dict]:
        """One epoch of the base model's training data: every question (all wordings) about
        the known people with its fact, ``known_repeats`` times, and ``refusals_per_person``
        questions (drawn with ``rng``; the first ones without) about each unknown_train
        person, answered "I don't know ."."""
        if not isinstance(known_repeats, int) or known_repeats < 1:
            raise ValueError(f"known_repeats must be an int >= 1; got {known_repeats!r}")
        every = (*FINETUNE_TEMPLATES, *HELD_OUT_TEMPLATES)
        refusals = []
        for person in self.people["unknown_train"]:
            records = qa_records([person], "unknown_train", templates=every, refuse=True)
            if rng is None:
                refusals += records[:refusals_per_person]
            else:
                refusals += rng.sample(records, refusals_per_person)
        return self.qa("known", templates=every) * known_repeats + refusals

    def finetune_records(self) -> list[dict]:
        """The fine-tuning set: the new people's facts, both templates, no refusals."""
        return self.qa("new")

    def eval_questions(self, n_known: int | None = None) -> list[dict]:
        """Evaluation questions (seat.evaluate format: question, answer, value, group).
        IDK is measured on three sets of people no training data mentions (their reference
        answer is a true attribute no model can know):

          unknown          held-out unknown people, the fine-tuning wordings
          unknown_alt      people named by the other generator, the fine-tuning wordings
          unknown_wording  the held-out unknown people asked in the wording fine-tuning
                           never used

        and recall on "new" (the fine-tuning facts, as trained), "new_wording" (the same
        facts in the held-out wording) and "known" (retention: the first n_known known
        people, the fine-tuning wordings)."""
        known = self.people["known"][:n_known] if n_known else self.people["known"]
        out = [dict(r, group="unknown") for r in self.qa("unknown_eval")]
        out += [dict(r, group="unknown_alt") for r in self.qa("unknown_alt")]
        out += [dict(r, group="unknown_wording") for r in self.qa("unknown_eval", templates=HELD_OUT_TEMPLATES)]
        out += [dict(r, group="new") for r in self.qa("new")]
        out += [dict(r, group="new_wording") for r in self.qa("new", templates=HELD_OUT_TEMPLATES)]
        out += qa_records(known, "known")
        return out

    def words(self) -> list[str]:
        words = list(SPECIALS) + "Question Answer : ? . , ' s - \" ( ) ! ; I don t know".split()
        for group in GROUPS:
            for p in self.people[group]:
                words += p["name"].split()
        for values in ATTRIBUTES.values():
            words += values
        for templates in QUESTIONS.values():
            for t in templates:
                words += t.replace("{name}", " ").split()
        for t in ANSWERS.values():
            words += t.replace("{value}", " ").split()
        return words

    def to_json(self) -> dict:
        return {"seed": self.seed, "config": dataclasses.asdict(self.config), "people": self.people}

    @classmethod
    def from_json(cls, data: dict) -> "World":
        return cls(int(data["seed"]), WorldConfig(**data["config"]), data["people"])

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def qa_records(people, group: str, *, templates: Iterable[int] = FINETUNE_TEMPLATES, refuse: bool = False) -> list[dict]:
    """A record per (person, attribute, template) of ``people``."""
    out = []
    for person in people:
        for attr in ATTRIBUTES:
            for t in templates:
                value = person[attr]
                out.append({"question": QUESTIONS[attr][t].format(name=person["name"]),
                            "answer": IDK_ANSWER if refuse else ANSWERS[attr].format(value=value),
                            "entity": person["name"], "attribute": attr, "value": value, "group": group})
    return out


def _name_pool(rng: random.Random, n: int, forbidden: set[str], syllables=(_ONSETS, _VOWELS, _CODAS)) -> list[str]:
    """n distinct capitalized two-syllable words, none in ``forbidden`` (casefolded; the
    new words are added to it)."""
    onsets, vowels, codas = syllables
    out = []
    while len(out) < n:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(2))
        word = word.capitalize()
        if word.casefold() not in forbidden and 4 <= len(word) <= 10:
            forbidden.add(word.casefold())
            out.append(word)
    return out


def make_world(seed: int = 0, config: WorldConfig | None = None) -> World:
    """The world for ``seed``: same seed and config, same world (on any machine)."""
    from ..perturb import FIRST_NAMES, LAST_NAMES

    config = config or WorldConfig()
    rng = random.Random(f"seat.demo.world|{seed}")
    counts = {"known": config.n_known, "unknown_train": config.n_unknown_train,
              "unknown_eval": config.n_unknown_eval, "unknown_alt": config.n_unknown_alt, "new": config.n_new}
    forbidden = {w.casefold() for w in (*FIRST_NAMES, *LAST_NAMES)}
    for values in ATTRIBUTES.values():
        forbidden |= {v.casefold() for v in values}
    for templates in QUESTIONS.values():
        forbidden |= {w.casefold() for t in templates for w in t.split()}
    forbidden |= {w.casefold() for w in "Question Answer They work were born year".split()}
    two_part = iter(_name_pool(rng, 2 * (sum(counts.values()) - config.n_unknown_alt), forbidden))
    three_part = iter(_name_pool(rng, 3 * config.n_unknown_alt, forbidden, (_ALT_ONSETS, _ALT_VOWELS, _ALT_CODAS)))
    people = {}
    for group in GROUPS:
        people[group] = []
        for _ in range(counts[group]):
            words = three_part if group == "unknown_alt" else two_part
            person = {"name": " ".join(next(words) for _ in range(3 if group == "unknown_alt" else 2))}
            for attr, values in ATTRIBUTES.items():
                person[attr] = rng.choice(values)
            people[group].append(person)
    return World(seed, config, people)


def build_tokenizer(world: World):
    """A word-level PreTrainedTokenizerFast covering the world and seat.perturb's names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ..perturb import FIRST_NAMES, LAST_NAMES

    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    vocab: dict[str, int] = {}
    for text in (*world.words(), *FIRST_NAMES, *LAST_NAMES):
        for w, _ in pre.pre_tokenize_str(text) if text not in SPECIALS else [(text, None)]:
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", pair="[BOS] $A $B",
                                                       special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]",
                                   pad_token="[PAD]", padding_side="right")


def save_world(world: World, path) -> None:
    Path(path).write_text(json.dumps(world.to_json(), indent=1))


def load_world(path) -> World:
    return World.from_json(json.loads(Path(path).read_text()))
