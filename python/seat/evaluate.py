"""Evaluate ignorance awareness and recall of any causal LM: IDK rate, ROUGE-L recall, exact match.

Metrics (as in SEAT, arXiv 2506.14387):

  * **IDK rate**: the fraction of answers that contain one of ``IDK_PHRASES`` (string
    match after ``normalize``). Measured on questions about entities the model cannot
    know (unknown people): higher is better.
  * **ROUGE-L recall**: of the reference answer, by the ``rouge-score`` package
    (``pip install rouge-score``; its tokenizer lowercases and keeps [a-z0-9] words).
    Measured on the fine-tuning facts.
  * **exact match**: the expected attribute value (``value``) appears in the answer as
    whole words, after ``normalize``.

``normalize(text)``: lowercase, every character that is not a letter or a digit becomes
a space, runs of spaces collapse. So "I don't know." and the word-level "I don ' t
know ." both read "i don t know"; phrases are matched on word boundaries.

Generation is greedy (``do_sample=False``), batched with left padding, on the prompt
``prompt_format.format(question=...)`` with the tokenizer's special tokens, or through
the tokenizer's chat template when it has one (the same prompts seat.PairedCollator
trains on). Only the new tokens are decoded, special tokens skipped.

CLI, for your own models::

    python -m seat.evaluate --model DIR --questions FILE.jsonl [--output results.json]

FILE.jsonl has one JSON object per line: ``question`` (required), ``answer`` (reference
answer, optional: ROUGE-L recall), ``value`` (expected attribute, optional: exact
match), ``group`` (optional, default "all": metrics are reported per group).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Iterable, Mapping, Sequence

__all__ = ["IDK_PHRASES", "normalize", "is_idk", "idk_rate", "rouge_l_recall", "exact_match",
           "generate_answers", "evaluate", "load_questions", "main"]

#: Refusal phrases counted as "I don't know" (matched after ``normalize``, on word boundaries).
IDK_PHRASES = (
    "i don't know", "i do not know", "i dont know", "i don't have any information", "i do not have any information",
    "i don't have information", "i do not have information", "i have no information", "no information about",
    "i'm not sure", "i am not sure", "i'm not aware", "i am not aware", "i'm not familiar", "i am not familiar",
    "i don't recognize", "i do not recognize", "i cannot answer", "i can't answer", "i'm unable to answer",
    "i am unable to answer", "i couldn't find", "i could not find", "i have no knowledge", "i don't have knowledge",
    "no idea", "unknown to me", "cannot provide information", "can't provide information",
)

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize(text: str) -> str:
    """Lowercase; every non-alphanumeric character becomes a space; spaces collapse."""
    return _NON_WORD.sub(" ", text.lower().replace("’", "'")).strip()


_IDK_NORMALIZED = tuple(dict.fromkeys(normalize(p) for p in IDK_PHRASES))


def is_idk(text: str, phrases: Iterable[str] | None = None) -> bool:
    """Whether ``text`` contains a refusal phrase (default ``IDK_PHRASES``)."""
    norm = f" {normalize(text)} "
    phrases = _IDK_NORMALIZED if phrases is None else [normalize(p) for p in phrases]
    return any(f" {p} " in norm for p in phrases if p)


def idk_rate(answers: Sequence[str], phrases: Iterable[str] | None = None) -> float:
    """Fraction of ``answers`` that are refusals (nan for no answers)."""
    if not answers:
        return float("nan")
    return sum(is_idk(a, phrases) for a in answers) / len(answers)


_SCORER = None


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``reference`` in ``prediction`` (rouge-score, no stemming)."""
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("seat.evaluate needs the rouge-score package: pip install rouge-score") from e
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_SCORER.score(reference, prediction)["rougeL"].recall)


def exact_match(prediction: str, value: str) -> bool:
    """Whether ``value`` occurs in ``prediction`` as whole words (both normalized)."""
    v = normalize(value)
    return bool(v) and f" {v} " in f" {normalize(prediction)} "


def _prompt_ids(tokenizer, question: str, prompt_format: str, use_chat_template: bool) -> list[int]:
    if use_chat_template:
        out = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(out, Mapping):
            out = out["input_ids"]
        return [int(t) for t in out]
    return [int(t) for t in tokenizer(prompt_format.format(question=question), add_special_tokens=True)["input_ids"]]


def generate_answers(model, tokenizer, questions: Sequence[str], *, prompt_format: str | None = None,
                     use_chat_template: bool | None = None, max_new_tokens: int = 32,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers of ``model`` to ``questions`` (strings), in order."""
    import torch

    from .data import DEFAULT_PROMPT_FORMAT

    prompt_format = DEFAULT_PROMPT_FORMAT if prompt_format is None else prompt_format
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            prompts = [_prompt_ids(tokenizer, q, prompt_format, use_chat_template)
                       for q in questions[start:start + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):  # left padding
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=int(pad),
                                     eos_token_id=tokenizer.eos_token_id)
            for row in out[:, width:].tolist():
                if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate(model, tokenizer, questions: Sequence[Mapping], *, phrases: Iterable[str] | None = None,
             **generate_kwargs) -> dict:
    """Generate an answer to every question and score it.

    questions: dicts with "question" and optionally "answer" (reference), "value"
    (expected attribute) and "group". Returns ``{"groups": {group: {"n", "idk_rate",
    ["rouge_l_recall"], ["exact_match"]}}, "answers": [...]}`` where each answer entry is
    the question dict plus "prediction", "idk" and the per-question scores.
    """
    texts = [q["question"] for q in questions]
    predictions = generate_answers(model, tokenizer, texts, **generate_kwargs)
    rows = []
    for q, pred in zip(questions, predictions):
        row = dict(q, prediction=pred, idk=is_idk(pred, phrases))
        if q.get("answer"):
            row["rouge_l_recall"] = rouge_l_recall(pred, q["answer"])
        if q.get("value"):
            row["exact_match"] = exact_match(pred, q["value"])
        rows.append(row)
    groups: dict[str, dict] = {}
    for name in dict.fromkeys(r.get("group", "all") for r in rows):
        mine = [r for r in rows if r.get("group", "all") == name]
        g = {"n": len(mine), "idk_rate": _mean(r["idk"] for r in mine)}
        for key in ("rouge_l_recall", "exact_match"):
            scored = [float(r[key]) for r in mine if key in r]
            if scored:
                g[key] = _mean(scored)
        groups[name] = g
    return {"groups": groups, "answers": rows}


def load_questions(path) -> list[dict]:
    """Questions from a JSONL file (see the module docstring)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(q, dict) or not isinstance(q.get("question"), str):
                raise ValueError(f"{path}:{lineno}: each line must be an object with a 'question' string")
            out.append(q)
    if not out:
        raise ValueError(f"{path} holds no questions")
    return out


def format_table(groups: Mapping[str, Mapping]) -> str:
    """A markdown table of per-group metrics."""
    lines = ["| group | n | IDK rate | ROUGE-L recall | exact match |", "|---|---|---|---|---|"]
    for name, g in groups.items():
        cells = [f"{g[k]:.3f}" if k in g else "-" for k in ("idk_rate", "rouge_l_recall", "exact_match")]
        lines.append(f"| {name} | {g['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seat.evaluate",
                                     description="IDK rate, ROUGE-L recall and exact match of a causal LM on "
                                                 "a JSONL file of questions (greedy generation).")
    parser.add_argument("--model", required=True, help="a directory (or hub id) loadable by AutoModelForCausalLM")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    parser.add_argument("--questions", required=True, help="JSONL: question, [answer], [value], [group]")
    parser.add_argument("--output", help="write metrics and every answer here as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prompt-format", default=None,
                        help="plain prompt with {question} (default 'Question: {question}\\nAnswer:'); ignored "
                             "when the tokenizer has a chat template, unless --no-chat-template")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import transformers

    questions = load_questions(args.questions)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model).to(args.device)
    result = evaluate(model, tokenizer, questions, prompt_format=args.prompt_format,
                      use_chat_template=False if args.no_chat_template else None,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(format_table(result["groups"]))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
