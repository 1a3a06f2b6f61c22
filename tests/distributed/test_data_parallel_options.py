"""DataParallel's options and the refusals of a data-parallel optimizer or trainer set-up
that need no second process: nothing is left behind on the params by a refused optimizer."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from _dist_workers import branch_loss, branch_model
from seat.distributed import DataParallel
from seat.optim import SparseAdamW
from seat.trainer_dp import check_data_parallel


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduce="avg"), "reduce must be 'mean'"), (dict(reduce=None), "reduce must be 'mean'"),
    (dict(bucket_bytes=0), "bucket_bytes must be a positive int"),
    (dict(bucket_bytes=2.5), "bucket_bytes must be a positive int"),
    (dict(bucket_bytes=True), "bucket_bytes must be a positive int"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataParallel(**kwargs)


def _masks(model):
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(p.shape, generator=generator) < 0.5 for p in model.parameters()]


def _train_one_step(model, opt):
    branch_loss(model, torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), True).backward()
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kwargs, match", [
    (dict(data_parallel=DataParallel()), "needs torch.distributed initialized"),
    (dict(data_parallel="yes"), "must be None or a seat.distributed.DataParallel"),
    (dict(data_parallel=DataParallel(), compact_grads=False), "needs compact_grads=True"),
])
def test_a_refused_data_parallel_optimizer_leaves_no_hook(kwargs, match):
    model = branch_model()
    with pytest.raises(ValueError, match=match) as refused:  # (its traceback keeps the refused one alive)
        SparseAdamW(list(model.parameters()), _masks(model), **kwargs)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    # an optimizer built next trains as on a model never given to the refused one
    fresh = branch_model()
    expected = _train_one_step(fresh, SparseAdamW(list(fresh.parameters()), _masks(fresh), lr=1e-2))
    got = _train_one_step(model, SparseAdamW(list(model.parameters()), _masks(model), lr=1e-2))
    assert all(torch.equal(g, e) for g, e in zip(got, expected)) and refused.value


def _args(world_size=2):
    return SimpleNamespace(world_size=world_size, fsdp=None, fsdp_config=None, deepspeed=None)


def test_the_trainer_refuses_a_built_optimizer_that_averages():
    # the trainer normalizes by the global batch's counts: averaging would divide the
    # gradient by the number of ranks again, silently
    optimizer = SimpleNamespace(data_parallel=SimpleNamespace(config=DataParallel(reduce="mean")))
    with pytest.raises(ValueError, match=r"handle's optimizer was built with DataParallel\(.*reduce='mean'.*"
                                         r"reduce='sum'"):
        check_data_parallel(_args(), SimpleNamespace(_optimizer=optimizer), {}, "SeatTrainer")
    optimizer.data_parallel.config = DataParallel(reduce="sum")
    assert check_data_parallel(_args(), SimpleNamespace(_optimizer=optimizer), {}, "SeatTrainer") == {}
    with pytest.raises(ValueError, match=r"optimizer_kwargs\['data_parallel'\] is DataParallel\(.*reduce='mean'"):
        check_data_parallel(_args(), SimpleNamespace(_optimizer=None), {"data_parallel": DataParallel()},
                            "SeatTrainer")
