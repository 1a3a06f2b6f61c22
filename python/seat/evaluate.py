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
  * **strict IDK rate**: a refusal that asserts no attribute value: the answer contains
    a refusal phrase and none of the question's ``value`` / ``values`` (whole words, see
    ``asserts_value``). "I'm not sure, but she was born in 1962." is an IDK by the
    phrase list and not a strict one: a refusal followed by an invented fact is not a
    refusal. ``values`` lists what the model could invent for the attribute asked (e.g.
    every year, many cities); a value not listed is not caught, so list generously.

``normalize(text)``: lowercase, every character that is not a letter or a digit becomes
a space, runs of spaces collapse. So "I don't know." and the word-level "I don ' t
know ." both read "i don t know"; phrases are matched on word boundaries.

Generation is greedy (``do_sample=False``), batched with left padding, on the prompt
``prompt_format.format(question=...)`` with the tokenizer's special tokens, or through
the tokenizer's chat template when it has one (the same prompts seat.PairedCollator
trains on). Only the new tokens are decoded, special tokens skipped.

CLI, for your own models::

    python -m seat.evaluate --model DIR --questions FILE.jsonl [--output results.json]

FILE.jsonl has one JSON object per line (UTF-8): ``question`` (required), ``answer``
(reference answer, optional: ROUGE-L recall), ``value`` (expected attribute, optional:
exact match), ``group`` (optional, default "all": metrics are reported per group), each
a string, and ``values`` (optional list of strings: what a strict refusal must not
assert). Every argument, the questions file and the output path are checked before the
model is loaded (a bad one: a message naming it and exit code 2), and --output is written
atomically (a temporary file in the same directory, renamed into place), so a failure
never leaves a half-written file; if it cannot be written after all, the results go to
stdout (exit code 1) instead of being lost.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from typing import Iterable, Mapping, Sequence

__all__ = ["IDK_PHRASES", "normalize", "is_idk", "idk_rate", "asserts_value", "is_strict_idk", "rouge_l_recall",
           "exact_match", "generate_answers", "evaluate", "check_question", "load_questions", "write_json_atomically",
           "main"]

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


def asserts_value(text: str, values: Iterable[str]) -> bool:
    """Whether ``text`` states any of ``values`` (each matched as whole words after
    ``normalize``, as in ``exact_match``)."""
    if isinstance(values, str):
        raise TypeError("values must be a list of strings (one value is [value]); got a str")
    return any(exact_match(text, v) for v in values)


def is_strict_idk(text: str, values: Iterable[str], phrases: Iterable[str] | None = None) -> bool:
    """A refusal (``is_idk``) that asserts none of ``values`` (``asserts_value``)."""
    return is_idk(text, phrases) and not asserts_value(text, values)


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

    from .data import check_prompt_format

    prompt_format = check_prompt_format(DEFAULT_PROMPT_FORMAT if prompt_format is None else prompt_format)
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
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
    (expected attribute), "values" (list of str: other values a refusal must not
    assert) and "group". Returns ``{"groups": {group: {"n", "idk_rate",
    "strict_idk_rate", ["rouge_l_recall"], ["exact_match"]}}, "answers": [...]}`` where
    each answer entry is the question dict plus "prediction", "idk", "strict_idk" and the
    per-question scores. strict_idk: "idk" and none of "value" / "values" asserted.
    """
    for i, q in enumerate(questions):
        check_question(f"questions[{i}]", q)
    texts = [q["question"] for q in questions]
    predictions = generate_answers(model, tokenizer, texts, **generate_kwargs)
    rows = []
    for q, pred in zip(questions, predictions):
        idk = is_idk(pred, phrases)
        asserted = [q["value"]] if q.get("value") else []
        row = dict(q, prediction=pred, idk=idk, strict_idk=idk and not asserts_value(pred, asserted + list(
            q.get("values", ()))))
        if q.get("answer"):
            row["rouge_l_recall"] = rouge_l_recall(pred, q["answer"])
        if q.get("value"):
            row["exact_match"] = exact_match(pred, q["value"])
        rows.append(row)
    groups: dict[str, dict] = {}
    for name in dict.fromkeys(r.get("group", "all") for r in rows):
        mine = [r for r in rows if r.get("group", "all") == name]
        g = {"n": len(mine), "idk_rate": _mean(r["idk"] for r in mine),
             "strict_idk_rate": _mean(r["strict_idk"] for r in mine)}
        for key in ("rouge_l_recall", "exact_match"):
            scored = [float(r[key]) for r in mine if key in r]
            if scored:
                g[key] = _mean(scored)
        groups[name] = g
    return {"groups": groups, "answers": rows}


_OPTIONAL_KEYS = ("answer", "value", "group")


def check_question(where: str, q) -> None:
    """A question entry: a dict with a "question" str and, when present, str "answer",
    "value" and "group" and a list of str "values"; ValueError naming ``where`` and the
    key otherwise."""
    if not isinstance(q, Mapping) or not isinstance(q.get("question"), str):
        raise ValueError(f"{where}: each question must be an object with a 'question' string")
    values = q.get("values", [])
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: 'values' must be a list of strings (values a refusal must not assert), "
                         f"or left out; got {values!r:.60}")
    for key in _OPTIONAL_KEYS:
        if key in q and not isinstance(q[key], str):
            raise ValueError(f"{where}: {key!r} must be a string (or left out); got {type(q[key]).__name__} "
                             f"{q[key]!r:.40}")


def load_questions(path) -> list[dict]:
    """Questions from a JSONL file (see the module docstring); ValueError naming
    ``path:line`` for a line that is not UTF-8, not JSON or not a valid question."""
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            check_question(f"{path}:{lineno}", q)
            out.append(q)
    if not out:
        raise ValueError(f"{path} holds no questions")
    return out


def format_table(groups: Mapping[str, Mapping]) -> str:
    """A markdown table of per-group metrics."""
    lines = ["| group | n | IDK rate | strict IDK rate | ROUGE-L recall | exact match |",
             "|---|---|---|---|---|---|"]
    for name, g in groups.items():
        cells = [f"{g[k]:.3f}" if k in g else "-"
                 for k in ("idk_rate", "strict_idk_rate", "rouge_l_recall", "exact_match")]
        lines.append(f"| {name} | {g['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {value}")
    return value


def _check_output(path: str) -> str | None:
    """Why results could not be written to ``path`` (None: they can)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"--output {path!r} is a directory; give a file path, e.g. {os.path.join(path, 'results.json')!r}"
    if not os.path.isdir(parent):
        return f"--output {path!r}: its directory {parent!r} does not exist; create it first"
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"--output {path!r} is not writable; choose a path you can write to"
    return None


def write_json_atomically(path: str, data) -> None:
    """``data`` as JSON at ``path``: written to a temporary file beside it and renamed
    into place, so ``path`` is either its old self or the whole new file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seat.evaluate",
                                     description="IDK rate, ROUGE-L recall and exact match of a causal LM on "
                                                 "a JSONL file of questions (greedy generation).")
    parser.add_argument("--model", required=True, help="a directory (or hub id) loadable by AutoModelForCausalLM")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    parser.add_argument("--questions", required=True, help="JSONL: question, [answer], [value], [group]")
    parser.add_argument("--output", help="write metrics and every answer here as JSON")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32)
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    parser.add_argument("--prompt-format", default=None,
                        help="plain prompt with {question} (default 'Question: {question}\\nAnswer:'); ignored "
                             "when the tokenizer has a chat template, unless --no-chat-template")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    # everything that can be checked without the model, before it is loaded
    if args.prompt_format is not None:
        from .data import check_prompt_format

        try:
            check_prompt_format(args.prompt_format, "--prompt-format")
        except ValueError as e:
            parser.error(str(e))
    if args.output is not None:
        problem = _check_output(args.output)
        if problem:
            parser.error(problem)
    try:
        questions = load_questions(args.questions)
    except OSError as e:
        parser.error(f"--questions {args.questions!r} cannot be read: {e.strerror or e}")
    except ValueError as e:
        parser.error(str(e))

    import torch
    import transformers

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r} is not a torch device ({e}); e.g. cpu, cuda, cuda:1")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        parser.error(f"--model {args.model!r} / --tokenizer {args.tokenizer!r} cannot be loaded: {e}")
    model = model.to(device)
    result = evaluate(model, tokenizer, questions, prompt_format=args.prompt_format,
                      use_chat_template=False if args.no_chat_template else None,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(format_table(result["groups"]))
    if args.output:
        try:
            write_json_atomically(args.output, result)
        except OSError as e:
            print(f"error: could not write --output {args.output!r} ({e}); the results follow on stdout",
                  file=sys.stderr)
            json.dump(result, sys.stdout, indent=1)
            print()
            return 1
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
