"""Workers for tests/_distributed.run_ranks: SEAT on a tiny Llama sharded with FSDP2
(seat.distributed.shard) against the one-process run on the same global batches."""
from __future__ import annotations

import torch

from _dist_workers import global_micro_batches, share
from _models import tiny_model


def _whole(t) -> torch.Tensor:
    """A trained weight as one tensor (all-gathered from the shards when sharded)."""
    from seat.distributed._local import is_dtensor

    return (t.param.full_tensor() if is_dtensor(t.param) else t.param).detach().clone()


def train_sharded(rank: int, world_size: int, case: dict) -> dict:
    """case["steps"] optimizer steps of SEAT; sharded with FSDP2 (gradients summed, CE/KL
    normalized by the global batch's counts) when world_size > 1. Returns the whole
    trained weights, the losses, what reference() showed and (rank 0) the delta's
    tensors and metadata."""
    import seat
    from seat.delta import read_delta
    from seat.distributed import global_counts, shard

    accumulation, clip = case.get("accumulation", 1), case.get("clip", 0.0)
    model = _tied_model() if case.get("tied") else tiny_model(case.get("kind", "llama"), seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    config = seat.SeatConfig(density=case.get("density", 0.25), mask_encoding=case.get("encoding", "int32"), seed=3)
    handle = seat.patch(model, config)
    if world_size > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if case.get("bf16_compute") else None
        shard(handle, reduce="sum", mp_policy=policy)
    opt = handle.optimizer(lr=case.get("lr", 1e-3), **case.get("optimizer", {}))
    losses, norms = [], []
    for step in range(case.get("steps", 3)):
        micro = [share(b, rank, world_size) for b in global_micro_batches(step, accumulation)]
        n_ce, n_kl = global_counts(micro)
        for batch in micro:
            out = handle.loss(batch, num_items_in_batch=n_ce, kl_num_items=n_kl)
            out.loss.backward()
            losses.append(float(out.loss.detach()))
        if clip:
            norms.append(float(opt.clip_grad_norm_(clip)))
        opt.step()
        opt.zero_grad()
    reference_exact = _reference_exact(handle, base)
    delta = None
    if case.get("delta_dir"):
        path = f"{case['delta_dir']}/ranks{world_size}"
        handle.save_delta(path)
        if rank == 0:
            meta, tensors = read_delta(path)
            delta = {"meta": meta, "tensors": tensors}
    return {"weights": {name: _whole(t) for name, t in handle.targets.items()}, "losses": losses, "norms": norms,
            "reference_exact": reference_exact, "delta": delta, "num_trainable": handle.num_trainable,
            "state_entries": sum(int(opt.state[t.param]["exp_avg"].numel()) for t in handle.targets.values()
                                 if "exp_avg" in opt.state[t.param])}


def _tied_model():
    """The tiny Llama with its output head tied to the input embeddings (as SmolLM2)."""
    import transformers as tf
    from _models import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _reference_exact(handle, base: dict) -> bool:
    """Whether, inside handle.reference(), every rank's rows of every weight equal the base
    model's bit for bit (and the trained values come back after)."""
    from seat.distributed._local import local

    before = {name: local(t.param).detach().clone() for name, t in handle.targets.items()}
    with handle.reference():
        exact = all(torch.equal(local(t.param).detach().view(-1),
                                base[name].view(-1)[t.shard.lo:t.shard.hi] if t.shard else base[name].view(-1))
                    for name, t in handle.targets.items())
    back = all(torch.equal(local(t.param).detach(), before[name]) for name, t in handle.targets.items())
    return exact and back


def train_sharded_cases(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    return [train_sharded(rank, world_size, case) for case in cases]


def sharded_misuse(rank: int, world_size: int, tmp: str) -> dict:
    """What each misuse of seat.distributed.shard raised on this rank; then that the
    model still trains a step."""
    import seat
    from seat.distributed import DataParallel, shard
    from torch.distributed.fsdp import fully_shard

    def message(call) -> str:
        try:
            call()
        except (ValueError, RuntimeError) as e:
            return str(e)
        return ""

    out = {}
    other = tiny_model("llama", seed=1)
    other_handle = seat.patch(other, seat.SeatConfig(density=0.25, seed=3))
    other_handle.save_delta(f"{tmp}/delta{rank}")
    for layer in other.model.layers:
        fully_shard(layer)
    fully_shard(other)
    out["sharded_by_hand"] = message(lambda: shard(other_handle))
    out["load_delta"] = message(lambda: seat.load_delta(other, f"{tmp}/delta{rank}"))
    bare = tiny_model("llama", seed=0)
    for layer in bare.model.layers:
        fully_shard(layer)
    fully_shard(bare)
    out["patch_sharded"] = message(lambda: seat.patch(bare, seat.SeatConfig(density=0.25, seed=3)))

    made = tiny_model("llama", seed=0)
    made_handle = seat.patch(made, seat.SeatConfig(density=0.25, seed=3))
    made_handle.optimizer(lr=1e-3)
    out["after_optimizer"] = message(lambda: shard(made_handle))

    model = tiny_model("llama", seed=0)
    model.train()
    handle = seat.patch(model, seat.SeatConfig(density=0.25, seed=3))
    out["reduce"] = message(lambda: shard(handle, reduce="avg"))
    shard(handle)
    out["twice"] = message(lambda: shard(handle))
    params = [t.param for t in handle.targets.values()]
    out["data_parallel"] = message(lambda: seat.optim.SparseAdamW(
        params, [t.idx for t in handle.targets.values()], data_parallel=DataParallel()))
    opt = handle.optimizer(lr=1e-2)
    before = {n: _whole(t) for n, t in handle.targets.items()}
    batch = share(global_micro_batches(0, 1)[0], rank, world_size)
    handle.loss(batch).loss.backward()
    opt.step()
    out["trained_after"] = any(not torch.equal(before[n], _whole(t)) for n, t in handle.targets.items())
    return out


def train_trainer_sharded(rank: int, world_size: int, output_dir: str, global_rows: int, max_steps: int,
                          resume: str | None = None, fsdp: bool = True) -> dict:
    """tests/_dist_workers.train_trainer with TrainingArguments(fsdp=True) when
    world_size > 1 and `fsdp`: the whole trained weights and the logged losses."""
    from _trainer_helpers import RECORDS, make_trainer
    from seat.patching import handle_of

    extra = {"fsdp": True} if world_size > 1 and fsdp else {}
    trainer, model, _ = make_trainer(output_dir, records=RECORDS * 2,
                                     per_device_train_batch_size=global_rows // world_size,
                                     gradient_accumulation_steps=2, max_steps=max_steps, save_steps=2, **extra)
    handle = handle_of(model)
    steps_here = []
    handle._optimizer.register_step_post_hook(lambda *_: steps_here.append(1))
    trainer.train(resume_from_checkpoint=resume)
    return {"weights": {name: _whole(t) for name, t in handle.targets.items()},
            "losses": [(h["step"], h["loss"], h.get("kl")) for h in trainer.state.log_history if "loss" in h],
            "sharded": handle._sharding is not None, "steps_here": len(steps_here)}


def sharded_state_roundtrip(rank: int, world_size: int, case: dict) -> dict:
    """One SEAT step (sharded when world_size > 1) with case["optimizer"]'s options, then
    the optimizer's own state_dict() and the whole one (whole_state_dict, through a file
    rank 0 writes) loaded back into it: whether each load kept the state, and the whole
    state dict (rank 0)."""
    import os

    import seat
    import torch.distributed as dist
    from seat.distributed import global_counts, shard

    model = tiny_model("llama", seed=0)
    model.train()
    handle = seat.patch(model, seat.SeatConfig(density=0.25, mask_encoding=case.get("encoding", "int32"), seed=3))
    if world_size > 1:
        shard(handle, reduce="sum")
    opt = handle.optimizer(lr=1e-3, **case.get("optimizer", {}))
    micro = [share(b, rank, world_size) for b in global_micro_batches(0, 1)]
    n_ce, n_kl = global_counts(micro)
    handle.loss(micro[0], num_items_in_batch=n_ce, kl_num_items=n_kl).loss.backward()
    opt.step()

    def snapshot() -> list:
        return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
                for p in (t.param for t in handle.targets.values())]

    def same(a: list, b: list) -> bool:
        return all(sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor)
                                                  else x[k] == y[k] for k in x) for x, y in zip(a, b))

    before = snapshot()
    opt.load_state_dict(opt.state_dict())
    own = same(before, snapshot())
    whole = opt.whole_state_dict()
    path = f"{case['tmp']}/whole{world_size}.pt"
    if rank == 0:
        torch.save(whole, path + ".part")
        os.replace(path + ".part", path)
    if world_size > 1:
        dist.barrier()
    opt.load_state_dict(torch.load(path, weights_only=True))
    return {"own": own, "whole": same(before, snapshot()), "whole_state": whole}


def raise_inside_reference(rank: int, world_size: int) -> dict:
    """A SEAT step (sharded when world_size > 1), then a forward inside handle.reference()
    that raises in the middle of a decoder layer (as an out-of-memory error would, after
    FSDP2 all-gathered the layer), then a forward and another step: what was raised,
    whether the trained values came back, the logits after, and the whole weights."""
    import seat
    from seat.distributed import global_counts, shard
    from seat.distributed._local import local

    model = tiny_model("llama", seed=0)
    model.train()
    handle = seat.patch(model, seat.SeatConfig(density=0.25, seed=3))
    if world_size > 1:
        shard(handle, reduce="sum")
    opt = handle.optimizer(lr=1e-3)

    def step(index: int) -> None:
        micro = [share(b, rank, world_size) for b in global_micro_batches(index, 1)]
        n_ce, n_kl = global_counts(micro)
        handle.loss(micro[0], num_items_in_batch=n_ce, kl_num_items=n_kl).loss.backward()
        opt.step()
        opt.zero_grad()

    def out_of_memory(*_):
        raise MemoryError("out of memory (simulated)")

    step(0)
    trained = {name: local(t.param).detach().clone() for name, t in handle.targets.items()}
    hook = model.model.layers[1].mlp.register_forward_pre_hook(out_of_memory)
    raised = ""
    try:
        with handle.reference():
            model(input_ids=torch.tensor([[5, 6, 7]]))
    except (MemoryError, RuntimeError) as e:
        raised = f"{type(e).__name__}: {e}"
    hook.remove()
    back = all(torch.equal(local(t.param).detach(), trained[name]) for name, t in handle.targets.items())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.clone()
    step(1)
    return {"raised": raised, "back": back, "logits": logits,
            "weights": {name: _whole(t) for name, t in handle.targets.items()}}


def train_trainer_poisoned(rank: int, world_size: int, output_dir: str, bad_call: int, nonfinite: str) -> dict:
    """train_trainer_sharded's run (3 steps of 2 micro-batches) where rank 0's loss of
    training micro-batch `bad_call` (0-based) is NaN, still attached to the graph: the
    whole trained weights, the logged losses and skip count, or what was raised."""
    from _trainer_helpers import RECORDS, make_trainer
    from seat.patching import handle_of

    extra = {"fsdp": True} if world_size > 1 else {}
    trainer, model, _ = make_trainer(output_dir, records=RECORDS * 2, per_device_train_batch_size=4 // world_size,
                                     gradient_accumulation_steps=2, max_steps=3, save_steps=100,
                                     trainer_kwargs=dict(nonfinite=nonfinite), **extra)
    handle = handle_of(model)
    loss_fn, count = handle.loss, [0]

    def loss(batch, **kwargs):
        out = loss_fn(batch, **kwargs)
        if count[0] == bad_call and rank == 0:
            out.loss = out.loss + float("nan")
        count[0] += 1
        return out

    handle.loss = loss
    raised = ""
    try:
        trainer.train()
    except RuntimeError as e:
        raised = str(e)
    return {"weights": {name: _whole(t) for name, t in handle.targets.items()}, "raised": raised,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "skipped": trainer.nonfinite_skipped,
            "steps": [int(handle._optimizer.state[t.param].get("step", 0)) for t in handle.targets.values()]}


def whole_state_when_ranks_differ(rank: int, world_size: int) -> dict:
    """whole_state_dict() of a sharded optimizer before any step, then after one step with
    rank 1's step count of one weight changed (state that trained apart): what each call
    returned or raised on this rank, and that the ranks still meet after."""
    import seat
    import torch.distributed as dist
    from seat.distributed import shard

    model = tiny_model("llama", seed=0)
    model.train()
    handle = seat.patch(model, seat.SeatConfig(density=0.25, seed=3))
    shard(handle, reduce="sum")
    opt = handle.optimizer(lr=1e-3)
    out = {}
    try:
        fresh = opt.whole_state_dict()
        out["fresh"] = None if fresh is None else sorted({int(e["step"]) for e in fresh["state"].values()})
    except Exception as e:
        out["fresh"] = f"{type(e).__name__}: {e}"
    handle.loss(share(global_micro_batches(0, 1)[0], rank, world_size)).loss.backward()
    opt.step()
    if rank == 1:
        opt.state[next(iter(handle.targets.values())).param]["step"] += 1
    try:
        opt.whole_state_dict()
        out["differ"] = ""
    except RuntimeError as e:
        out["differ"] = str(e)
    dist.barrier()
    return out


def whole_state_after_set_masks(rank: int, world_size: int) -> dict:
    """A sharded SEAT step with implicit masks (defined by a spec), then set_masks keeping
    every other entry of each rank's mask, another step, and whole_state_dict(): on rank 0,
    per parameter, the whole mask's positions and exp_avg's size; on every rank, the
    positions it now trains (in the whole weight)."""
    import seat
    from seat.distributed import shard
    from seat.masks import from_state_dict, mask_indices

    model = tiny_model("llama", seed=0)
    model.train()
    handle = seat.patch(model, seat.SeatConfig(density=0.25, mask_encoding="implicit", seed=3))
    shard(handle, reduce="sum")
    opt = handle.optimizer(lr=1e-3)
    params = [t.param for t in handle.targets.values()]

    def step(index: int) -> None:
        handle.loss(share(global_micro_batches(index, 1)[0], rank, world_size)).loss.backward()
        opt.step()
        opt.zero_grad()

    step(0)
    opt.set_masks({p: mask_indices(opt._masks[p])[::2].clone() for p in params})
    step(1)
    mine = [(mask_indices(opt._masks[p]).long() + opt._shards[p].lo).tolist() for p in params]
    whole = opt.whole_state_dict()
    if whole is None:
        return {"mine": mine}
    state = [whole["state"][i] for i in range(len(params))]
    return {"mine": mine, "whole": [(from_state_dict(s, opt._shards[p].numel).indices().tolist(), s["exp_avg"].numel())
                                    for s, p in zip(state, params)]}


def failed_delta_write(rank: int, world_size: int, taken: str) -> tuple[str, str]:
    """save_delta of a sharded model to `taken` (a file, which rank 0 refuses): the type
    and text of what this rank raised."""
    import seat
    from seat.distributed import shard

    model = tiny_model("llama", seed=0)
    handle = seat.patch(model, seat.SeatConfig(density=0.25, seed=3))
    shard(handle)
    try:
        handle.save_delta(taken)
    except Exception as e:
        return type(e).__name__, str(e)
    return "", ""
