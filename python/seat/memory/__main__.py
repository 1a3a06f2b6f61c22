"""python -m seat.memory: the analytic memory breakdown of one training step.

    python -m seat.memory --config Llama-3-8B --density 0.05 --seq 1024 --batch 1 \
        --gradient-checkpointing --gpu-memory 24GB

--config, --density, --method and --gpu-memory take several values; with more than one
(config, method, density) the output is a markdown table, one row each, with a verdict
column per GPU size. --json prints the full estimates instead. --gpus N --strategy dp|fsdp
estimates one GPU's share of training on N GPUs and the bytes it sends per step;
--multi-gpu-table prints the "Many GPUs" tables of docs/guides/memory.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

from ._arch import known_names, load_config, Architecture
from ._estimate import MemoryEstimate, estimate_arch
from ._options import DEVICES, DTYPES, GRAD_DTYPES, INDEX_ENCODINGS, METHODS, OPTIMIZER_BITS, STRATEGIES, Options
from ._units import format_bytes, parse_bytes

# Options field -> the command-line flag that sets it (errors name the flag)
FLAGS = {"method": "--method", "density": "--density", "seq": "--seq", "batch": "--batch", "dtype": "--dtype",
         "device": "--device", "index_encoding": "--index-encoding", "grad_dtype": "--grad-dtype",
         "optimizer_bits": "--optimizer-bits", "lora_rank": "--lora-rank", "chunk_size": "--chunk-size",
         "ce_rows": "--ce-rows", "kl_rows": "--kl-rows", "implicit_block": "--implicit-block",
         "base_bits": "--base-bits", "quant_blocksize": "--quant-blocksize", "double_quant": "--double-quant",
         "gpus": "--gpus", "strategy": "--strategy"}


def _gpu_count(text: str) -> int:
    """--gpus: a whole number >= 1."""
    value = int(text) if text.strip().isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (GPUs training together; 1 = one GPU), "
                                         f"e.g. --gpus 8; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seat.memory", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", nargs="+",
                   help=f"known model name(s) ({', '.join(known_names())}) or path(s) to a HF config.json "
                        "(required, except with --multi-gpu-table)")
    p.add_argument("--method", nargs="+", default=["seat"], choices=METHODS,
                   help="seat; naive SEAT (reference copy, dense AdamW, materialized logits); full fine-tuning; "
                        "LoRA (all of them train the decoder blocks' linear layers)")
    p.add_argument("--density", nargs="+", type=float, default=[0.05], help="fraction of each weight that trains")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1,
                   help="sequences per step and GPU (pairs x / x~ for seat and naive)")
    p.add_argument("--gpus", type=_gpu_count, default=1,
                   help="GPUs training together; the estimate is one GPU's share and the bytes it sends per step. "
                        "1: one GPU, --strategy changes nothing")
    p.add_argument("--strategy", default="dp", choices=STRATEGIES,
                   help="with --gpus > 1: dp (every GPU holds the whole model; seat all-reduces its compact "
                        "gradients, the baselines run torch DDP) or fsdp (FSDP2 per decoder layer: weights and "
                        "seat's masks, optimizer state and gradients sharded; methods seat and full only)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--gpu-memory", nargs="+", default=[], help="GPU memory size(s) for the verdict, e.g. 24GB 16GB")
    p.add_argument("--reserve", default="1GiB",
                   help="memory kept out of the verdict for what the model does not count (CUDA context, "
                        "allocator slack)")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="the model's dtype")
    p.add_argument("--device", default="cuda", choices=DEVICES)
    p.add_argument("--index-encoding", default="int32", choices=INDEX_ENCODINGS,
                   help="seat: how masks are stored (int32 indices; block16 uint16 offsets; implicit hashed mask)")
    p.add_argument("--implicit-block", type=int, default=4096, help="seat: elements per block of an implicit mask")
    p.add_argument("--grad-dtype", default="float32", choices=tuple(GRAD_DTYPES), help="seat: compact gradient")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="seat: the update runs in the gradient hook (no compact gradient buffer)")
    p.add_argument("--optimizer-bits", type=int, default=32, choices=OPTIMIZER_BITS,
                   help="seat: 32-bit or 8-bit blockwise (bitsandbytes) exp_avg / exp_avg_sq")
    p.add_argument("--master-weights", action="store_true", help="seat: fp32 master copy of the trained entries")
    p.add_argument("--base-bits", type=int, default=None, choices=(4,),
                   help="seat: 4 for QSEAT, the target weights as bitsandbytes 4-bit (nf4/fp4) with a trained delta "
                        "each (default: the model's dtype)")
    p.add_argument("--quant-blocksize", type=int, default=64, help="--base-bits 4: elements per absmax")
    p.add_argument("--double-quant", action="store_true",
                   help="--base-bits 4: the absmax 8-bit quantized (bnb_4bit_use_double_quant)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=0, help="seat: rows per fused-loss chunk (0: kernel's choice)")
    p.add_argument("--no-padding", action="store_true",
                   help="the batch has no padding (transformers then passes no attention mask to SDPA)")
    p.add_argument("--ce-rows", type=int, default=None, help="rows in the CE (default: batch * (seq - 1))")
    p.add_argument("--kl-rows", type=int, default=None, help="rows in the KL (default: batch * (seq - 1))")
    p.add_argument("--unit", default="GB", choices=("GB", "GiB", "MB", "MiB"),
                   help="unit of the printed sizes (GB = 10^9 bytes; GiB = 2^30, what nvidia-smi's MiB add up to)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON (bytes)")
    p.add_argument("--multi-gpu-table", action="store_true",
                   help="print the guide's 'Many GPUs' tables (Llama-3-8B and -70B at densities 0.05 and 0.01, "
                        "seq 1024, batch 1, gradient checkpointing, the three lean modes; fixed settings: takes "
                        "no other flag)")
    return p


def _options(args, method: str, density: float) -> dict:
    return dict(method=method, density=density, seq=args.seq, batch=args.batch,
                gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, device=args.device,
                index_encoding=args.index_encoding, grad_dtype=args.grad_dtype,
                optimizer_in_backward=args.optimizer_in_backward, optimizer_bits=args.optimizer_bits,
                master_weights=args.master_weights, lora_rank=args.lora_rank, chunk_size=args.chunk_size,
                padded=not args.no_padding, ce_rows=args.ce_rows, kl_rows=args.kl_rows,
                implicit_block=args.implicit_block, base_bits=args.base_bits, quant_blocksize=args.quant_blocksize,
                double_quant=args.double_quant, gpus=args.gpus, strategy=args.strategy)


def _flag_of(message: str) -> str:
    """The flag whose Options field a ValueError message starts with."""
    field = message.split(" ", 1)[0]
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def report(est: MemoryEstimate, gpus: list[tuple[str, int]], reserve: int, unit: str = "GB") -> str:
    """The human-readable breakdown of one estimate, sizes in `unit`."""
    a, o = est.arch, est.options
    scale = parse_bytes("1" + unit)
    lines = [f"seat.memory (analytic model): {a.name}, method {o.method}"
             + (f", density {o.density:g}" if o.method in ("seat", "naive") else "")
             + f", seq {o.seq}, batch {o.batch}, {o.dtype} on {o.device}"
             + (", gradient checkpointing" if o.gradient_checkpointing else "")
             + (f"; {o.gpus} GPUs ({o.strategy}), batch per GPU, sizes per GPU" if o.gpus > 1 else ""),
             f"parameters: {a.total_params / 1e9:.2f}B total, {est.target_params / 1e9:.2f}B in the block linears "
             + (f"and {a.experts} experts per sparse layer " if a.experts else "")
             + f"(the targets); {est.trainable / 1e6:,.1f}M trained entries"]
    if o.method == "seat":
        lines.append(f"modes: indices {o.index_encoding}, compact gradient "
                     + ("none (optimizer in backward)" if o.optimizer_in_backward else o.grad_dtype)
                     + f", optimizer state {o.optimizer_bits}-bit" + (", fp32 masters" if o.master_weights else "")
                     + (f", 4-bit base (blocksize {o.quant_blocksize}"
                        + (", double quantization)" if o.double_quant else ")") if o.base_bits == 4 else ""))
    width = max(len(k) for k in est.breakdown) + 2
    lines.append("")
    lines.append(f"{'alive between steps':<{width}}{unit:>10}")
    for k, v in est.state.items():
        lines.append(f"  {k:<{width - 2}}{v / scale:>10.3f}")
    lines.append(f"peak phase: {est.peak_phase}")
    for k, v in est.phases[est.peak_phase].items():
        lines.append(f"  {k:<{width - 2}}{v / scale:>10.3f}")
    lines.append(f"{'peak':<{width}}{est.peak / scale:>10.3f}")
    lines.append("")
    lines.append(f"activations of the trained forward: {format_bytes(est.activations_checkpointing, unit)} with "
                 f"gradient checkpointing, {format_bytes(est.activations_no_checkpointing, unit)} without")
    lines.append("phases (tensors alive at each one's worst moment): "
                 + ", ".join(f"{k} {format_bytes(est.phase_bytes(k), unit)}" for k in est.phases))
    if o.gpus > 1:
        lines += _communication_lines(est, unit)
    for label, size in gpus:
        room = est.headroom(size, reserve)
        verdict = "fits" if room >= 0 else "does not fit"
        lines.append(f"verdict vs {label} ({format_bytes(size, unit)}, keeping {format_bytes(reserve, unit)} for the "
                     f"CUDA context and allocator slack): {verdict}, headroom {format_bytes(room, unit)}")
    lines.append("(tensor bytes as torch's allocator counts them; see seat.memory for what is modelled)")
    return "\n".join(lines)


def _communication_lines(est: MemoryEstimate, unit: str) -> list[str]:
    """Bytes one GPU sends per optimizer step, collective by collective, and the dense baselines."""
    c = est.communication
    scale = parse_bytes("1" + unit)
    width = max(len(k) for k in c.collectives) + 2
    lines = [f"communication per optimizer step, per GPU ({unit}; ring collectives over {c.gpus} GPUs):",
             f"  {'':<{width - 2}}{'payload':>10}{'sent':>10}"]
    for k, (payload, sent) in c.collectives.items():
        lines.append(f"  {k:<{width - 2}}{payload / scale:>10.3f}{sent / scale:>10.3f}")
    lines.append(f"  {'total':<{width - 2}}{c.payload / scale:>10.3f}{c.sent / scale:>10.3f}")
    lines.append(f"dense training of the same targets would send {format_bytes(c.ddp_dense[1], unit)} (DDP) or "
                 f"{format_bytes(c.fsdp_dense[1], unit)} (FSDP) per GPU and step")
    return lines


def table(rows: list[MemoryEstimate], gpus: list[tuple[str, int]], reserve: int, unit: str = "GB") -> str:
    """A markdown table, one row per estimate, sizes in `unit`."""
    scale = parse_bytes("1" + unit)
    head = ["model", "method", "density", f"state {unit}", f"activations {unit}", f"peak {unit}"]
    multi = any(est.options.gpus > 1 for est in rows)
    if multi:
        head.append(f"sent/GPU/step {unit}")
    head += [f"vs {label}" for label, _ in gpus]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for est in rows:
        o = est.options
        cells = [est.arch.name, o.method, f"{o.density:g}" if o.method in ("seat", "naive") else "-",
                 f"{est.state_bytes / scale:.2f}", f"{est.activations / scale:.2f}", f"{est.peak / scale:.2f}"]
        if multi:
            cells.append(f"{est.communication.sent / scale:.2f}")
        for _, size in gpus:
            room = est.headroom(size, reserve)
            cells.append(f"fits ({room / scale:+.1f})" if room >= 0 else f"no ({room / scale:+.1f})")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.multi_gpu_table:
        from ._gpu_table import tables

        others = [FLAGS.get(k, "--" + k.replace("_", "-")) for k, v in vars(args).items()
                  if k != "multi_gpu_table" and v != parser.get_default(k)]
        if others:
            parser.error(f"argument --multi-gpu-table: prints the guide's fixed tables and takes no other flag; "
                         f"drop {', '.join(others)}")
        print(tables())
        return 0
    if not args.config:
        parser.error("the following arguments are required: --config")
    gpus = []
    for text in args.gpu_memory:
        try:
            gpus.append((text, parse_bytes(text, argument="--gpu-memory")))
        except ValueError as exc:
            parser.error(f"argument --gpu-memory: {exc}")
    try:
        reserve = parse_bytes(args.reserve, argument="--reserve") if args.reserve not in ("0", "0GB") else 0
    except ValueError as exc:
        parser.error(f"argument --reserve: {exc}")
    archs = []
    for config in args.config:
        try:
            archs.append(Architecture.from_config(load_config(config, argument="--config"), name=config))
        except ValueError as exc:
            parser.error(f"argument {exc}")
    estimates = []
    for arch, method, density in itertools.product(archs, args.method, args.density):
        try:
            opts = Options(**_options(args, method, density))
        except ValueError as exc:
            parser.error(f"argument {_flag_of(str(exc))}: {exc}")
        try:
            estimates.append(estimate_arch(arch, opts))
        except ValueError as exc:  # a method the model does not cover for this architecture
            parser.error(f"argument {_flag_of(str(exc))}: {exc}")
    if args.json:
        items = []
        for est in estimates:
            d = est.to_dict()
            d["reserve_bytes"] = reserve
            d["verdicts"] = {label: {"gpu_bytes": size, "fits": est.fits(size, reserve),
                                     "headroom_bytes": est.headroom(size, reserve)} for label, size in gpus}
            items.append(d)
        print(json.dumps(items[0] if len(items) == 1 else items, indent=2))
    elif len(estimates) == 1:
        print(report(estimates[0], gpus, reserve, args.unit))
    else:
        print(f"seat.memory (analytic model): seq {args.seq}, batch {args.batch}, {args.dtype} on {args.device}"
              + (", gradient checkpointing" if args.gradient_checkpointing else "")
              + (f"; {args.gpus} GPUs ({args.strategy}): batch and sizes per GPU" if args.gpus > 1 else "")
              + (f"; verdicts keep {format_bytes(reserve, args.unit)} for the CUDA context and allocator slack; "
                 f"(+x) is the headroom in {args.unit}" if gpus else ""))
        print()
        print(table(estimates, gpus, reserve, args.unit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
