"""One SEAT training step with seat.patch vs naive SEAT, full fine-tuning and LoRA.

    python benchmarks/bench_seat_step.py [--quick | --size tiny|quick|full|llama3-8b] [--device cpu|cuda]
                                         [--steps N] [--batch B] [--seq T] [--dtype float32|bfloat16]
                                         [--gradient-checkpointing] [--budget-gib G] [--methods a,b]

A Llama-shaped causal LM built from a LlamaConfig in code (random weights, no download):
full: hidden 1024, 16 layers, MLP 2816, 16 heads / 8 KV heads, vocabulary 32000 (~252M
parameters); --quick: hidden 256, 4 layers, MLP 704 (~20M); llama3-8b: Llama-3-8B's
shapes (8.03B parameters, for a GPU: built on the device in --dtype). A paired batch like
seat.PairedCollator's (x and x~, B sequences each, answer-only labels). Every method
trains the same weights (the 7 linear layers of every decoder block; embeddings, norms
and lm_head frozen), starts from the same initial model (same seed) and runs in a fresh
model instance, one after the other, everything freed in between:

  naive-seat   a deep copy of the model as the frozen reference; forward of the model on
               x and x~ (one batch of 2B), of the reference on x~ (no grad); the full
               (2B, T, V) logits; log_softmax of both; CE(x) + KL(p_ref || p_cur)(x~) in
               eager torch; backward; each weight's gradient multiplied by its bool mask
               (density 0.05); dense torch.optim.AdamW step.
  seat         seat.patch(model, density=0.05); handle.optimizer(lr);
               handle.loss(batch).loss.backward(); step; zero_grad.
  seat-chunk64 the same with SeatConfig(chunk_size=64): the fused-linear loss computes
               the logits of 64 rows at a time (default 0: chunks of up to 256 MiB of
               fp32 logits, i.e. every row of a small batch at once)
  full-ft      dense AdamW on the same weights, CE on x only (model(..., labels=...)).
  lora-r8      peft LoRA r=8 on q,k,v,o,gate,up,down, CE on x only (skipped without peft).

Per method: one warm-up step (its loss is reported: before any update every method
computes the same CE, and the KL is 0), --steps timed steps (median), then one step
measured for memory (benchmarks/_memory.py: the tensors alive at the step's start,
counted explicitly, + the peak of the step's allocations, from torch.profiler's memory
events on CPU or max_memory_allocated on CUDA). Ratios are against naive-seat, in the
same run, and step times against full-ft. With --budget-gib each row says whether the
method fits that much memory; on CUDA the budget is enforced, and a method that needs
more gives an "out of memory" row instead of numbers (the Llama-3-8B question: does it
fit a 24 GB-class GPU at all).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Progress, environment, measure, pyplot, write_results  # noqa: E402
from _memory import (  # noqa: E402
    PeakMemory,
    alive_tensor_bytes,
    module_tensors,
    optimizer_tensors,
    quant_state_tensors,
    release_freed_memory,
    reset_rss_peak,
    rss_bytes,
)

import seat  # noqa: E402
import seat.ops  # noqa: E402

SIZES = {  # LlamaConfig fields
    "full": dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000),
    "quick": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    # Llama-3-8B's shapes (8.03B params; random weights, nothing downloaded): for a GPU,
    # in bfloat16, with gradient checkpointing (see benchmarks/gpu.sh)
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DENSITY = 0.05
LR = 1e-4
METHODS = ("naive-seat", "seat", "seat-chunk64", "qseat-nf4", "full-ft", "lora-r8")
MiB = 2**20


# ---------------------------------------------------------------------- model and batch
def make_config(size: str, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SIZES[size], max_position_embeddings=max(seq, 128), tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0)


def make_model(config, device, dtype, seed: int = 0, gradient_checkpointing: bool = False):
    """The same random model for every method (seeded), block linears trainable only.
    Any Llama-style config (Llama, Qwen2, Mistral: the model class follows the config).
    Built directly on `device` in `dtype`: an 8B model must never exist in fp32 or on the
    host (32 GB, minutes of CPU init), nor pass through more memory than the budget."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    model.train()
    if gradient_checkpointing:  # non-reentrant: works with frozen embeddings (inputs without grad)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for name, p in model.named_parameters():
        p.requires_grad_(is_block_linear(name))
    return model


def is_block_linear(name: str) -> bool:
    return ".layers." in name and name.endswith(".weight") and name.split(".")[-2] in BLOCK_LINEARS


def paired_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    """tests/_models.py's paired_batch for any vocabulary: x is a prompt of 5-7 tokens
    (the "entity" is tokens 1-2) then an answer (the labels); x~ the same with the entity
    replaced; real lengths length, length-1, length-2, ...; right padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        n = length - (b % 3)
        tokens = torch.randint(10, vocab, (n,), generator=g)
        labels = tokens.clone()
        labels[: 5 + b % 3] = -100
        pert = tokens.clone()
        pert[1:3] = torch.randint(3, 10, (2,), generator=g)
        rows.append((tokens, labels, pert))

    def pad(t, value):
        return torch.cat([t, torch.full((length - t.numel(),), value, dtype=t.dtype)])

    return {"input_ids": torch.stack([pad(r[0], 0) for r in rows]),
            "attention_mask": torch.stack([pad(torch.ones_like(r[0]), 0) for r in rows]),
            "labels": torch.stack([pad(r[1], -100) for r in rows]),
            "pert_input_ids": torch.stack([pad(r[2], 0) for r in rows]),
            "pert_attention_mask": torch.stack([pad(torch.ones_like(r[2]), 0) for r in rows])}


def positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)  # as seat.loss does


def kl_rows(pert_mask):
    """(B, T) bool: x~ positions followed by a real token (seat's kl_tokens='all')."""
    m = pert_mask.bool()
    rows = torch.zeros_like(m)
    rows[:, :-1] = m[:, :-1] & m[:, 1:]
    return rows


def bool_mask(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
    mask[idx.long()] = True
    return mask.view(p.shape)


# ---------------------------------------------------------------------- the methods
# Each builder returns (step, alive, tokens, info): step(phase) runs one training step and
# returns the loss; alive lists what the step's start holds (for the memory count).
NULL_PHASE = lambda name: contextlib.nullcontext()  # noqa: E731


def build_naive_seat(config, batch, device, dtype, gradient_checkpointing: bool = False):
    from seat.masks import param_seed, random_mask

    model = make_model(config, device, dtype, gradient_checkpointing=gradient_checkpointing)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # the same masks seat.patch draws (seeded per weight name), as dense bool tensors
    masks = [bool_mask(p, random_mask(p.numel(), DENSITY, seed=param_seed(0, n), device=p.device))
             for n, p in zip(names, params)]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    n = batch["input_ids"].shape[0]
    ids = torch.cat([batch["input_ids"], batch["pert_input_ids"]])
    att = torch.cat([batch["attention_mask"], batch["pert_attention_mask"]])
    pos = positions(att)
    rows = kl_rows(batch["pert_attention_mask"])
    shifted = batch["labels"][:, 1:]

    def seat_loss():  # a function, so that only what autograd saves outlives it
        with torch.no_grad():
            ref_logits = ref(input_ids=batch["pert_input_ids"], attention_mask=batch["pert_attention_mask"],
                             position_ids=pos[n:]).logits  # (B, T, V)
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits  # (2B, T, V)
        log_p = torch.log_softmax(logits.float(), dim=-1)
        ce = F.nll_loss(log_p[:n, :-1].reshape(-1, log_p.shape[-1]), shifted.reshape(-1), ignore_index=-100)
        log_ref = torch.log_softmax(ref_logits.float(), dim=-1)
        kl_tok = (log_ref.exp() * (log_ref - log_p[n:])).sum(-1)  # KL(p_ref || p_cur) per position
        kl = (kl_tok * rows).sum() / rows.sum()
        return ce + kl

    def step(phase):
        with phase("forward"):
            loss = seat_loss()
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            with torch.no_grad():
                for p, m in zip(params, masks):
                    p.grad.mul_(m)
            opt.step()
            opt.zero_grad()
        return float(loss.detach())

    alive = lambda: [module_tensors(model), module_tensors(ref), optimizer_tensors(opt), masks, batch]  # noqa: E731
    tokens = int(att.sum())
    info = {"trainable_params": sum(p.numel() for p in params), "optimizer": "torch.optim.AdamW (dense)",
            "keep": (model, ref, opt, masks)}
    return step, alive, tokens, info


def _seat_step(handle, opt, batch):
    def step(phase):
        with phase("forward"):  # reference forward on x~, forward on x and x~, fused-linear loss
            loss = handle.loss(batch).loss
        with phase("backward"):  # SparseAdamW's hooks compact each dense grad and free it
            loss.backward()  # (update_in_backward=True: and apply its update)
        with phase("optimizer"):
            opt.step()
            opt.zero_grad()
        return float(loss.detach())

    return step


def mask_tensors(mask) -> list[torch.Tensor]:
    """The tensors a mask holds (bare int32 indices, or what its state_dict() saves)."""
    if isinstance(mask, torch.Tensor):
        return [mask]
    return [t for t in mask.state_dict().values() if isinstance(t, torch.Tensor)]


def build_seat(config, batch, device, dtype, chunk_size: int = 0, gradient_checkpointing: bool = False,
               optimizer_kwargs: dict | None = None, seat_kwargs: dict | None = None):
    """seat.patch + handle.optimizer; optimizer_kwargs go to SparseAdamW (e.g. the lean
    modes: grad_dtype=torch.bfloat16, update_in_backward=True, state_bits=8), seat_kwargs
    to seat.patch's SeatConfig (e.g. mask_encoding="implicit")."""
    model = make_model(config, device, dtype, gradient_checkpointing=gradient_checkpointing)
    handle = seat.patch(model, density=DENSITY, chunk_size=chunk_size, **(seat_kwargs or {}))
    opt = handle.optimizer(lr=LR, **{"weight_decay": 0.0, **(optimizer_kwargs or {})})  # as the AdamW baselines
    step = _seat_step(handle, opt, batch)
    targets = lambda: [[mask_tensors(t.idx), t.original] for t in handle.targets.values()]  # noqa: E731
    alive = lambda: [module_tensors(model), optimizer_tensors(opt), targets(), batch]  # noqa: E731
    tokens = int(batch["attention_mask"].sum() + batch["pert_attention_mask"].sum())
    # unpatch removes SparseAdamW's gradient hooks: without it the hooks (held by the
    # parameters in C++, invisible to Python's gc) keep the optimizer, and through its
    # state dicts the target weights, alive after everything else is dropped
    info = {"trainable_params": handle.num_trainable, "optimizer": "seat.optim.SparseAdamW",
            "keep": (model, handle, opt), "cleanup": handle.unpatch}
    return step, alive, tokens, info


def build_qseat(config, batch, device, dtype, gradient_checkpointing: bool = False):
    """QSEAT: the same seeded model, saved and loaded back the way a user loads a 4-bit
    base (from_pretrained with BitsAndBytesConfig: nf4, double quantization, compute
    dtype = dtype), then seat.patch as for "seat": the block linears are bitsandbytes
    Linear4bit layers whose packed weights stay frozen, a sparse delta trains beside each."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as folder:
        make_model(config, "cpu", dtype).save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=dtype,
                                                     device_map=str(torch.device(device)))
    model.config.use_cache = False
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    handle = seat.patch(model, density=DENSITY)
    opt = handle.optimizer(lr=LR, weight_decay=0.0)
    step = _seat_step(handle, opt, batch)
    targets = lambda: [[mask_tensors(t.mask)] for t in handle.targets.values()]  # noqa: E731
    alive = lambda: [module_tensors(model), quant_state_tensors(model), optimizer_tensors(opt), targets(),  # noqa: E731
                     batch]
    tokens = int(batch["attention_mask"].sum() + batch["pert_attention_mask"].sum())
    info = {"trainable_params": handle.num_trainable, "optimizer": "seat.optim.SparseAdamW (deltas)",
            "keep": (model, handle, opt), "cleanup": handle.revert}
    return step, alive, tokens, info


def _ce_step(model, opt, batch):
    pos = positions(batch["attention_mask"])

    def step(phase):
        with phase("forward"):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                         labels=batch["labels"]).loss
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            opt.step()
            opt.zero_grad()
        return float(loss.detach())

    return step


def _dense_adamw_ce(model, batch, optimizer_label):
    """CE-only training of the model's trainable parameters with torch's AdamW (full FT, LoRA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    alive = lambda: [module_tensors(model), optimizer_tensors(opt), batch]  # noqa: E731
    info = {"trainable_params": sum(p.numel() for p in params), "optimizer": optimizer_label, "keep": (model, opt)}
    return _ce_step(model, opt, batch), alive, int(batch["attention_mask"].sum()), info


def build_full_ft(config, batch, device, dtype, gradient_checkpointing: bool = False):
    return _dense_adamw_ce(make_model(config, device, dtype, gradient_checkpointing=gradient_checkpointing), batch,
                           "torch.optim.AdamW (dense)")


def build_lora(config, batch, device, dtype, gradient_checkpointing: bool = False):
    import peft

    base = make_model(config, device, dtype, gradient_checkpointing=gradient_checkpointing)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(BLOCK_LINEARS),
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lora)  # freezes the base model
    return _dense_adamw_ce(model, batch, "torch.optim.AdamW (LoRA params)")


BUILDERS = {"naive-seat": build_naive_seat, "seat": build_seat,
            "seat-chunk64": lambda *a, **k: build_seat(*a, chunk_size=64, **k), "qseat-nf4": build_qseat,
            "full-ft": build_full_ft, "lora-r8": build_lora}


def run_method(method, config, batch, device, dtype, steps, checkpointing=False, budget_bytes=None):
    """One method's row: timings, peak memory, and whether it fits `budget_bytes`. A method
    that runs out of device memory (on CUDA a budget is enforced: see main) gives a row
    saying so, not an error: "does not fit" is the result."""
    release_freed_memory()
    rss_before, _ = rss_bytes()
    try:
        row = _run_method(method, config, batch, device, dtype, steps, checkpointing)
    except torch.OutOfMemoryError as exc:
        row = {"method": method, "oom": True, "error": str(exc).splitlines()[0][:300]}
    row["rss_before_method_mib"] = None if rss_before is None else rss_before / MiB
    if budget_bytes is not None:
        row["fits_budget"] = not row.get("oom") and row["peak_bytes"] <= budget_bytes
    row["load_avg_1m"] = os.getloadavg()[0]  # other processes on the machine slow the timings
    return row  # the caller frees what this method built (release_freed_memory)


def _run_method(method, config, batch, device, dtype, steps, checkpointing):
    step, alive, tokens, info = BUILDERS[method](config, batch, device, dtype, gradient_checkpointing=checkpointing)
    try:
        first_loss = step(NULL_PHASE)  # warm-up; optimizer state exists from here on

        rss_peak = []

        def timed():
            reset_rss_peak()
            step(NULL_PHASE)
            rss_peak.append(rss_bytes()[1])

        # steps timed one by one (CUDA: synchronized), not do_bench: see _common.measure
        timing = measure(timed, device=device, warmup=0, repeats=steps, do_bench=False)
        gc_bytes = alive_tensor_bytes(device)  # cross-check of the explicit count (every tensor gc sees)
        with PeakMemory(device, alive()) as tracker:
            step(tracker.phase)
    finally:  # also after running out of memory: free what the next method needs
        if "cleanup" in info:
            info["cleanup"]()
    report = tracker.report
    return {"method": method, "oom": False, "trainable_params": info["trainable_params"],
            "optimizer": info["optimizer"], "tokens_per_step": tokens, **timing,
            "tokens_per_s": tokens / (timing["ms"] / 1e3),
            "peak_bytes": report.peak_bytes, "start_bytes": report.start_bytes,
            "transient_bytes": report.transient_peak_bytes, "peak_mib": report.peak_bytes / MiB,
            "start_mib": report.start_bytes / MiB, "transient_mib": report.transient_peak_bytes / MiB,
            "peak_phase": report.peak_phase, "peak_ops": " > ".join(report.peak_ops),
            **{f"transient_{k}_mib": v / MiB for k, v in report.phases.items()},
            "end_bytes": report.end_bytes, "memory_events": report.n_events, "memory_method": report.method,
            "alive_gc_bytes": gc_bytes, "first_loss": first_loss,
            "rss_peak_mib": None if None in rss_peak or not rss_peak else max(rss_peak) / MiB}


def chunk_note(vocab: int, dtype, batch) -> str:
    """How the chunked fused-linear loss splits this batch's rows (from its own constants)."""
    import importlib

    module = importlib.import_module("seat.ops.fused_linear_paired_loss")
    n_ce = int((batch["labels"][:, 1:] != -100).sum())
    n_kl = int(kl_rows(batch["pert_attention_mask"]).sum())
    note = ("chunked: one chunk of rows at a time, with its fp32 logits, the matching reference logits and "
            "their gradient; chunks never mix x and x~ rows")
    budget = getattr(module, "CHUNK_BYTES", None)
    auto = getattr(module, "auto_chunk_rows", None)
    if budget is not None and auto is not None:
        try:
            rows = auto(vocab, torch.float64 if dtype == torch.float64 else torch.float32)
            note += (f"; chunk_size=0 picks {rows} rows per chunk here (fp32 logits under {budget / MiB:.0f} MiB), "
                     f"so this batch's {n_ce} CE rows of x and {n_kl} KL rows of x~ make "
                     f"{-(-n_ce // rows) + -(-n_kl // rows)} chunks")
        except Exception:  # noqa: BLE001 - a changed helper: say less rather than fail the run
            pass
    return note + f"; seat-chunk64 sets chunk_size=64 ({-(-n_ce // 64) + -(-n_kl // 64)} chunks)"


def source_state(device) -> dict:
    """Which seat ran: its path, its native build, and tracked files modified since the commit."""
    import subprocess

    from seat.ops import _backend

    root = Path(seat.__file__).resolve().parents[2]
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root, check=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        dirty = None
    loss = seat.ops.OPS["fused_linear_paired_loss"]
    try:
        chosen = _backend.select(loss.name, loss.kernels, torch.device(device))[0]
    except Exception as exc:  # noqa: BLE001 - a stale native build: the run itself will say so
        chosen = f"unknown ({type(exc).__name__})"
    return {"seat_path": str(root), "seat_modified_tracked_files": dirty,
            "fused_linear_paired_loss_backends": list(loss.backends()), "fused_linear_paired_loss_impl": chosen}


# ---------------------------------------------------------------------- main
def goal_notes(by_method: dict, budget_gib: float | None) -> list[str]:
    """The issue's goals for seat.patch, each with its verdict from this run's rows."""
    naive, mine, full = by_method.get("naive-seat"), by_method.get("seat"), by_method.get("full-ft")
    if mine is None:
        return []

    def verdict(ok):
        return "met" if ok else "NOT met"

    notes = []
    if mine["oom"]:
        notes.append("seat ran out of memory: no ratios.")
    elif naive is None:
        notes.append("naive SEAT not run (--methods): no ratios against it.")
    elif naive["oom"]:
        notes.append("naive SEAT ran out of memory: no ratios against it.")
    else:
        memory, speed = mine["memory_vs_naive"], mine["speed_vs_naive"]
        notes.append(f"seat / naive SEAT peak memory = {memory:.3f} (goal: below 0.5: {verdict(memory < 0.5)}).")
        notes.append(f"seat / naive SEAT tokens/s = {speed:.2f} (goal: at least 2: {verdict(speed >= 2)}).")
    if full is not None and not full["oom"] and not mine["oom"]:
        t = mine["step_time_vs_full_ft"]
        notes.append(f"seat / full fine-tuning step time = {t:.2f} (goal, where full FT fits: at most 1.3: "
                     f"{verdict(t <= 1.3)}).")
    if budget_gib is not None:
        def fits(r):
            return "fits" if r.get("fits_budget") else "out of memory" if r["oom"] else "does not fit"

        each = "; ".join(f"{m}: {fits(r)}" for m, r in by_method.items())
        goal = ("" if naive is None else f" (goal: seat fits where naive SEAT does not: "
                f"{verdict(mine.get('fits_budget') and not naive.get('fits_budget'))})")
        notes.append(f"{budget_gib:g} GiB budget: {each}{goal}.")
    return notes


def ratio(a, b):
    """a / b, or None where either is missing (a method that ran out of memory)."""
    return None if a is None or b is None or b == 0 else a / b


def main(argv=None, progress: Progress | None = None) -> int:
    """Run the benchmark (argv: the command line's arguments); progress: see _common.Progress."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ~20M model (same as --size quick)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="activation checkpointing of every decoder layer (non-reentrant), for every method")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="a memory budget in GiB: each method's row says whether its peak fits; on CUDA it "
                             "is enforced (torch.cuda.set_per_process_memory_fraction), so a method that needs "
                             "more runs out of memory and its row says so")
    parser.add_argument("--tag", default="", help="appended to the results' file names (e.g. seq1024)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=2, help="pairs per batch (x and x~ each)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (padded length)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--out", type=Path, help="results folder (default: results/<device name>)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        parser.error("--methods is empty")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}")
    if args.budget_gib is not None and args.budget_gib <= 0:
        parser.error(f"--budget-gib must be > 0; got {args.budget_gib}")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        parser.error(f"--tag must be letters, digits, '_', '.' or '-'; got {args.tag!r}")
    if args.steps < 1 or args.batch < 1 or args.seq < 8:
        parser.error(f"need --steps >= 1, --batch >= 1, --seq >= 8; got {args.steps}, {args.batch}, {args.seq}")
    if args.device == "cuda" and not torch.cuda.is_available():  # last: every other argument checked first
        parser.error("--device cuda: no CUDA device is visible to torch")
    budget = None if args.budget_gib is None else int(args.budget_gib * 2**30)
    if budget is not None and args.device == "cuda":
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if budget > total:
            parser.error(f"--budget-gib {args.budget_gib} is more than the GPU's {total / 2**30:.1f} GiB")
        # the caching allocator refuses to hold more than this (it frees its cache and
        # retries first): a method that needs more than the budget fails as it would on
        # a GPU of that size. The CUDA context itself (~0.5 GiB) is outside the budget.
        torch.cuda.set_per_process_memory_fraction(budget / total)
    try:
        return _main(args, methods, budget, progress or Progress())
    finally:  # run_all.py runs more benchmarks in this process: give them the whole GPU back
        if budget is not None and args.device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)


def _main(args, methods, budget, progress) -> int:
    size = args.size or ("quick" if args.quick else "full")
    dtype = getattr(torch, args.dtype)

    config = make_config(size, args.seq)
    batch = {k: v.to(args.device) for k, v in paired_batch(args.batch, args.seq, config.vocab_size).items()}
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        probe = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in probe.parameters())
    n_target = sum(p.numel() for n, p in probe.named_parameters() if is_block_linear(n))
    del probe
    print(f"Llama-shaped model ({size}): {n_params / 1e6:.1f}M params, {n_target / 1e6:.1f}M in block linears, "
          f"{args.dtype}, device {args.device}, {torch.get_num_threads()} threads; batch {args.batch} pairs x "
          f"{args.seq} tokens; {args.steps} timed steps", flush=True)

    load_before = os.getloadavg()
    rows = []
    progress.expect(len(methods))
    for method in methods:
        if method == "lora-r8":
            try:
                import peft  # noqa: F401
            except ImportError:
                print("  peft not installed: lora-r8 skipped")
                progress.done(f"{method} (skipped)")
                continue
        row = run_method(method, config, batch, args.device, dtype, args.steps,
                         checkpointing=args.gradient_checkpointing, budget_bytes=budget)
        release_freed_memory()
        rows.append(row)
        progress.done(method)
        if row["oom"]:
            print(f"  {method:11s} out of memory: {row['error']}", flush=True)
            continue
        print(f"  {method:11s} {row['ms']:10.1f} ms  {row['tokens_per_s']:8.1f} tok/s  peak {row['peak_mib']:8.1f} MiB "
              f"(start {row['start_mib']:.1f} + step {row['transient_mib']:.1f}; peak in {row['peak_phase']})  "
              f"loss@1 {row['first_loss']:.4f}", flush=True)
        if row["alive_gc_bytes"] > row["start_bytes"] * 1.01 + MiB:
            print(f"    note: gc sees {row['alive_gc_bytes'] / MiB:.1f} MiB of tensors alive, the explicit count "
                  f"{row['start_mib']:.1f} MiB", flush=True)

    by_method = {r["method"]: r for r in rows}
    naive, full_ft = by_method.get("naive-seat", {}), by_method.get("full-ft", {})  # without: no ratio
    for r in rows:
        r["memory_vs_naive"] = ratio(r.get("peak_bytes"), naive.get("peak_bytes"))
        r["speed_vs_naive"] = ratio(r.get("tokens_per_s"), naive.get("tokens_per_s"))
        r["step_speed_vs_naive"] = ratio(naive.get("ms"), r.get("ms"))
        r["step_time_vs_full_ft"] = ratio(r.get("ms"), full_ft.get("ms"))
    env = environment(args.device)
    env.update(source_state(args.device))
    env.update(size=size, model_config={**SIZES[size], "tie_word_embeddings": False}, n_params=n_params,
               n_block_linear_params=n_target, dtype=args.dtype, batch_pairs=args.batch, seq=args.seq,
               timed_steps=args.steps, density=DENSITY, lr=LR, threads=torch.get_num_threads(),
               gradient_checkpointing=args.gradient_checkpointing, budget_gib=args.budget_gib,
               omp_num_threads=os.environ.get("OMP_NUM_THREADS"), load_avg_before=load_before,
               load_avg_after=os.getloadavg(), cpus=os.cpu_count())
    name = ("seat_step" if size == "full" else f"seat_step_{size}") + (f"_{args.tag}" if args.tag else "")
    goals = goal_notes(by_method, args.budget_gib)
    md = write_results(
        name, rows, env, out_dir=args.out,
        title=f"One SEAT training step, Llama-shaped {n_params / 1e6:.3g}M-param model ({args.dtype}), "
              f"batch {args.batch} pairs x {args.seq} tokens"
              + (", gradient checkpointing" if args.gradient_checkpointing else ""),
        columns=[("method", "method"), ("peak_mib", "peak MiB"), ("memory_vs_naive", "peak vs naive SEAT"),
                 *([("fits_budget", f"fits {args.budget_gib:g} GiB")] if budget is not None else []),
                 ("start_mib", "alive at step start MiB"), ("transient_mib", "step transient MiB"),
                 ("peak_phase", "peak in"), ("ms", "step ms (median)"), ("tokens_per_s", "tokens/s"),
                 ("speed_vs_naive", "tokens/s vs naive SEAT"), ("step_time_vs_full_ft", "step time vs full FT"),
                 ("first_loss", "loss, step 1"), ("rss_peak_mib", "process RSS peak MiB")],
        notes=[*goals,
               f"Model: LlamaForCausalLM from LlamaConfig({', '.join(f'{k}={v}' for k, v in SIZES[size].items())}, "
               f"untied lm_head), random weights, {n_params / 1e6:.1f}M params, {args.dtype}; trained weights: "
               f"the 7 linear layers of every block ({n_target / 1e6:.1f}M), everything else frozen; lr {LR}, "
               f"no weight decay; density {DENSITY} (naive SEAT uses seat's exact masks, as bool tensors).",
               f"Batch: {args.batch} pairs (x, x~) of {args.seq} tokens (real lengths {args.seq}, {args.seq}-1, ...; "
               "answer-only labels after a 5-7 token prompt; the entity, tokens 1-2, replaced in x~); KL on "
               "every real position of x~. tokens/s counts the real tokens the trained forward processes: x and "
               "x~ for naive SEAT and seat, x only for full-ft and LoRA (the reference forward is not counted).",
               f"Time: median of {args.steps} steps after 1 warm-up step; a step is forward (incl. the reference "
               "forward and the loss), backward, optimizer step, zero_grad. "
               f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs; 1-minute load average "
               f"{load_before[0]:.1f} before the run, {env['load_avg_after'][0]:.1f} after"
               + (" (above the thread count: other processes shared the CPUs and the timings are slowed by them; "
                  "the memory is not)" if max(load_before[0], env["load_avg_after"][0]) > torch.get_num_threads()
                  else "") + ". seat and "
               "seat-chunk64 do the same work (the chunk size only changes how the loss op splits its rows): "
               "the gap between their times is a measure of this run's timing noise.",
               *([f"Memory budget {args.budget_gib:g} GiB: "
                  + ("enforced on torch's CUDA allocator (set_per_process_memory_fraction; the CUDA context is "
                     "outside it): a method that needs more ran out of memory ('out of memory' rows, no numbers)"
                     if args.device == "cuda" else "not enforced on CPU; 'fits' compares the measured peak")
                  + "."] if budget is not None else []),
               "Peak memory (benchmarks/_memory.py) = tensors alive at the step's start, counted explicitly as "
               "unique storages (model parameters and buffers, the reference copy, optimizer state, seat's "
               "masks and base values, bool masks, the batch) + the step's transient peak: on CPU the largest "
               "running sum of torch.profiler's allocation/free events (c10 CPU allocator, exact requested "
               "bytes), on CUDA max_memory_allocated - memory_allocated at the start. Not counted: memory "
               "outside torch's allocator (oneDNN/BLAS scratch, Python objects, autograd nodes).",
               "'peak in': the step phase where the peak happened (forward includes the reference forward and "
               "the loss). Process RSS peak: the kernel's VmHWM over the timed steps (whole process, torch "
               "libraries included; a coarse cross-check, not the metric).",
               "loss, step 1: the loss of the warm-up step, before any update: the reference equals the model, so "
               "the KL is 0 and every method shows the same CE (a check that they all compute the same thing).",
               "naive SEAT forwards x and x~ as one batch of 2B sequences, like seat, so the two differ only in "
               "what the issue lists: the reference copy, dense AdamW + gradient masking, the materialized logits.",
               f"seat's loss op fused_linear_paired_loss ran its '{env['fused_linear_paired_loss_impl']}' "
               "implementation (" + ("the pure-torch reference, which materializes the fp32 logits of every "
               "counted row and several (rows, V) temporaries" if env["fused_linear_paired_loss_impl"] == "reference"
               else chunk_note(config.vocab_size, dtype, batch)) + ")."],
    )
    print(md.read_text())
    plot(rows, md.with_suffix(".png"), f"{n_params / 1e6:.3g}M params, {env['device_name']}")
    return 0


def plot(rows, path, subtitle):
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [r["method"] for r in rows]
    start = [r.get("start_mib") or 0 for r in rows]  # a method out of memory: no bar, a label
    transient = [r.get("transient_mib") or 0 for r in rows]
    a.barh(labels, start, color="tab:gray", label="alive at step start")
    a.barh(labels, transient, left=start, color="tab:orange", label="step transient peak")
    for i, r in enumerate(rows):
        text = " out of memory" if r["oom"] else f" {r['memory_vs_naive']:.2f}x" if r["memory_vs_naive"] else ""
        a.text(r.get("peak_mib") or 0, i, text, va="center")
    a.set_xlabel("peak tensor memory of one step, MiB")
    a.invert_yaxis()
    a.legend(loc="lower right")
    a.set_xlim(0, max([r.get("peak_mib") or 0 for r in rows] + [1]) * 1.25)
    b.barh(labels, [r.get("tokens_per_s") or 0 for r in rows], color="tab:blue")
    b.set_xlabel("training tokens/s")
    b.invert_yaxis()
    b.set_yticklabels([])
    fig.suptitle(f"One training step: {subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
