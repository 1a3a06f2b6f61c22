"""SEAT on several processes: step time and bytes per step, compact-gradient data
parallelism (seat.distributed) vs torch DDP full fine-tuning of the same weights.

    python benchmarks/bench_data_parallel.py [--quick] [--ranks 1 2 4] [--steps N]
                                             [--out DIR (default: benchmarks/results/<device>)]

Each row is one `torchrun --nproc-per-node N` run on this machine's CPUs (gloo), every
rank training a Llama-shaped model (hidden 512, 4 layers, vocab 8192; --quick: 256, 2,
4096) on its own batch of 4 paired sequences of 64 tokens (a fixed per-rank batch, as
with one batch per GPU), with the cores split evenly between the ranks:
  seat dp      seat.patch (d=0.05, every linear) + SparseAdamW(data_parallel=...): the
               compact gradients all-reduced in 25 MiB buckets during backward
  ddp dense    torch DDP around the same model, every target linear trained by
               torch.optim.AdamW on CE over x and x~ (no reference forward): what full
               fine-tuning on N processes computes and communicates
Columns: median step time (forward, backward, communication, optimizer step), the part
of it spent waiting for communication after backward (seat: in the optimizer's
synchronization; DDP overlaps inside backward, so it is not separable there), and the
gradient bytes all-reduced per step and rank (seat: counted by the optimizer; DDP: the
trainable gradients' bytes, what its buckets carry). With more ranks than cores the step
time measures the cores' sharing as much as communication: read it with the core count.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {"full": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1376, vocab_size=8192),
           "quick": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=688, vocab_size=4096)}
ROWS_PER_RANK, SEQ, DENSITY = 4, 64, 0.05


def _model(size: str):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIGS[size], num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=SEQ + 8, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def _batch(rank: int, step: int, vocab: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(1000 * rank + step)
    ids = torch.randint(3, vocab, (ROWS_PER_RANK, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :SEQ // 2] = -100
    pert = ids.clone()
    pert[:, 1:3] = torch.randint(3, vocab, (ROWS_PER_RANK, 2), generator=g)
    ones = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "labels": labels, "pert_input_ids": pert,
            "pert_attention_mask": ones}


def worker(method: str, size: str, steps: int, out: str) -> None:
    """One rank under torchrun: `steps` timed steps after 2 warm-up steps."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(size)
    vocab = model.config.vocab_size
    if method == "seat dp":
        import seat
        from seat.distributed import DataParallel

        handle = seat.patch(model, seat.SeatConfig(density=DENSITY))
        opt = handle.optimizer(lr=1e-4, data_parallel=DataParallel(reduce="mean") if world > 1 else None)
        waits = []
        if world > 1:  # time the synchronization step() waits for (what backward did not hide)
            sync = opt.data_parallel
            finish = sync.finish

            def timed_finish(o):
                t = time.perf_counter()
                finish(o)
                waits.append(time.perf_counter() - t)

            sync.finish = timed_finish

        def step(i):
            handle.loss(_batch(rank, i, vocab)).loss.backward()
            opt.step()
            opt.zero_grad()

        def sent():
            return opt.data_parallel.last_step_grad_bytes if world > 1 else 0
    else:
        targets = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not
                   model.get_output_embeddings().weight]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in targets:
            p.requires_grad_(True)
        ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.AdamW(targets, lr=1e-4)
        waits = []

        def step(i):
            b = _batch(rank, i, vocab)
            out = ddp(input_ids=torch.cat([b["input_ids"], b["pert_input_ids"]]),
                      attention_mask=torch.cat([b["attention_mask"], b["pert_attention_mask"]]),
                      labels=torch.cat([b["labels"], b["labels"]]))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def sent():
            return sum(p.numel() * p.element_size() for p in targets) if world > 1 else 0
    for i in range(2):
        step(i)
    waits.clear()
    times = []
    for i in range(steps):
        dist.barrier()
        t = time.perf_counter()
        step(2 + i)
        times.append(time.perf_counter() - t)
    if rank == 0:
        trained = (sum(m.nnz for m in opt._masks.values()) if method == "seat dp"
                   else sum(p.numel() for g in opt.param_groups for p in g["params"]))
        Path(out).write_text(json.dumps({"ms": statistics.median(times) * 1e3,
                                         "wait_ms": statistics.median(waits) * 1e3 if waits else None,
                                         "bytes": sent(), "trained": trained,
                                         "threads": torch.get_num_threads()}))
    dist.destroy_process_group()


def run(method: str, size: str, ranks: int, steps: int) -> dict:
    threads = max(1, (os.cpu_count() or 1) // ranks)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               __file__, "--worker", method, size, str(steps), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=1800)
        return json.loads(out.read_text())


def main(argv=None, progress=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return 0
    from _common import Progress, environment, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model, ranks 1 and 2, 3 steps")
    parser.add_argument("--ranks", type=int, nargs="+", help="process counts (default 1 2 4; --quick 1 2)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 7; --quick 3)")
    parser.add_argument("--device", choices=("cpu",), default="cpu", help="CPU processes joined by gloo")
    parser.add_argument("--out", type=Path, help="results folder (default: results/<device name>)")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.ranks or []):
        parser.error("--ranks: process counts must be >= 1")
    size = "quick" if args.quick else "full"
    ranks = args.ranks or ([1, 2] if args.quick else [1, 2, 4])
    steps = args.steps or (3 if args.quick else 7)
    progress = progress or Progress()
    progress.expect(2 * len(ranks))
    env = environment("cpu")
    rows = []
    for n in ranks:
        for method in ("seat dp", "ddp dense"):
            r = run(method, size, n, steps)
            row = {"method": method, "ranks": n, "threads_per_rank": r["threads"], "ms": r["ms"],
                   "wait_ms": r["wait_ms"], "trained": r["trained"], "mb_per_step": r["bytes"] / 1e6}
            if r["wait_ms"] is not None:
                row["wait_share"] = r["wait_ms"] / r["ms"]
            rows.append(row)
            progress.done(f"{method} x{n}")
            print(f"{method:10s} ranks {n}: {r['ms']:8.1f} ms/step, {r['bytes'] / 1e6:8.3f} MB/step")
    for row in rows:
        dense = next((r for r in rows if r["method"] == "ddp dense" and r["ranks"] == row["ranks"]), None)
        if row["method"] == "seat dp" and dense and dense["mb_per_step"]:
            row["bytes_vs_ddp"] = row["mb_per_step"] / dense["mb_per_step"]
    name = "data_parallel_quick" if args.quick else "data_parallel"
    md = write_results(
        name, rows, env, title=f"Data parallelism on CPU processes (gloo): seat dp vs DDP dense, "
                               f"{ROWS_PER_RANK}x{SEQ} tokens per rank, d={DENSITY}",
        columns=[("method", "method"), ("ranks", "ranks"), ("threads_per_rank", "threads/rank"), ("ms", "ms/step"),
                 ("wait_ms", "comm wait ms"), ("wait_share", "wait share"), ("mb_per_step", "MB/step/rank"),
                 ("bytes_vs_ddp", "bytes vs DDP")],
        notes=["MB/step/rank: gradient payload all-reduced per optimizer step (seat: the compact gradients, counted "
               "by SparseAdamW; DDP: every trained weight's fp32 gradient). A ring all-reduce sends 2(N-1)/N of it.",
               "comm wait: median time step() spends finishing the all-reduces that backward started (seat only).",
               "The cores are split between the ranks (threads/rank): with more ranks than cores the step time "
               "includes the sharing. CPU timings depend on the machine's load (the line above)."],
        out_dir=args.out)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
