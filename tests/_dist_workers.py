"""Workers for tests/_distributed.run_ranks: SEAT training of a tiny Llama on a share of a
global batch, with compact-gradient data parallelism, and what it communicated."""
from __future__ import annotations

import contextlib

import torch

from _models import paired_batch, tiny_model

GLOBAL_ROWS = 4  # rows per micro-batch of the global batch (divisible by 1, 2 and 4 ranks)


def global_micro_batches(step: int, accumulation: int) -> list[dict]:
    """The global batch of optimizer step `step`: `accumulation` micro-batches of GLOBAL_ROWS."""
    return [paired_batch(GLOBAL_ROWS, length=12, seed=1000 * step + i) for i in range(accumulation)]


def share(batch: dict, rank: int, world_size: int) -> dict:
    rows = GLOBAL_ROWS // world_size
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}


class AllReduceLog:
    """Records the size of every all_reduce (monkeypatched over torch.distributed's)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.original, self.calls = dist, dist.all_reduce, []

    def __enter__(self):
        def recording(tensor, *args, **kwargs):
            self.calls.append((tensor.numel(), str(tensor.dtype), tensor.numel() * tensor.element_size()))
            return self.original(tensor, *args, **kwargs)

        self.dist.all_reduce = recording
        return self

    def __exit__(self, *exc):
        self.dist.all_reduce = self.original


def train_seat(rank: int, world_size: int, case: dict) -> dict:
    """`case["steps"]` optimizer steps of SEAT on a tiny Llama: this rank's rows of each
    global micro-batch, CE/KL normalized by the global batch's counts, compact gradients
    all-reduced (summed) when world_size > 1. Returns the trained targets' values, the
    losses, and what was communicated."""
    import seat
    from seat.distributed import DataParallel, global_counts

    accumulation, clip = case.get("accumulation", 1), case.get("clip", 0.0)
    model = tiny_model("llama", seed=0)
    model.train()
    config = seat.SeatConfig(density=case.get("density", 0.25), mask_encoding=case.get("encoding", "int32"),
                             seed=3)
    handle = seat.patch(model, config)
    options = dict(case.get("optimizer", {}))
    if world_size > 1:
        options["data_parallel"] = DataParallel(reduce="sum", bucket_bytes=case.get("bucket_bytes", 2048))
    with AllReduceLog() as log:
        opt = handle.optimizer(lr=case.get("lr", 1e-3), **options)
        setup_calls = len(log.calls)
        losses, per_step = [], []
        for step in range(case.get("steps", 3)):
            micro = [share(b, rank, world_size) for b in global_micro_batches(step, accumulation)]
            n_ce, n_kl = global_counts(micro)
            before = len(log.calls)
            for i, batch in enumerate(micro):
                last = i == len(micro) - 1
                with contextlib.nullcontext() if last else opt.no_sync():
                    out = handle.loss(batch, num_items_in_batch=n_ce, kl_num_items=n_kl)
                    out.loss.backward()
                losses.append(float(out.loss.detach()))
            if clip:
                opt.clip_grad_norm_(clip)
            opt.step()
            opt.zero_grad()
            per_step.append(log.calls[before:])
    sync = opt.data_parallel
    return {"weights": {name: t.param.detach().clone() for name, t in handle.targets.items()},
            "losses": losses, "setup_calls": setup_calls, "per_step": per_step,
            "nnz": {name: t.idx.nnz if hasattr(t.idx, "nnz") else int(t.idx.numel()) for name, t in handle.targets.items()},
            "grad_bytes": None if sync is None else sync.grad_bytes,
            "control_bytes": None if sync is None else sync.control_bytes}


def train_cases(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """train_seat for each case in turn (one process start for all of them)."""
    return [train_seat(rank, world_size, case) for case in cases]


def raise_at_step(rank: int, world_size: int, bad_rank: int, bad_step: int) -> None:
    """Data-parallel training where rank `bad_rank` raises before step `bad_step`'s
    backward: the others block in their next collective."""
    import seat
    from seat.distributed import DataParallel

    model = tiny_model("llama", seed=0)
    handle = seat.patch(model, seat.SeatConfig(density=0.25, seed=3))
    opt = handle.optimizer(lr=1e-3, data_parallel=DataParallel())
    for step in range(4):
        if rank == bad_rank and step == bad_step:
            raise ValueError(f"rank {rank} failed on purpose at step {step}")
        handle.loss(share(paired_batch(GLOBAL_ROWS, seed=step), rank, world_size)).loss.backward()
        opt.step()
        opt.zero_grad()


def build_with_seed(rank: int, world_size: int, seeds: list[int], options: list[dict] | None = None) -> str:
    """SparseAdamW with data parallelism over masks drawn with seeds[rank] (and the
    optimizer options options[rank]): the error text."""
    import seat
    from seat.distributed import DataParallel

    handle = seat.patch(tiny_model("llama", seed=0), seat.SeatConfig(density=0.25, seed=seeds[rank]))
    try:
        handle.optimizer(data_parallel=DataParallel(), **(options[rank] if options else {}))
    except ValueError as e:
        return str(e)
    return ""


def misuse(rank: int, world_size: int) -> dict:
    """The refusals of a data-parallel optimizer misused in a training loop: error texts."""
    import seat
    from seat.distributed import DataParallel

    handle = seat.patch(tiny_model("llama", seed=0), seat.SeatConfig(density=0.25, seed=3))
    opt = handle.optimizer(data_parallel=DataParallel())
    batch = share(paired_batch(GLOBAL_ROWS, seed=0), rank, world_size)
    out = {}
    handle.loss(batch).loss.backward()
    try:
        handle.loss(batch).loss.backward()  # a second synchronized backward
    except RuntimeError as e:
        out["second_backward"] = str(e)
    opt.zero_grad()
    handle.loss(batch).loss.backward()
    opt.step()
    try:
        handle.loss(batch).loss.backward()  # no zero_grad after the step
    except RuntimeError as e:
        out["no_zero_grad"] = str(e)
    opt.zero_grad()
    with opt.no_sync():
        handle.loss(batch).loss.backward()
    handle.loss(batch).loss.backward()
    opt.step()
    opt.zero_grad()
    out["steps"] = max(int(opt.state[p]["step"]) for p in opt._masks)
    return out


def train_trainer(rank: int, world_size: int, output_dir: str, global_rows: int, max_steps: int,
                  resume: str | None = None) -> dict:
    """SeatTrainer (tests/_trainer_helpers' tiny run, 8 records, 2 micro-batches per step of
    `global_rows` rows over all ranks) to `max_steps`, from `resume` if given: the trained
    targets and the logged losses."""
    from _trainer_helpers import RECORDS, make_trainer
    from seat.patching import handle_of

    trainer, model, _ = make_trainer(output_dir, records=RECORDS * 2, per_device_train_batch_size=global_rows // world_size,
                                     gradient_accumulation_steps=2, max_steps=max_steps, save_steps=2)
    handle = handle_of(model)
    steps_here = []  # optimizer steps taken in this process (a resume takes only the rest)
    handle._optimizer.register_step_post_hook(lambda *_: steps_here.append(1))
    trainer.train(resume_from_checkpoint=resume)
    return {"weights": {name: t.param.detach().clone() for name, t in handle.targets.items()},
            "losses": [(h["step"], h["loss"], h.get("kl")) for h in trainer.state.log_history if "loss" in h],
            "wrapped": type(trainer.model_wrapped).__name__, "steps_here": len(steps_here),
            "sent": trainer.seat._optimizer.data_parallel.grad_bytes if world_size > 1 else 0}


def branch_model() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList([torch.nn.Linear(8, 8, bias=False) for _ in range(3)])


def branch_loss(model, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
    h = model[0](x)
    if use_branch:  # a parameter only some rows' data reach
        h = h + model[1](x)
    return model[2](h).pow(2).sum()


def branch_on_rank_zero(rank: int, world_size: int, zero_grad_first: bool, options: dict | None = None) -> list:
    """Three steps of SparseAdamW on 3 linear layers where only rank 0's rows (the first
    half of each global batch of 4 rows) use layer 1: on another rank it never has a
    gradient. Optionally the first backward is dropped by zero_grad() without a step (on
    every rank). world_size 1: the one-process run on the global batch. The weights."""
    from seat.distributed import DataParallel
    from seat.optim import SparseAdamW

    model = branch_model()
    generator = torch.Generator().manual_seed(1)
    masks = [torch.rand(p.shape, generator=generator) < 0.5 for p in model.parameters()]
    options = dict(options or {})
    if world_size > 1:  # one bucket per parameter
        options["data_parallel"] = DataParallel(reduce="sum", bucket_bytes=16)
    opt = SparseAdamW(list(model.parameters()), masks, lr=1e-2, **options)
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        if world_size == 1:
            loss = branch_loss(model, x[:2], True) + branch_loss(model, x[2:], False)
        else:
            loss = branch_loss(model, x[2 * rank:2 * rank + 2], rank == 0)
        loss.backward()
        if not (zero_grad_first and step == 0):
            opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def subgroup_refusals(rank: int, world_size: int) -> dict:
    """DataParallel over a group of rank 0 only: the error texts of a SparseAdamW built on
    a rank outside it, and of SeatTrainer's set-up check (its data spans every rank)."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from seat.distributed import DataParallel
    from seat.optim import SparseAdamW
    from seat.trainer_dp import check_data_parallel

    config = DataParallel(group=dist.new_group([0]), reduce="sum")
    out = {}
    model = branch_model()
    try:
        SparseAdamW(list(model.parameters()), [torch.ones(p.shape, dtype=torch.bool) for p in model.parameters()],
                    data_parallel=config)
    except ValueError as e:
        out["optimizer"] = str(e)
    out["hooks"] = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    args = SimpleNamespace(world_size=world_size, fsdp=None, fsdp_config=None, deepspeed=None)
    try:
        check_data_parallel(args, SimpleNamespace(_optimizer=None), {"data_parallel": config}, "SeatTrainer")
    except ValueError as e:
        out["trainer"] = str(e)
    return out


def evaluate_untrained(rank: int, world_size: int, output_dir: str) -> float:
    """SeatTrainer.evaluate() of tests/_trainer_helpers' tiny run (CE only: KL weight 0,
    so the eval rows' drawn names do not matter) over its 4 records, one per eval batch."""
    import seat
    from _trainer_helpers import RECORDS, make_trainer

    trainer, _, _ = make_trainer(output_dir, seat_config=seat.SeatConfig(density=0.2, kl_weight=0.0),
                                 per_device_eval_batch_size=1, trainer_kwargs=dict(eval_dataset=RECORDS))
    return trainer.evaluate()["eval_loss"]


def in_backward_on_other_layers(rank: int, world_size: int) -> str:
    """update_in_backward over 3 linear layers of equal size (full masks): rank 0's loss
    uses layers 0 and 2, the others' layers 1 and 2, so their hooks' all-reduces pair
    layer 0 with layer 1. The error text of step()."""
    from seat.distributed import DataParallel
    from seat.optim import SparseAdamW

    model = branch_model()
    opt = SparseAdamW(list(model.parameters()), [torch.ones(p.shape, dtype=torch.bool) for p in model.parameters()],
                      update_in_backward=True, data_parallel=DataParallel(reduce="sum"))
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(rank))
    model[2](model[0 if rank == 0 else 1](x)).pow(2).sum().backward()
    try:
        opt.step()
    except RuntimeError as e:
        return str(e)
    return ""
