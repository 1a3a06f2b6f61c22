"""SeatTrainer on several processes (torchrun / accelerate launch): compact-gradient data
parallelism (seat.distributed) in place of DDP.

Each rank trains on its shard of every global batch (the Trainer's data loader shards
it, per_device_train_batch_size rows per rank); SeatTrainer then
  * builds SparseAdamW with DataParallel(reduce="sum"), and keeps accelerate from wrapping
    the model in DDP (which would all-reduce every dense gradient the compaction hooks
    free): accelerate prepares the model as for evaluation (placement, no wrapper);
  * normalizes CE and KL by the token counts of the global batch (one all-reduce per
    optimizer step), so each rank's loss is its share of the global batch's loss and the
    summed gradients are the global batch's: the trajectory does not depend on the number
    of ranks;
  * draws the fictitious names of a rank's rows for their positions in the global batch
    (PairedCollator.data_rank), as one process collating the global batch would;
  * checks each micro-batch's loss for non-finite values over all ranks (the global
    loss), so every rank skips or raises together; logs the global loss;
  * runs every micro-batch but the last of a step inside optimizer.no_sync().
Checkpoints are written by rank 0 and record the global batch size, not the per-rank
one, so a checkpoint resumes with another number of ranks when the global batch is the same.

TrainingArguments(fsdp=True) (or "full_shard") shards the model with FSDP2 instead
(seat.distributed.shard(handle, reduce="sum"), before the optimizer is built): the same
normalization and draws, FSDP2's reduce-scatter in place of the compact all-reduce, and
accelerate's own FSDP kept out (the arguments the Trainer sees have fsdp cleared).
Checkpoints hold the delta and the optimizer state of the whole weights, gathered to rank 0
(the one-process format), so they resume on any number of ranks, sharded or not.
One exception to "as one process": when the training set's size is not a multiple of the
global batch (and dataloader_drop_last=False), accelerate completes the epoch's last, short
global batch with rows from the epoch's start (as under DDP) so that every rank has one;
one process trains on the short batch. Use dataloader_drop_last=True or a multiple.
"""
from __future__ import annotations


# fsdp_config keys SeatTrainer honours (FSDP2 per decoder layer, resharded after forward)
# or that do nothing here, with the values that fit ("version": TrainingArguments drops
# the "fsdp_" prefix of "fsdp_version")
_FSDP_CONFIG = {"reshard_after_forward": (True,), "min_num_params": None, "xla": (False,), "xla_fsdp_v2": (False,),
                "xla_fsdp_grad_ckpt": (False,), "version": (2, "2"), "fsdp_version": (2, "2"),
                "transformer_layer_cls_to_wrap": None}


def wants_fsdp(args) -> bool:
    return bool(getattr(args, "fsdp", None))


def check_fsdp(args, handle, optimizer_kwargs: dict, save_full_model: bool, trainer: str) -> None:
    """Refuse what SeatTrainer cannot do under TrainingArguments(fsdp=...), before anything
    is sharded."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        raise ValueError(f"{trainer} shards the model itself (seat.distributed.shard) but accelerate was launched with "
                         "its own FSDP config (ACCELERATE_USE_FSDP): launch with torchrun, or accelerate launch "
                         "without --use_fsdp / an FSDP config file")
    if args.world_size < 2:
        raise ValueError(f"TrainingArguments(fsdp=...) shards the model over several processes but this run has "
                         f"{args.world_size}: launch with torchrun (or accelerate launch), or drop fsdp")
    for key, value in (getattr(args, "fsdp_config", None) or {}).items():
        if key not in _FSDP_CONFIG:
            if value:
                raise ValueError(f"{trainer} shards with seat.distributed.shard (FSDP2 per decoder layer); "
                                 f"fsdp_config[{key!r}]={value!r} is not supported: drop it")
        elif _FSDP_CONFIG[key] is not None and value not in _FSDP_CONFIG[key]:
            raise ValueError(f"{trainer} needs fsdp_config[{key!r}] in {_FSDP_CONFIG[key]} (FSDP2, layers resharded "
                             f"after forward so that the reference swap reaches them); got {value!r}")
    if handle._optimizer is not None:
        raise ValueError(f"the handle's optimizer exists but {trainer} must shard the model before building it: "
                         "do not call handle.optimizer() before the trainer")
    if "data_parallel" in optimizer_kwargs:
        raise ValueError("optimizer_kwargs['data_parallel'] is for unsharded models; with fsdp FSDP2 reduces the "
                         "gradients: drop data_parallel")
    if save_full_model:
        raise ValueError("save_full_model=True is not supported with fsdp (the checkpoints hold the delta of the "
                         "whole weights): drop it and merge the delta into the base model (seat merge)")
    if getattr(args, "deepspeed", None):
        raise ValueError(f"{trainer} does not run under DeepSpeed: drop deepspeed")


def check_data_parallel(args, handle, optimizer_kwargs: dict, trainer: str) -> dict:
    """The optimizer kwargs of a data-parallel run (data_parallel added), after refusing
    what it cannot do."""
    from .distributed import DataParallel

    if getattr(args, "deepspeed", None):
        raise ValueError(f"{trainer} does not run under DeepSpeed (its optimizer and gradient partitioning replace "
                         "SparseAdamW's compact state): drop deepspeed, launch with torchrun or accelerate launch")
    if handle._optimizer is not None:
        if handle._optimizer.data_parallel is None:
            raise ValueError(f"the handle's optimizer was built without data_parallel but {trainer} runs on "
                             f"{args.world_size} processes: let {trainer} build it (do not call handle.optimizer() "
                             "first) or pass data_parallel=seat.distributed.DataParallel(reduce='sum')")
        given, what = handle._optimizer.data_parallel.config, "the handle's optimizer was built with"
    else:
        given, what = optimizer_kwargs.get("data_parallel"), "optimizer_kwargs['data_parallel'] is"
    # the loss is normalized by the global batch's token counts: the ranks' gradients are summed
    if given is not None and (not isinstance(given, DataParallel) or given.reduce != "sum"):
        raise ValueError(f"{trainer} normalizes the loss by the global batch's token counts, so the ranks' "
                         f"gradients are summed, but {what} {given!r}: use DataParallel(reduce='sum', ...), or "
                         "leave data_parallel out and let the trainer build the optimizer")
    if given is not None and given.group is not None:
        import torch.distributed as dist

        if dist.get_rank(given.group) < 0 or dist.get_world_size(given.group) != args.world_size:
            raise ValueError(f"{trainer} shards each batch over all {args.world_size} processes and counts its "
                             f"tokens over all of them, but {what} a DataParallel whose group is a subset: leave "
                             "group=None (the default group)")
    if handle._optimizer is not None:
        return optimizer_kwargs
    return {**optimizer_kwargs, "data_parallel": given or DataParallel(reduce="sum")}


def keep_model_unwrapped(accelerator) -> None:
    """Make accelerator.prepare leave the model unwrapped (no DDP: SparseAdamW all-reduces
    the compact gradients itself); device placement and mixed precision still apply."""
    prepare_model = accelerator.prepare_model

    def prepare_without_ddp(model, device_placement=None, evaluation_mode=False):
        return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

    accelerator.prepare_model = prepare_without_ddp

