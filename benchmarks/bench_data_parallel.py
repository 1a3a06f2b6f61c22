"""SEAT on several processes: step time and bytes per step, compact-gradient data
parallelism (seat.distributed) vs torch DDP full fine-tuning of the same weights, and
FSDP2 sharding (seat.distributed.shard) vs FSDP2 full fine-tuning.

    python benchmarks/bench_data_parallel.py [--quick] [--ranks 1 2 4] [--steps N] [--no-fsdp]
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
  seat fsdp    seat.patch + seat.distributed.shard (FSDP2 per decoder layer and on the
               model) + handle.optimizer(): FSDP2's all-gathers and dense reduce-scatter
               of the trained weights' gradients, seat's state per shard (2+ ranks)
  fsdp dense   FSDP2 the same way around the model, the same linears trained by
               torch.optim.AdamW on CE over x and x~ (2+ ranks)
Columns: median step time (forward, backward, communication, optimizer step), the part
of it spent waiting for communication after backward (seat: in the optimizer's
synchronization; DDP overlaps inside backward, so it is not separable there), and the
gradient bytes all-reduced per step and rank (seat: counted by the optimizer; DDP: the
trainable gradients' bytes, what its buckets carry; FSDP2: the payload of every all-gather
(the gathered output) and reduce-scatter (the input) of the step, counted where FSDP2 calls
torch.distributed). With more ranks than cores the step time measures the cores' sharing
as much as communication: read it with the core count.
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
    elif method in ("seat fsdp", "fsdp dense"):
        step, sent = _fsdp_method(method, model, rank, vocab)
        waits = []
    else:
        targets = _train_only_linears(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = torch.optim.AdamW(targets, lr=1e-4)
        waits = []

        def step(i):
            _dense_step(ddp, opt, _batch(rank, i, vocab))

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
                   else None if "fsdp" in method
                   else sum(p.numel() for g in opt.param_groups for p in g["params"]))
        Path(out).write_text(json.dumps({"ms": statistics.median(times) * 1e3,
                                         "wait_ms": statistics.median(waits) * 1e3 if waits else None,
                                         "bytes": sent(), "trained": trained,
                                         "threads": torch.get_num_threads()}))
    dist.destroy_process_group()


def _train_only_linears(model) -> list:
    """Freeze every parameter but the decoder's linear weights (seat's targets); return those."""
    import torch

    head = model.get_output_embeddings().weight
    targets = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not head]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in targets:
        p.requires_grad_(True)
    return targets


def _dense_step(model, opt, b: dict) -> None:
    """Full fine-tuning's step: CE over x and x~ (no reference forward), AdamW."""
    import torch

    out = model(input_ids=torch.cat([b["input_ids"], b["pert_input_ids"]]),
                attention_mask=torch.cat([b["attention_mask"], b["pert_attention_mask"]]),
                labels=torch.cat([b["labels"], b["labels"]]))
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _fsdp_method(method: str, model, rank: int, vocab: int):
    """(step, sent) of seat fsdp / fsdp dense; sent() is the payload of the last step's
    all-gathers and reduce-scatters (counted by wrapping the torch.distributed calls FSDP2
    makes)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    counted = {"bytes": 0}
    for name in ("all_gather_single", "reduce_scatter_single"):
        original = getattr(dist, name)

        def counting(*args, _original=original, _gather=name.startswith("all_gather"), **kwargs):
            whole = kwargs.get("output") if _gather else kwargs.get("input")
            whole = whole if whole is not None else args[0 if _gather else 1]
            counted["bytes"] += whole.numel() * whole.element_size()
            return _original(*args, **kwargs)

        setattr(dist, name, counting)
    if method == "seat fsdp":
        import seat
        from seat.distributed import shard

        handle = seat.patch(model, seat.SeatConfig(density=DENSITY))
        shard(handle)
        opt = handle.optimizer(lr=1e-4)

        def train(b):
            handle.loss(b).loss.backward()
            opt.step()
            opt.zero_grad()
    else:
        _train_only_linears(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def train(b):
            _dense_step(model, opt, b)
    last = {"bytes": 0}

    def step(i):
        counted["bytes"] = 0
        train(_batch(rank, i, vocab))
        last["bytes"] = counted["bytes"]

    return step, lambda: last["bytes"]


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
        # The result is written and the process group destroyed: leave without the
        # interpreter's teardown, where a c10d thread still being joined can abort the rank
        # ("terminate called without an active exception", exit code -6) after its work.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    from _common import Progress, environment, write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model, ranks 1 and 2, 3 steps")
    parser.add_argument("--ranks", type=int, nargs="+", help="process counts (default 1 2 4; --quick 1 2)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 7; --quick 3)")
    parser.add_argument("--no-fsdp", action="store_true", help="data parallelism only (no FSDP2 rows)")
    parser.add_argument("--device", choices=("cpu",), default="cpu", help="CPU processes joined by gloo")
    parser.add_argument("--out", type=Path, help="results folder (default: results/<device name>)")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.ranks or []):
        parser.error("--ranks: process counts must be >= 1")
    size = "quick" if args.quick else "full"
    ranks = args.ranks or ([1, 2] if args.quick else [1, 2, 4])
    steps = args.steps or (3 if args.quick else 7)
    progress = progress or Progress()
    def methods(n: int) -> tuple:
        return ("seat dp", "ddp dense") + (() if args.no_fsdp or n < 2 else ("seat fsdp", "fsdp dense"))

    progress.expect(sum(len(methods(n)) for n in ranks))
    env = environment("cpu")
    rows = []
    for n in ranks:
        for method in methods(n):
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
        sharded = next((r for r in rows if r["method"] == "fsdp dense" and r["ranks"] == row["ranks"]), None)
        if row["method"] == "seat fsdp" and sharded and sharded["mb_per_step"]:
            row["bytes_vs_ddp"] = row["mb_per_step"] / sharded["mb_per_step"]
    name = "data_parallel_quick" if args.quick else "data_parallel"
    md = write_results(
        name, rows, env, title=f"Several CPU processes (gloo): seat dp vs DDP dense, seat fsdp vs FSDP2 dense, "
                               f"{ROWS_PER_RANK}x{SEQ} tokens per rank, d={DENSITY}",
        columns=[("method", "method"), ("ranks", "ranks"), ("threads_per_rank", "threads/rank"), ("ms", "ms/step"),
                 ("wait_ms", "comm wait ms"), ("wait_share", "wait share"), ("mb_per_step", "MB/step/rank"),
                 ("bytes_vs_ddp", "bytes vs dense")],
        notes=["MB/step/rank: gradient payload all-reduced per optimizer step (seat: the compact gradients, counted "
               "by SparseAdamW; DDP: every trained weight's fp32 gradient). A ring all-reduce sends 2(N-1)/N of it. FSDP2 "
               "rows: the payload of the step's all-gathers (every layer gathered for the forward and the backward, "
               "seat also for the reference forward; the root once) and reduce-scatters (the trained weights' dense "
               "gradients); a ring sends (N-1)/N of it. bytes vs dense: seat dp / DDP, seat fsdp / FSDP2 dense.",
               "comm wait: median time step() spends finishing the all-reduces that backward started (seat only).",
               "The cores are split between the ranks (threads/rank): with more ranks than cores the step time "
               "includes the sharing. CPU timings depend on the machine's load (the line above)."],
        out_dir=args.out)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
