"""The "Many GPUs" table of docs/guides/memory.md (python -m seat.memory --multi-gpu-table):
for each model, density and card size, the fewest GPUs that fit under dp and under fsdp,
the per-GPU peak there, and the bytes each GPU sends per step against dense training."""
from __future__ import annotations

from ._arch import Architecture, load_config
from ._estimate import MemoryEstimate, estimate_arch
from ._options import Options
from ._units import parse_bytes

MODELS = ("Llama-3-8B", "Llama-3-70B")
DENSITIES = (0.05, 0.01)
CARDS = ("24GiB", "32GiB", "48GiB", "80GiB")
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
RESERVE = "1GiB"  # the CLI's default --reserve
# the guide's settings: seq 1024, batch 1 per GPU, gradient checkpointing, and the three
# lean modes of SparseAdamW (bf16 compact gradients, update in backward, 8-bit state)
SETTINGS = dict(seq=1024, batch=1, gradient_checkpointing=True, grad_dtype="bfloat16", optimizer_in_backward=True,
                optimizer_bits=8)
COMMAND = ("python -m seat.memory --config MODEL --density D --seq 1024 --batch 1 --gradient-checkpointing "
           "--grad-dtype bfloat16 --optimizer-in-backward --optimizer-bits 8 --gpus N --strategy dp|fsdp")


def smallest_fit(arch: Architecture, gpu_bytes: int | str, strategy: str, *, reserve: int | str = RESERVE,
                 counts=GPU_COUNTS, **options) -> MemoryEstimate | None:
    """The estimate at the fewest GPUs in `counts` whose per-GPU peak plus `reserve` fits
    `gpu_bytes` under `strategy`; None if none does."""
    for n in counts:
        est = estimate_arch(arch, Options(gpus=n, strategy=strategy, **options))
        if est.fits(gpu_bytes, reserve):
            return est
    return None


def _cells(est: MemoryEstimate | None, dense: str) -> list[str]:
    if est is None:
        return ["-", "-", "-"]
    comm = est.communication
    if est.options.gpus == 1:
        return ["1", f"{est.peak / 2**30:.2f}", "0 (one GPU)"]
    return [str(est.options.gpus), f"{est.peak / 2**30:.2f}", f"{comm.sent / 1e9:.2f} ({_gb(getattr(comm, dense)[1])})"]


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def multi_gpu_table(models=MODELS, densities=DENSITIES, cards=CARDS) -> str:
    """The markdown table (module docstring): peaks in GiB, bytes sent per GPU and
    optimizer step in GB, in brackets DDP dense (for dp) and FSDP dense (for fsdp) at the
    same number of GPUs."""
    head = ["model", "density", "card", "dp GPUs", "dp peak GiB", "dp GB sent (DDP dense)", "fsdp GPUs",
            "fsdp peak GiB", "fsdp GB sent (FSDP dense)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        arch = Architecture.from_config(load_config(model), name=model)
        for density in densities:
            for card in cards:
                size = parse_bytes(card)
                dp = smallest_fit(arch, size, "dp", density=density, **SETTINGS)
                fsdp = smallest_fit(arch, size, "fsdp", density=density, **SETTINGS)
                cells = [model, f"{density:g}", card.replace("GiB", " GiB"), *_cells(dp, "ddp_dense"),
                         *_cells(fsdp, "fsdp_dense")]
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def traffic_table(models=MODELS, densities=DENSITIES, gpus=(8, 64)) -> str:
    """GB each GPU sends per optimizer step at `gpus` GPUs (whether or not it fits):
    seat under dp and fsdp against DDP and FSDP dense training of the same targets."""
    head = ["model", "density", "GPUs", "seat dp", "DDP dense", "seat fsdp", "FSDP dense"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        arch = Architecture.from_config(load_config(model), name=model)
        for density in densities:
            for n in gpus:
                dp, fsdp = (estimate_arch(arch, Options(gpus=n, strategy=s, density=density, **SETTINGS)).communication
                            for s in ("dp", "fsdp"))
                cells = [model, f"{density:g}", str(n), _gb(dp.sent), _gb(dp.ddp_dense[1]), _gb(fsdp.sent),
                         _gb(fsdp.fsdp_dense[1])]
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def tables() -> str:
    """What python -m seat.memory --multi-gpu-table prints: both tables, a blank line apart."""
    return multi_gpu_table() + "\n\n" + traffic_table()
