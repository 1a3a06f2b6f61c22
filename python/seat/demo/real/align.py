"""Stage 1: teach SmolLM2-135M-Instruct to say "I don't know" about people it does not know.

Out of the box the model invents a biography for almost any invented name (IDK 0.006),
so the ability SEAT protects has to be taught first, as the paper's aligned models
had it: full fine-tuning on refusals for a few hundred invented names (style "a", the
training wordings) mixed with questions it already answers correctly, so it learns
"unfamiliar name -> I don't know" and keeps answering what it knows. The answered
questions: real people it knows (seat.demo.real.world.REAL_PEOPLE, the training half of
the split, answered with its own first sentence holding the value), capital cities, and
famous people (seat.demo.real.world.FAMOUS, none of the retention set) asked the invented
people's own training wordings and answered with the original model's own whole
sentences, so the question wording alone never decides between answering and refusing.

The loss (AlignConfig.answer_loss): "ce" is cross-entropy on every row's answer tokens;
"kl" keeps cross-entropy on the refusal rows but on the answer rows is the KL divergence
from the original model's whole next-token distribution (keeps what it knows more
closely; one more forward pass of the original per step).

``known_real(model, tokenizer)`` asks every REAL_PEOPLE question once (greedy) and keeps
those the model answers with the expected value (or an alias of it,
seat.demo.real.world.answers_real); ``famous_answers`` asks the famous people's
questions. Both depend only on the model, so both are cached beside the converted model
(``real_known.json``, ``famous_answers_<per person>_<people>.json``) by one helper,
``cached_generation``.

``load_or_align(seed, ...)`` trains (or loads from the cache) the aligned model:
plain torch AdamW, linear warm-up and decay, loss on the answer tokens only, through
the chat template (seat.PairedCollator.encode: the same token layout as stage 2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

from .world import (ATTRIBUTES, REAL_PEOPLE, TRAIN_WORDINGS, VALUE_ALIASES, RealWorldConfig, answers_real, famous_questions,
                    make_people, qa, real_questions)

CAPITALS = (("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"), ("England", "London"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Canada", "Ottawa"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Thailand", "Bangkok"))
GEN_TOKENS = 32  # answers to the demo's questions are one sentence
ANSWER_LOSSES = ("ce", "kl")  # AlignConfig.answer_loss


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    steps: int = 25
    batch_size: int = 16
    lr: float = 1e-4
    warmup_steps: int = 3
    refusal_fraction: float = 0.25  # of each batch; the rest: real and famous people, capitals it answers
    max_grad_norm: float = 1.0
    # the loss of the answer rows: "ce" on the original model's own answers, or "kl" to the
    # original model's whole next-token distribution there (keeps what it knows more closely)
    answer_loss: str = "kl"
    famous_per_person: int = 4  # questions per famous person (seat.demo.real.world.famous_questions)
    famous_people: int | None = None  # how many famous people (None: all of FAMOUS)

    def __post_init__(self):
        if self.answer_loss not in ANSWER_LOSSES:
            raise ValueError(f"AlignConfig.answer_loss must be one of {', '.join(map(repr, ANSWER_LOSSES))}; "
                             f"got {self.answer_loss!r}")
        if (isinstance(self.famous_per_person, bool) or not isinstance(self.famous_per_person, int)
                or not 1 <= self.famous_per_person <= len(ATTRIBUTES)):
            raise ValueError(f"AlignConfig.famous_per_person must be an int from 1 to {len(ATTRIBUTES)} (one "
                             f"question per attribute at most); got {self.famous_per_person!r}")
        if self.famous_people is not None and (isinstance(self.famous_people, bool) or not isinstance(
                self.famous_people, int) or self.famous_people < 0):
            raise ValueError(f"AlignConfig.famous_people must be None (all of FAMOUS) or an int >= 0; "
                             f"got {self.famous_people!r}")

    @classmethod
    def quick(cls) -> "AlignConfig":
        # the earlier 10-step recipe: no famous people, CE (a pipeline check, not a retention claim)
        return cls(steps=10, batch_size=8, lr=1.5e-4, warmup_steps=2, famous_people=0, refusal_fraction=0.5,
                   answer_loss="ce", famous_per_person=2)


def _first_sentence(text: str, value: str) -> str | None:
    """The model's answer cut after the sentence holding ``value`` or one of its aliases
    (seat.demo.real.world.answers_real; None if it has none)."""
    out = ""
    for part in text.replace("\n", " ").split(". "):
        out = f"{out}. {part}" if out else part
        if answers_real(out, value):
            return out.rstrip(".") + "."
    return None


def cached_generation(model, tokenizer, questions: list[dict], keep, path: Path | None, field: str, key,
                      log=print, what: str = "answers") -> list:
    """[keep(question, answer) for each question, None results dropped]: the model's greedy
    answer (GEN_TOKENS new tokens) to each ``question["question"]``, cached as
    ``{"digest", field: [...]}`` in the JSON file ``path`` (None: no cache). The digest
    hashes ``key`` (JSON: what decides the result besides the model, which the cache
    folder stands for); a file with another digest is regenerated and replaced atomically."""
    from ... import evaluate as ev

    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        if data.get("digest") == digest:
            return data[field]
    t0 = time.perf_counter()
    answers = ev.generate_answers(model, tokenizer, [q["question"] for q in questions], max_new_tokens=GEN_TOKENS,
                                  batch_size=32)
    out = [r for q, a in zip(questions, answers) if (r := keep(q, a)) is not None]
    if log:
        log(f"{what}: {len(out)} of {len(questions)} ({time.perf_counter() - t0:.0f} s; "
            f"{'cached' if path is not None else 'not cached'})")
    if path is not None:
        write_text_atomically(path, json.dumps({"digest": digest, field: out}, indent=1))
    return out


def known_real(model, tokenizer, directory: Path | None, log=print) -> list[dict]:
    """[{"index", "answer"}] of the REAL_PEOPLE questions the model answers correctly
    (the expected value or an alias in its greedy answer; "answer": its first sentence
    that holds it), cached as ``directory/real_known.json``."""
    def keep(q, answer):
        sentence = _first_sentence(answer, q["value"])
        return None if sentence is None else {"index": q["real_index"], "answer": sentence}

    return cached_generation(model, tokenizer, real_questions(), keep,
                             directory / "real_known.json" if directory is not None else None, "known",
                             [REAL_PEOPLE, GEN_TOKENS, VALUE_ALIASES], log=log,
                             what="real-people questions the base model answers correctly")


def _own_answer(text: str) -> str | None:
    """A generated answer cut after its last complete sentence (so training on it keeps
    the model's own answer length; the generation stops mid-sentence at GEN_TOKENS), or
    the whole text if it has no sentence end; None if it is empty."""
    text = text.replace("\n", " ").strip()
    end = text.rfind(". ")
    if text.endswith("."):
        return text
    return text[:end + 1] if end > 0 else (text or None)


def famous_answers(model, tokenizer, directory: Path | None, log=print, per_person: int = 2,
                   people: int | None = None) -> list[dict]:
    """[{"question", "answer"}]: the model's own answer (whole sentences) to each
    seat.demo.real.world.famous_questions() question (greedy), cached as
    ``directory/famous_answers_<per_person>_<people or "all">.json``, since it depends
    only on the model."""
    questions = famous_questions(per_person, people)
    if not questions:
        return []

    def keep(q, answer):
        sentence = _own_answer(answer)
        return None if sentence is None else {"question": q["question"], "answer": sentence}

    name = f"famous_answers_{per_person}_{'all' if people is None else people}.json"
    return cached_generation(model, tokenizer, questions, keep, directory / name if directory is not None else None,
                             "answers", [questions, GEN_TOKENS, "sentences"], log=log,
                             what="the base model's own answers to famous-people questions")


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary sibling, then rename it onto `path` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def split_real(known: list[dict], n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) of the known real-people questions: eval gets n_eval (fewer if fewer
    are known, keeping at least a third for training), both whole people (a person's
    questions never straddle the split)."""
    people = sorted({REAL_PEOPLE[k["index"]][0] for k in known})
    random.Random(f"seat.demo.real.split|{seed}").shuffle(people)
    n_eval = min(n_eval, (2 * len(known)) // 3)
    eval_people, count = set(), 0
    for p in people:
        if count >= n_eval:
            break
        eval_people.add(p)
        count += sum(REAL_PEOPLE[k["index"]][0] == p for k in known)
    train = [k for k in known if REAL_PEOPLE[k["index"]][0] not in eval_people]
    evals = [k for k in known if REAL_PEOPLE[k["index"]][0] in eval_people]
    return train, evals


def alignment_records(people: dict, real_train: list[dict], famous: list[dict]) -> tuple[list[dict], list[dict]]:
    """(refusals, answers): refusal records for every "refusal" person (training
    wordings), and the questions the model answers (its own answers about real and
    famous people, capitals)."""
    refusals = qa(people["refusal"], "refusal", wordings=TRAIN_WORDINGS, refuse=True)
    answers = [{"question": REAL_PEOPLE[k["index"]][1], "answer": k["answer"]} for k in real_train]
    answers += [{"question": f"What is the capital of {c}?", "answer": f"The capital of {c} is {city}."}
                for c, city in CAPITALS]
    answers += famous
    return refusals, answers


def _encode(collator, records):
    """(input_ids, attention_mask, labels) of records, right-padded: x of a PairedCollator
    batch (labels on the answer tokens and eos only), without the perturbed copy."""
    import torch

    from ...data import IGNORE_INDEX

    seqs = [collator.encode(r["question"], r["answer"]) for r in records]
    width = max(len(ids) for ids, _ in seqs)
    pad = collator.tokenizer.pad_token_id
    ids_t = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids_t)
    labels = torch.full_like(ids_t, IGNORE_INDEX)
    for i, (ids, n_prompt) in enumerate(seqs):
        ids_t[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        labels[i, n_prompt:len(ids)] = ids_t[i, n_prompt:len(ids)]
    return ids_t, mask, labels


def align(model, tokenizer, refusals: list[dict], answers: list[dict], cfg: AlignConfig, seed: int, log=print,
          original=None):
    """Full fine-tuning of ``model`` in place on mixed refusal / answer batches (CE on the
    refusals; on the answers CE, or with cfg.answer_loss="kl" the KL divergence from
    ``original``'s distribution, token-mean over both); returns it (eval mode) and the
    seconds it took."""
    import torch

    from ...data import PairedCollator
    from ...perturb import EntityPerturber

    collator = PairedCollator(tokenizer, EntityPerturber(exclude=["unused"]))  # its encode() only
    rng = random.Random(f"seat.demo.real.align|{seed}")
    torch.manual_seed(seed)
    n_refusal = max(1, round(cfg.batch_size * cfg.refusal_fraction))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)

    def lr_at(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        batch = rng.sample(refusals, n_refusal) + [rng.choice(answers) for _ in range(cfg.batch_size - n_refusal)]
        ids, mask, labels = _encode(collator, batch)
        if cfg.answer_loss == "kl":
            loss = _refusal_ce_answer_kl(model, original, ids, mask, labels, n_refusal)
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log and (step + 1) % 5 == 0:
            log(f"  alignment step {step + 1}/{cfg.steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return model, time.perf_counter() - t0


def _refusal_ce_answer_kl(model, original, ids, mask, labels, n_refusal: int):
    """Token mean of CE on the first n_refusal rows' labels and KL(original || model) on the
    other rows' label positions (both predicted from the previous position)."""
    import torch
    import torch.nn.functional as F

    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    counted = target != -100
    ce = -logp[:n_refusal].gather(-1, target[:n_refusal].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ce = ce[counted[:n_refusal]].sum()
    with torch.no_grad():
        ref = F.log_softmax(original(input_ids=ids[n_refusal:], attention_mask=mask[n_refusal:]).logits[:, :-1].float(),
                            dim=-1)
    kl = (ref.exp() * (ref - logp[n_refusal:])).sum(-1)[counted[n_refusal:]].sum()
    return (ce + kl) / counted.sum()


def load_or_align(seed: int, world_config: RealWorldConfig, align_config: AlignConfig, *, cache: bool = True,
                  log=print) -> dict:
    """Everything stage 2 needs for ``seed``: {"original", "aligned", "tokenizer", "people",
    "real_train", "real_eval", "info"}. The aligned model is cached beside the converted
    one, keyed by the seed and both configs."""
    import torch
    import transformers

    from .model import load_smollm2

    original, tokenizer, model_info = load_smollm2(log=log)
    directory = Path(model_info["dir"])
    known = known_real(original, tokenizer, directory if cache else None, log=log)
    real_train, real_eval = split_real(known, world_config.n_real_eval, seed)
    famous = famous_answers(original, tokenizer, directory if cache else None, log=log,
                            per_person=align_config.famous_per_person, people=align_config.famous_people)
    people = make_people(seed, world_config)
    # keyed by what decides the aligned model (not the evaluation sizes)
    key = hashlib.sha256(json.dumps({"seed": seed, "refusal": people["refusal"], "real_train": real_train,
                                     "famous": famous, "align": dataclasses.asdict(align_config), "v": 1},
                                    sort_keys=True).encode()).hexdigest()[:16]
    aligned_dir = directory / f"aligned-{key}"
    info = {"model": model_info, "aligned_dir": str(aligned_dir), "n_real_known": len(known)}
    if cache and (aligned_dir / "done").is_file():
        aligned = transformers.AutoModelForCausalLM.from_pretrained(aligned_dir, dtype=torch.float32).eval()
        info.update(json.loads((aligned_dir / "done").read_text()), aligned_cached=True)
    else:
        refusals, answers = alignment_records(people, real_train, famous)
        if log:
            log(f"aligning (stage 1): {align_config.steps} steps of {align_config.batch_size}, "
                f"{len(refusals)} refusal and {len(answers)} answer examples")
        aligned, seconds = align(transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32),
                                 tokenizer, refusals, answers, align_config, seed, log=log, original=original)
        info.update(align_seconds=round(seconds, 1), aligned_cached=False)
        if cache:
            tmp = aligned_dir.with_name(aligned_dir.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                aligned.save_pretrained(tmp)
                (tmp / "done").write_text(json.dumps({"align_seconds": info["align_seconds"]}))
                shutil.rmtree(aligned_dir, ignore_errors=True)
                os.replace(tmp, aligned_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return {"original": original, "aligned": aligned, "tokenizer": tokenizer, "people": people,
            "real_train": real_train, "real_eval": real_eval, "info": info}
