"""The options of `seat train`: one table that builds the argparse flags, checks the keys
and values of a --config file with the same converters, and merges the two (defaults <
config file < command line).

Plain Python (no torch): `seat --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
from typing import Any, Callable

from .._constants import MASK_ENCODINGS, MASK_KINDS
from ..config import KL_TOKENS  # plain Python too: no torch

DTYPES = ("auto", "float32", "bfloat16", "float16")
GRAD_DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
NONFINITE = ("skip", "raise")
# What --lean sets (each only where the option is not given on the command line or in --config).
LEAN = {"grad_dtype": "bfloat16", "update_in_backward": True, "state_bits": 8}


class UsageError(Exception):
    """A bad argument: the message names it and says how to fix it (exit code 2)."""


# ----------------------------------------------------------------------------- converters
# Each takes the text of a flag (or str() of a config value) and raises
# argparse.ArgumentTypeError saying what is expected.

def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}; "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


def _ranged(kind: type, low: float, *, strict: bool, high: float | None = None) -> Callable[[str], Any]:
    def convert(text: str):
        value = _number(text, kind)
        too_low = value <= low if strict else value < low
        if too_low or (high is not None and value > high):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            if high is not None:
                bound = f"in ({low:g}, {high:g}]" if strict else f"in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be {bound}; got {text}")
        return value
    convert.__name__ = kind.__name__  # argparse names the type in "invalid <name> value"
    return convert


positive_int = _ranged(int, 0, strict=True)
nonneg_int = _ranged(int, 0, strict=False)
positive_float = _ranged(float, 0.0, strict=True)
nonneg_float = _ranged(float, 0.0, strict=False)
fraction = _ranged(float, 0.0, strict=True, high=1.0)


def text(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


# ----------------------------------------------------------------------------- the table

@dataclasses.dataclass(frozen=True)
class Opt:
    """One option. kind: "value" (one converted value), "bool" (--x / --no-x), "list"
    (one or more values). trajectory: a resumed run must use the same value (it changes
    what the run trains)."""

    dest: str
    group: str
    help: str
    default: Any = None
    type: Callable[[str], Any] = text
    choices: tuple | None = None
    kind: str = "value"
    trajectory: bool = False
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


GROUPS = {
    "inputs": "inputs and outputs",
    "seat": "SEAT (seat.SeatConfig)",
    "lean": "lean optimizer modes (seat.optim.SparseAdamW)",
    "training": "training (transformers.TrainingArguments)",
}

OPTIONS = (
    Opt("model", "inputs", "a local folder loadable by AutoModelForCausalLM / AutoTokenizer, or a hub id in the "
        "local Hugging Face cache (required)", metavar="DIR_OR_ID"),
    Opt("data", "inputs", "the facts file: JSONL, JSON (a list of objects), CSV or Parquet with question / answer / "
        "entity columns, or a folder written by datasets.Dataset.save_to_disk (required)", metavar="FILE"),
    Opt("output_dir", "inputs", "where the run writes delta/, checkpoint-N/ and seat_report.json: a new or empty "
        "folder, or the folder of an earlier `seat train` run to resume (required)", metavar="DIR"),
    Opt("question_key", "inputs", "column of the question", "question", trajectory=True, metavar="NAME"),
    Opt("answer_key", "inputs", "column of the answer", "answer", trajectory=True, metavar="NAME"),
    Opt("entity_key", "inputs", "column of the entity (the person the record is about; it must appear in the "
        "question or the answer)", "entity", trajectory=True, metavar="NAME"),
    Opt("prompt_format", "inputs", "plain prompt, a format string with one field {question}, used when the "
        "tokenizer has no chat template (default: 'Question: {question}\\nAnswer:')", trajectory=True,
        metavar="FORMAT"),
    Opt("chat_template", "inputs", "--chat-template requires the tokenizer's chat template, --no-chat-template "
        "always uses --prompt-format (default: the chat template when the tokenizer has one)", kind="bool",
        trajectory=True),
    Opt("resume", "inputs", "auto: continue from the newest complete checkpoint-N in --output-dir if there is one; "
        "never: start a new run (an --output-dir holding an earlier run is then refused); or the path of a "
        "checkpoint-N folder", "auto", metavar="auto|never|PATH"),

    Opt("density", "seat", "fraction of each target weight that trains", 0.05, fraction, trajectory=True),
    Opt("mask", "seat", "how the trained entries are chosen", "random", choices=MASK_KINDS, trajectory=True),
    Opt("mask_encoding", "seat", "how a mask is stored (implicit: random masks only)", "int32",
        choices=MASK_ENCODINGS, trajectory=True),
    Opt("targets", "seat", "'all-linear', or module-name patterns (fnmatch), e.g. '*.q_proj' '*.v_proj'",
        "all-linear", kind="list", trajectory=True, metavar="PATTERN"),
    Opt("kl_weight", "seat", "lambda of L = CE + lambda * KL (0: the sparse mask alone)", 1.0, nonneg_float,
        trajectory=True),
    Opt("kl_tokens", "seat", "positions of the perturbed copy x~ in the KL term", "all", choices=KL_TOKENS,
        trajectory=True),
    Opt("temperature", "seat", "temperature of the KL's softmaxes", 1.0, positive_float, trajectory=True),
    Opt("reverse_kl", "seat", "KL(p_theta || p_base) instead of the forward KL", False, kind="bool",
        trajectory=True),
    Opt("master_weights", "seat", "fp32 master copy of the trained entries of bf16/fp16 weights", False,
        kind="bool", trajectory=True),
    Opt("stochastic_rounding", "seat", "stochastic rounding of bf16 weight updates", False, kind="bool",
        trajectory=True),
    Opt("chunk_size", "seat", "rows per chunk of the fused-linear loss (0: the kernel's choice)", 0, nonneg_int,
        trajectory=True),
    Opt("seed", "seat", "seeds the masks, the fictitious names, the data order and stochastic rounding", 0,
        nonneg_int, trajectory=True),

    Opt("grad_dtype", "lean", "dtype of the compact gradients", "float32", choices=GRAD_DTYPES, trajectory=True),
    Opt("update_in_backward", "lean", "apply each weight's update inside backward (no gradient buffers; needs "
        "--grad-accum 1 and --max-grad-norm 0)", False, kind="bool", trajectory=True),
    Opt("state_bits", "lean", "Adam state precision (8: bitsandbytes blockwise 8-bit)", 32, int, choices=(32, 8),
        trajectory=True),
    Opt("lean", "lean", "shortcut for --grad-dtype bfloat16 --update-in-backward --state-bits 8 (each one given "
        "explicitly wins)", False, kind="bool"),

    Opt("lr", "training", "peak learning rate", 1e-4, positive_float, trajectory=True),
    Opt("epochs", "training", "passes over the facts (ignored with --max-steps)", 3.0, positive_float,
        trajectory=True),
    Opt("max_steps", "training", "optimizer steps to train (default: from --epochs)", None, positive_int,
        trajectory=True),
    Opt("batch_size", "training", "records per micro-batch", 8, positive_int, trajectory=True),
    Opt("grad_accum", "training", "micro-batches per optimizer step", 1, positive_int, trajectory=True),
    Opt("max_length", "training", "longest allowed sequence in tokens (prompt + answer, and its perturbed copy "
        "with the longest fictitious name); a longer record is an error, never truncated (default: no limit)", None,
        positive_int, trajectory=True),
    Opt("max_grad_norm", "training", "clip the global gradient norm (0: no clipping; default 1.0, or 0 with "
        "--update-in-backward)", None, nonneg_float, trajectory=True),
    Opt("weight_decay", "training", "AdamW weight decay", 0.0, nonneg_float, trajectory=True),
    Opt("warmup_steps", "training", "linear warm-up steps", 0, nonneg_int, trajectory=True),
    Opt("lr_scheduler", "training", "learning-rate schedule", "linear", choices=SCHEDULERS, trajectory=True),
    Opt("nonfinite", "training", "a non-finite loss: skip its optimizer step (warn and count) or stop", "skip",
        choices=NONFINITE, trajectory=True),
    Opt("dtype", "training", "dtype the model is loaded in (auto: as saved)", "auto", choices=DTYPES,
        trajectory=True),
    Opt("device", "training", "auto: CUDA when visible, else CPU", "auto", choices=DEVICES),
    Opt("gradient_checkpointing", "training", "recompute activations in backward (less memory, slower)", False,
        kind="bool"),
    Opt("save_steps", "training", "write checkpoint-N every this many optimizer steps (and at the end)", 500,
        positive_int),
    Opt("save_total_limit", "training", "keep only the newest this many checkpoints (default: all)", None,
        positive_int),
    Opt("logging_steps", "training", "log loss / ce / kl every this many optimizer steps", 10, positive_int),
    Opt("progress", "training", "the progress bar (--no-progress: off)", True, kind="bool"),
)
BY_DEST = {o.dest: o for o in OPTIONS}
REQUIRED = ("model", "data", "output_dir")
TRAJECTORY = tuple(o.dest for o in OPTIONS if o.trajectory)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The table's flags on `parser` (default SUPPRESS: the namespace holds only what the
    command line gave, so it can override a --config file) and --config."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML or JSON file of the options below (keys as the flags, with underscores: "
                             "kl_weight: 0.5); flags on the command line override it")
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for o in OPTIONS:
        help_text = o.help
        if o.default is not None and o.kind != "bool" and "default" not in help_text:
            help_text += f" (default: {o.default})"
        kwargs: dict[str, Any] = dict(dest=o.dest, default=argparse.SUPPRESS, help=help_text)
        if o.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            number = {"int": "N", "float": "X"}.get(getattr(o.type, "__name__", ""))
            kwargs.update(type=o.type, metavar=o.metavar or number)
            if o.choices is not None:
                kwargs.update(choices=o.choices, metavar=None)
            if o.kind == "list":
                kwargs["nargs"] = "+"
        groups[o.group].add_argument(o.flag, **kwargs)


# ----------------------------------------------------------------------------- config files

def read_config_file(path: str) -> dict:
    """The mapping in a YAML or JSON file (by extension; YAML for anything but .json)."""
    if not os.path.isfile(path):
        raise UsageError(f"argument --config: {path!r} is not a file; give a YAML or JSON file of options")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Notepad's UTF-8) is skipped
            content = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"argument --config: {path!r} cannot be read ({e}); save it as UTF-8 text") from None
    if path.lower().endswith(".json"):
        try:
            data = json.loads(content)
        except json.JSONDecodeError as e:
            raise UsageError(f"argument --config: {path!r} is not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise UsageError("argument --config: YAML files need PyYAML (pip install pyyaml, or seat[cli]); "
                             "or write the options as a .json file") from None
        try:
            data = yaml.safe_load(content)
        except yaml.YAMLError as e:
            raise UsageError(f"argument --config: {path!r} is not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"argument --config: {path!r} must hold a mapping of option names to values "
                         f"(e.g. 'density: 0.05'); got {type(data).__name__}")
    return data


def check_config_values(data: dict, path: str) -> dict:
    """The file's options, each through its flag's converter; every unknown key named."""
    unknown = [k for k in data if k not in BY_DEST]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key).replace("-", "_"), list(BY_DEST), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UsageError(f"argument --config: {path!r} has unknown keys {', '.join(hints)}; the keys are the "
                         f"flags of `seat train` with underscores: {', '.join(BY_DEST)}")
    out = {}
    for key, value in data.items():
        o = BY_DEST[key]
        where = f"argument --config: {path!r}: {key!r}"
        if value is None:
            if o.default is not None:
                raise UsageError(f"{where} is empty; give a value or leave the key out")
            out[key] = None
            continue
        if o.kind == "bool":
            if not isinstance(value, bool):
                raise UsageError(f"{where} must be true or false; got {value!r}")
            out[key] = value
            continue
        values = value if (o.kind == "list" and isinstance(value, list)) else [value]
        converted = []
        for v in values:
            if isinstance(v, (bool, dict, list)):
                expected = "string or a list of strings" if o.kind == "list" else "single value"
                raise UsageError(f"{where} must be a {expected}; got {v!r}")
            try:
                c = o.type(str(v))
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"{where} {e}") from None
            if o.choices is not None and c not in o.choices:
                raise UsageError(f"{where} must be one of {', '.join(map(str, o.choices))}; got {v!r}")
            converted.append(c)
        if o.kind == "list" and not converted:
            raise UsageError(f"{where} is an empty list; give at least one value")
        out[key] = converted if o.kind == "list" else converted[0]
    return out


# ----------------------------------------------------------------------------- resolution

def resolve(namespace: argparse.Namespace) -> tuple[dict, set]:
    """(every option's value, the options set explicitly): defaults < --config < flags;
    then --lean and the --update-in-backward defaults, and the combinations refused."""
    given = {k: v for k, v in vars(namespace).items() if k in BY_DEST}
    config_path = getattr(namespace, "config", None)
    from_file = check_config_values(read_config_file(config_path), config_path) if config_path else {}
    values = {o.dest: o.default for o in OPTIONS}
    values.update(from_file)
    values.update(given)
    explicit = set(from_file) | set(given)
    missing = [BY_DEST[k].flag for k in REQUIRED if not values.get(k)]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (on the command line or "
                         "as keys of --config)")
    if values["lean"]:
        for key, lean_value in LEAN.items():
            if key not in explicit:
                values[key] = lean_value
    if isinstance(values["targets"], list) and values["targets"] == ["all-linear"]:
        values["targets"] = "all-linear"
    if values["update_in_backward"]:
        why = "--update-in-backward" + (" (set by --lean)" if "update_in_backward" not in explicit else "")
        if values["grad_accum"] > 1:
            raise UsageError(f"argument --grad-accum: {why} applies each update during backward and cannot "
                             f"accumulate gradients: use --grad-accum 1 (got {values['grad_accum']}; raise "
                             "--batch-size instead), or drop --update-in-backward")
        if values["max_grad_norm"]:
            raise UsageError(f"argument --max-grad-norm: {why} cannot clip gradients (each weight is updated "
                             f"before the global norm is known): use --max-grad-norm 0 (got "
                             f"{values['max_grad_norm']}), or drop --update-in-backward")
        values["max_grad_norm"] = 0.0
    elif values["max_grad_norm"] is None:
        values["max_grad_norm"] = 1.0
    if "targets" in explicit and values["targets"] != "all-linear" and "all-linear" in values["targets"]:
        raise UsageError("argument --targets: 'all-linear' cannot be mixed with patterns; give either "
                         "'all-linear' or module-name patterns")
    values["config"] = os.path.abspath(config_path) if config_path else None
    return values, explicit


def seat_config_fields(values: dict) -> dict:
    """The SeatConfig keywords of the resolved options."""
    return {k: values[k] for k in ("density", "mask", "mask_encoding", "seed", "targets", "kl_weight",
                                   "kl_tokens", "temperature", "reverse_kl", "master_weights",
                                   "stochastic_rounding", "chunk_size")}
