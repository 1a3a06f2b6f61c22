"""`python -m seat.demo`: does fine-tuning on new facts keep "I don't know" on unknown people?

For each seed: build (or load from the cache) the synthetic world and a small Llama
trained from scratch on it (seat.demo.world, seat.demo.base); fine-tune a copy of it on
the new people's facts with every method (seat.demo.methods: full fine-tuning, LoRA,
sparse only, KL only, SEAT at densities 0.1 / 0.05 / 0.01), same batches, steps and
learning rate; evaluate each with seat.evaluate (greedy generation):

  IDK unknown   IDK rate on questions about held-out unknown people (never in any
                training data): ignorance awareness, higher is better
  IDK alt names the same for unknown people named by another generator (three-part
                names from other syllables than the training and perturbation names)
  IDK new wording  held-out unknown people asked in a wording fine-tuning never used
  exact new     the fine-tuned attribute value is in the answer (fine-tuning facts)
  recall new    ROUGE-L recall of the reference answers on the fine-tuning facts
  exact new wording  the fine-tuning facts asked in the held-out wording
  retention     exact match on the known people's facts (from base training)
  lr            the learning rate search_lr chose (matched recall; seat.demo.methods)
  trainable     fraction of the model's parameters that train
  opt. state    bytes held by the optimizer (AdamW moments; SparseAdamW compact moments,
                masks and compact gradients)
  step ms       median wall time of a training step (forward, backward, clip, update)

Writes demo_results.md, demo_results.json and demo_results.png to --out and prints the
table. ``--quick`` runs a smaller world and base model through the same code path.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

from .methods import METHODS, FinetuneConfig, describe, search_lr

COLUMNS = (  # key, header, format
    ("idk_unknown", "IDK unknown", "{:.3f}"),
    ("idk_alt", "IDK alt names", "{:.3f}"),
    ("idk_wording", "IDK new wording", "{:.3f}"),
    ("exact_new", "exact new", "{:.3f}"),
    ("recall_new", "recall new (ROUGE-L)", "{:.3f}"),
    ("exact_new_wording", "exact new, new wording", "{:.3f}"),
    ("retention", "retention known", "{:.3f}"),
    ("lr", "lr (mean over seeds)", "{:.2g}"),
    ("trainable_fraction", "trainable", "{:.4f}"),
    ("optimizer_state_bytes", "opt. state (bytes)", "{:,.0f}"),
    ("step_ms", "step ms", "{:.1f}"),
)
METRIC_KEYS = ("idk_unknown", "idk_alt", "idk_wording", "exact_new", "recall_new", "exact_new_wording", "retention")


def _configs(quick: bool):
    from .base import BaseConfig
    from .world import WorldConfig

    if quick:
        # one learning rate per family, from the middle of its grid: no search (time)
        return WorldConfig.quick(), BaseConfig.quick(), FinetuneConfig(
            steps=150, batch_size=16, lr_grids=(("dense", (6e-4,)), ("lora", (4e-3,)), ("sparse", (2e-2,))))
    return WorldConfig(), BaseConfig(), FinetuneConfig()


def _metrics(model, tokenizer, questions) -> dict:
    from .. import evaluate as ev
    from .world import PROMPT_FORMAT

    result = ev.evaluate(model, tokenizer, questions, prompt_format=PROMPT_FORMAT, max_new_tokens=12, batch_size=128)
    g = result["groups"]
    return {"idk_unknown": g["unknown"]["idk_rate"], "idk_alt": g["unknown_alt"]["idk_rate"],
            "idk_wording": g["unknown_wording"]["idk_rate"], "recall_new": g["new"]["rouge_l_recall"],
            "exact_new": g["new"]["exact_match"], "idk_new": g["new"]["idk_rate"],
            "exact_new_wording": g["new_wording"]["exact_match"],
            "retention": g["known"]["exact_match"], "idk_known": g["known"]["idk_rate"],
            "examples": [{k: a[k] for k in ("group", "question", "prediction")}
                         for a in result["answers"][::max(1, len(result["answers"]) // 12)]]}


def run_seed(seed: int, *, quick: bool = False, methods=METHODS, ft_config: FinetuneConfig | None = None,
             world_config=None, base_config=None, cache: bool = True, log=print) -> dict:
    """Every method on one seed: {"seed", "base": {...}, "methods": {name: {...}}, ...}.
    The configs default to the full (or, with quick, the --quick) ones."""
    from .base import load_or_train_base

    log = log or (lambda *args: None)
    default_world, default_base, default_ft = _configs(quick)
    world_config = world_config or default_world
    base_config = base_config or default_base
    ft_config = ft_config or default_ft
    t0 = time.perf_counter()
    world, tokenizer, base, info = load_or_train_base(seed, world_config, base_config, cache=cache, log=log)
    questions = world.eval_questions()
    records = world.finetune_records()
    train_questions = [q for q in questions if q["group"] == "new"]  # the fine-tuning facts, as trained

    def training_recall(model) -> float:
        from .. import evaluate as ev
        from .world import PROMPT_FORMAT

        result = ev.evaluate(model, tokenizer, train_questions, prompt_format=PROMPT_FORMAT, max_new_tokens=12,
                             batch_size=128)
        return result["groups"]["new"]["exact_match"]

    base_row = _metrics(base, tokenizer, questions)
    base_row.update(trainable_fraction=0.0, optimizer_state_bytes=0, step_ms=float("nan"), lr=float("nan"))
    log(f"seed {seed}: base model {'loaded from' if info['cached'] else 'trained and saved to'} {info['dir']}"
        f" ({time.perf_counter() - t0:.0f} s): IDK unknown {base_row['idk_unknown']:.3f}, alt names "
        f"{base_row['idk_alt']:.3f}, new wording {base_row['idk_wording']:.3f}, IDK new (before fine-tuning) "
        f"{base_row['idk_new']:.3f}, known-people accuracy {base_row['retention']:.3f}")
    if base_row["idk_unknown"] < 0.8 or base_row["retention"] < 0.8:
        log("  warning: the base model is weak (IDK on unknown people or known-people accuracy < 0.8)")
    rows = {}
    for method in methods:
        t1 = time.perf_counter()
        model, stats = search_lr(method, base, tokenizer, records, ft_config, training_recall, seed=seed, log=log)
        row = _metrics(model, tokenizer, questions)
        row.update(stats)
        row["seconds"] = time.perf_counter() - t1
        rows[method] = row
        log(f"  {method:10s} IDK unknown {row['idk_unknown']:.3f} / alt names {row['idk_alt']:.3f} / new wording "
            f"{row['idk_wording']:.3f}  exact new {row['exact_new']:.3f}  retention {row['retention']:.3f}  "
            f"lr {row['lr']:g}  ({row['seconds']:.0f} s)")
    return {"seed": seed, "quick": quick, "base": base_row, "methods": rows, "base_info": info,
            "world": dataclasses.asdict(world_config), "base_config": dataclasses.asdict(base_config),
            "finetune_config": dataclasses.asdict(ft_config), "n_finetune_records": len(records),
            "n_questions": {g: sum(q["group"] == g for q in questions) for g in dict.fromkeys(q["group"] for q in questions)}}


def aggregate(runs: list[dict]) -> dict:
    """{row name: {key: (mean, std)}} over seeds; row names "base" and the methods."""
    names = ["base", *runs[0]["methods"]]
    out = {}
    for name in names:
        rows = [r["base"] if name == "base" else r["methods"][name] for r in runs]
        out[name] = {}
        for key, _, _ in COLUMNS:
            values = [float(row[key]) for row in rows]
            if any(math.isnan(v) for v in values):
                out[name][key] = (float("nan"), float("nan"))
            else:
                out[name][key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def format_table(agg: dict, ft_config: dict, n_seeds: int) -> str:
    header = "| method | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    cfg = FinetuneConfig(**ft_config)
    for name, row in agg.items():
        label = "base model (before fine-tuning)" if name == "base" else describe(name, cfg)
        cells = []
        for key, _, fmt in COLUMNS:
            mean, std = row[key]
            if math.isnan(mean):
                cells.append("-")
            elif n_seeds > 1 and key in METRIC_KEYS:
                cells.append(fmt.format(mean) + " ± " + fmt.format(std))
            else:
                cells.append(fmt.format(mean))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(agg: dict, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(agg)
    metrics = [("idk_unknown", "IDK, unknown people"), ("idk_alt", "IDK, other-generator names"),
               ("idk_wording", "IDK, held-out wording"), ("exact_new", "exact match, new facts"),
               ("retention", "retention, known people")]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(names)), 4.5))
    for i, (key, label) in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [agg[n][key][0] for n in names], width, yerr=[agg[n][key][1] for n in names], label=label,
               capsize=2)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(metrics))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seat.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="smaller world and base model (same code path)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, help="fine-tuning steps (every method)")
    parser.add_argument("--lr", type=float, help="one fine-tuning peak learning rate for every method "
                        "(default: a search per method at matched recall, see seat.demo.methods.search_lr)")
    parser.add_argument("--out", default="seat_demo_results", help="folder for the .md, .json and .png")
    parser.add_argument("--no-cache", action="store_true", help="train the base model even if cached")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    _, _, ft = _configs(args.quick)
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None}
    ft = dataclasses.replace(ft, **overrides)
    t0 = time.perf_counter()
    runs = [run_seed(seed, quick=args.quick, methods=args.methods, ft_config=ft, cache=not args.no_cache)
            for seed in args.seeds]
    seconds = time.perf_counter() - t0
    agg = aggregate(runs)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    table = format_table(agg, dataclasses.asdict(ft), len(runs))
    first = runs[0]
    title = (f"seat demo{' --quick' if args.quick else ''}: seeds {' '.join(map(str, args.seeds))}, "
             f"{first['n_finetune_records']} new facts, {ft.steps} steps, "
             + (f"lr {ft.lr:g}" if ft.lr is not None else
                f"lr per family {', '.join(f'{k} {v}' for k, v in ft.lr_grids)}" if ft.lr_grids is not None else
                f"lr searched per method for exact match >= {ft.target_recall}"))
    counts = ", ".join(f"{n} {g}" for g, n in first["n_questions"].items())
    notes = (f"{title}. Questions per group: {counts}. "
             f"Machine: {machine}. Total {seconds:.0f} s." + (" Mean ± std over seeds." if len(runs) > 1 else ""))
    print()
    print(table)
    print()
    print(notes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_results.md").write_text(f"# {title}\n\n{table}\n\n{notes}\n")
    (out / "demo_results.json").write_text(json.dumps(
        {"title": title, "machine": machine, "seconds": seconds,
         "aggregate": {n: {k: {"mean": m, "std": s} for k, (m, s) in row.items()} for n, row in agg.items()},
         "runs": runs}, indent=1, default=float))
    wrote = ["demo_results.md", "demo_results.json"]
    if plot(agg, out / "demo_results.png", title):
        wrote.append("demo_results.png")
    print(f"wrote {', '.join(str(out / w) for w in wrote)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
