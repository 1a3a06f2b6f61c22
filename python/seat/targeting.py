"""Which parameters of a model seat.patch trains, and why each other one is not.

Targets are the weights of the decoder's linear maps:

  * nn.Linear weights and GPT-2's Conv1D weights, selected by their module name
    ("model.layers.0.self_attn.q_proj");
  * fused expert tensors of mixture-of-experts blocks: a floating parameter of 3 or more
    dimensions held by a module that is no convolution or embedding (transformers 5 keeps
    Mixtral's, Qwen-MoE's and DeepSeek-V3's experts as (experts, out, in) tensors such as
    "model.layers.0.mlp.experts.gate_up_proj"), selected by the parameter's name without
    a ".weight" suffix (its module name plus the parameter: "...experts.gate_up_proj").

SeatConfig.targets is "all-linear" (all of them) or fnmatch patterns over those selection
names ("*.q_proj", "*.experts.*"). The output head, embeddings, norms, biases and routers
that are not nn.Linear (Mixtral's TopKRouter) are never targets; a router that is an
nn.Linear (Qwen2-MoE's gate) is one like any linear layer. Only parameters inside the
decoder seat.patch validated are targets: others are not on the path from hidden states
to the logits SEAT's loss reads. Nor are weights the decoder's forward does not reach with
a gradient (the cross-attention of an encoder-decoder's decoder run without encoder
states, a multimodal tower, a sparse-attention indexer behind a top-k): they would hold
masks and optimizer state and never train.

bitsandbytes 4-bit linear layers (Linear4bit, a subclass of nn.Linear holding a packed
uint8 weight) are targets of the kind "linear4bit": seat.patch trains a delta beside each
(seat.quant, QSEAT). bitsandbytes gives their packed weights no gradient, so they are not
probed for reachability. Any other linear weight that is not floating point (an 8-bit
Linear8bitLt, an integer weight) is refused when the targets select it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections import Counter

import torch

from .quant._settings import is_4bit_linear

LINEAR = "linear"
EXPERTS = "experts"
LINEAR4BIT = "linear4bit"
_CONV = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def is_linear(module: torch.nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer with a transposed 2-D weight)."""
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2


def is_expert_tensor(module: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    """A fused tensor of expert weights: floating, >= 3-D, held by no linear layer,
    convolution or embedding."""
    return (param.is_floating_point() and param.dim() >= 3 and not is_linear(module)
            and not isinstance(module, (*_CONV, torch.nn.Embedding)))


def layer_pattern(name: str) -> str:
    """`name` with its layer numbers as "*": "model.layers.*.mlp.experts.down_proj"."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


@dataclasses.dataclass
class TargetingReport:
    """Every parameter of the model, targeted or skipped.

    targeted: parameter name -> "linear", "linear4bit" or "experts".
    skipped: parameter name -> why it is not trained.
    trained_entries: parameter name -> entries in its mask (targets only).
    """

    model_class: str
    targeted: dict[str, str]
    skipped: dict[str, str]
    trained_entries: dict[str, int] = dataclasses.field(default_factory=dict)

    def skipped_groups(self) -> dict[tuple[str, str], int]:
        """(parameter name with layer numbers as "*", reason) -> how many parameters."""
        return dict(Counter((layer_pattern(n), why) for n, why in self.skipped.items()))

    def targeted_groups(self) -> dict[tuple[str, str], int]:
        """(parameter name with layer numbers as "*", "linear" | "experts") -> how many."""
        return dict(Counter((layer_pattern(n), kind) for n, kind in self.targeted.items()))

    def summary(self) -> str:
        """One line: how many weights of each kind train, and the skipped ones by reason."""
        kinds = Counter(self.targeted.values())
        entries = sum(self.trained_entries.values())
        reasons = Counter(self.skipped.values())
        skipped = ", ".join(f"{count} {why}" for why, count in sorted(reasons.items()))
        quant = f", {kinds[LINEAR4BIT]} 4-bit linear weights (trained as deltas)" if kinds[LINEAR4BIT] else ""
        return (f"seat.patch({self.model_class}): targets {kinds[LINEAR]} linear weights{quant} and {kinds[EXPERTS]} "
                f"expert tensors ({entries:,} trained entries); not trained: {skipped or 'nothing'}")

    def __str__(self) -> str:
        lines = [self.summary(), "targeted:"]
        lines += [f"  {name} ({kind}) x{n}" for (name, kind), n in sorted(self.targeted_groups().items())]
        lines.append("skipped:")
        lines += [f"  {name}: {why} x{n}" for (name, why), n in sorted(self.skipped_groups().items())]
        return "\n".join(lines)


def _skip_reason(mname: str, module: torch.nn.Module, pname: str, param) -> str:
    """Why a parameter that is neither a linear weight nor an expert tensor is not trained."""
    cls = type(module).__name__
    if isinstance(module, torch.nn.Embedding) or "embed" in pname:
        return "embedding"
    if pname.endswith("bias") or pname.startswith("bias"):
        return "bias"
    if "norm" in cls.lower() or "norm" in pname.lower():
        return "normalization"
    if "router" in cls.lower() or "gate" in cls.lower() or mname.endswith((".gate", ".router")):
        return "router (not an nn.Linear)"
    if isinstance(module, _CONV):
        return "convolution"
    return "not a linear layer or an expert tensor"


UNREACHED = "no gradient reaches it from the logits (unused by a text forward, or behind a non-differentiable step)"


def _matched(targets, selector: str) -> bool:
    return targets == "all-linear" or any(fnmatch.fnmatchcase(selector, t) for t in targets)


def select_targets(model: torch.nn.Module, targets, decoder: torch.nn.Module | None = None,
                   reached: set[int] | None = None):
    """The weights to train and the report of every parameter.

    targets: "all-linear" or fnmatch patterns over selection names (module docstring).
    decoder: the module SEAT's loss runs (default: the whole model).
    reached: ids of the parameters a gradient of the decoder's output reaches
        (seat.loss.params_reached); the others are skipped (default: all are reached).
    Returns ([(parameter name, module, parameter)] in model order, TargetingReport).
    Raises ValueError when no weight matches.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    in_decoder = {id(p) for p in (decoder or model).parameters()}
    chosen, targeted, skipped, seen = [], {}, {}, set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            linear = pname == "weight" and is_linear(module)
            quant4 = linear and is_4bit_linear(module)
            kind = LINEAR4BIT if quant4 else LINEAR if linear else EXPERTS if is_expert_tensor(module, p) else None
            if p is head_weight or module is head:
                skipped[name] = "output head" if module is head else "tied to the output head"
            elif kind is None:
                skipped[name] = _skip_reason(mname, module, pname, p)
            elif id(p) not in in_decoder:
                skipped[name] = "outside the decoder (not on the path to the logits)"
            elif not (quant4 or p.is_floating_point()) and _matched(targets, mname if linear else name):
                raise ValueError(
                    f"{name} is a {p.dtype} weight of a {type(module).__name__}: seat trains floating-point "
                    "weights, and bitsandbytes 4-bit layers (Linear4bit) as QSEAT deltas. Load the model in a "
                    "float dtype or with BitsAndBytesConfig(load_in_4bit=True), or leave this layer out of "
                    "SeatConfig.targets")
            elif reached is not None and id(p) not in reached and not quant4:
                skipped[name] = UNREACHED
            elif _matched(targets, mname if linear else name):
                chosen.append((name, module, p))
                targeted[name] = kind
            else:
                skipped[name] = "not matched by targets"
    report = TargetingReport(type(model).__name__, targeted, skipped)
    if not chosen:
        examples = [n for n, m in list(model.named_modules())[1:6]]
        raise ValueError(f"no linear layer or expert tensor of {type(model).__name__} matches targets={targets!r}; "
                         f"module names look like {', '.join(examples)}")
    return chosen, report
