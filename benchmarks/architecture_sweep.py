"""Architecture sweep: every causal LM type transformers ships (its
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), built small, through seat.patch and one SEAT step.

Each type ends as
  pass      patched, one loss + backward + SparseAdamW step; every target changed only
            inside its mask, nothing else changed, and every weight that looks trainable
            (linear, Conv1D, fused expert tensor) is a target or reported with a reason
            by handle.targeting_report()
  refused   seat.patch raised a ValueError (its reason is listed)
  fail      any other exception, or a failed check
  unbuilt   the sweep's tiny config does not give a model that runs its own forward
            (a limit of the sweep, not of seat)
The checks are tests/_arch_sweep.py's, shared with tests/conformance/test_architecture_sweep.py
(which runs a representative subset in CI).

    python benchmarks/architecture_sweep.py                       # all types
    python benchmarks/architecture_sweep.py --types llama mixtral  # a few
    python benchmarks/architecture_sweep.py --baseline before.json # add a "before" column
    python benchmarks/architecture_sweep.py --update --types jamba # rerun some types in the
                                                                   # existing results

Writes <out>/architecture-sweep.{json,md} (default out:
benchmarks/results/amd-epyc-2-threads). Exit status 1 when any type fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from _arch_sweep import causal_lm_types, check_architecture  # noqa: E402
from _common import RESULTS, environment, environment_line  # noqa: E402

STATUSES = ("pass", "refused", "fail", "unbuilt")


def _markdown(rows: list[dict], env: dict, baseline: dict[str, dict] | None, baseline_label: str = "") -> str:
    counts = Counter(r["status"] for r in rows)
    lines = ["# Architecture sweep: seat.patch on every causal LM type of transformers", "",
             environment_line(env) + f"; transformers {env['transformers']}", "",
             "| | " + " | ".join(STATUSES) + " | types |", "|---|" + "---|" * (len(STATUSES) + 1)]
    if baseline is not None:
        before = Counter(baseline[r["model_type"]]["status"] for r in rows if r["model_type"] in baseline)
        lines.append("| before | " + " | ".join(str(before[s]) for s in STATUSES) + f" | {sum(before.values())} |")
    lines.append(("| after | " if baseline is not None else "| now | ")
                 + " | ".join(str(counts[s]) for s in STATUSES) + f" | {len(rows)} |")
    if baseline is not None:
        lines += ["", f"before: {baseline_label}, with the same checks."]
    lines += ["", "Status per type (targets: weights trained, of them fused expert tensors; untrained: "
              "targets the step left unchanged, which no gradient reached).", ""]
    head = "| type | class | status |" + (" before |" if baseline is not None else "")
    lines += [head + " targets | experts | untrained | reason |",
              "|---|---|---|" + ("---|" if baseline is not None else "") + "---|---|---|---|"]
    for r in rows:
        reason = r["reason"].replace("|", "\\|")
        before = f" {baseline.get(r['model_type'], {}).get('status', '')} |" if baseline is not None else ""
        lines.append(f"| {r['model_type']} | {r['model_class']} | {r['status']} |{before} {r['targets']} | "
                     f"{r['expert_targets']} | {len(r['untrained_targets'])} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="*", help="model types (default: every causal LM type)")
    parser.add_argument("--out", type=Path, default=RESULTS / "amd-epyc-2-threads")
    parser.add_argument("--baseline", type=Path, help="a JSON of an earlier sweep, shown as the 'before' column")
    parser.add_argument("--baseline-label", default="an earlier sweep",
                        help="what the baseline ran (e.g. 'seat at commit abc1234')")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--update", action="store_true",
                        help="replace the rows of --types in <out>/architecture-sweep.json, keep the others")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    types = args.types or causal_lm_types()
    baseline = None
    if args.baseline is not None:
        baseline = {r["model_type"]: r for r in json.loads(args.baseline.read_text())["rows"]}
    rows = []
    for model_type in types:
        result = dataclasses.asdict(check_architecture(model_type, density=args.density))
        rows.append(result)
        print(f"{model_type:28s} {result['status']:8s} {result['seconds']:6.2f}s {result['reason'][:120]}", flush=True)
    env = environment("cpu", bandwidth=False)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.update:
        earlier = json.loads((args.out / "architecture-sweep.json").read_text())["rows"]
        fresh = {r["model_type"]: r for r in rows}
        rows = [fresh.pop(r["model_type"], r) for r in earlier] + list(fresh.values())
    counts = Counter(r["status"] for r in rows)
    data = {"environment": env, "density": args.density, "counts": {s: counts[s] for s in STATUSES}, "rows": rows}
    if baseline is not None:
        data["baseline_counts"] = dict(Counter(baseline[r["model_type"]]["status"] for r in rows
                                               if r["model_type"] in baseline))
    (args.out / "architecture-sweep.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "architecture-sweep.md").write_text(_markdown(rows, env, baseline, args.baseline_label))
    print(" ".join(f"{s}={counts[s]}" for s in STATUSES), f"-> {args.out / 'architecture-sweep.md'}")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
