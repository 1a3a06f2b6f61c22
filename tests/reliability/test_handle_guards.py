"""handle.reference() cannot be used to lose or corrupt the base or the trained values:
revert / unpatch / save_delta / optimizer updates inside it are refused before anything is
written, and the reference forward is the base model in eval mode (dropout off)."""
from __future__ import annotations

import copy

import pytest
import torch

import seat
from _models import paired_batch, tiny_model


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snapshot) -> bool:
    return all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


def _trained(kind="llama", **options):
    model = tiny_model(kind)
    base = _snapshot(model)
    handle = seat.patch(model, density=0.2, **options)
    opt = handle.optimizer(lr=1e-2)
    for step in range(2):
        handle.loss(paired_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, handle, opt, base


@pytest.mark.parametrize("action", ["revert", "unpatch"])
def test_revert_and_unpatch_inside_reference_are_refused_and_lose_nothing(action):
    model, handle, _, base = _trained()
    trained = _snapshot(model)
    with handle.reference():
        with pytest.raises(RuntimeError, match="inside `with handle.reference"):
            getattr(handle, action)()
    assert _same(model, trained)
    handle.revert()  # the base values were kept: revert still restores them bit-exactly
    assert _same(model, base)


def test_save_delta_inside_reference_is_refused_and_writes_nothing(tmp_path):
    model, handle, _, _ = _trained()
    with handle.reference():
        with pytest.raises(RuntimeError, match="save a delta"):
            handle.save_delta(tmp_path / "delta")
    assert not (tmp_path / "delta").exists()
    handle.save_delta(tmp_path / "delta")  # after the block: the trained values
    fresh = tiny_model()
    seat.load_delta(fresh, tmp_path / "delta")
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh.named_parameters())


def test_load_delta_inside_reference_is_refused_and_writes_nothing(tmp_path):
    model, handle, _, _ = _trained()
    handle.save_delta(tmp_path / "delta")
    trained = _snapshot(model)
    with handle.reference():
        inside = _snapshot(model)
        with pytest.raises(RuntimeError, match="cannot load a delta inside"):
            seat.load_delta(model, tmp_path / "delta")
        assert _same(model, inside)
    assert _same(model, trained)


def test_optimizer_step_inside_reference_is_refused_and_corrupts_nothing():
    model, handle, opt, base = _trained()
    handle.loss(paired_batch(seed=5)).loss.backward()
    trained = _snapshot(model)
    state = copy.deepcopy(opt.state_dict())
    with handle.reference():
        with pytest.raises(RuntimeError, match="base values inside handle.reference"):
            opt.step()
    assert _same(model, trained)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    opt.step()  # outside the block the pending gradients still apply
    assert not _same(model, trained)
    handle.revert()
    assert _same(model, base)


def test_update_in_backward_inside_reference_is_refused_before_any_write():
    model = tiny_model()
    base = _snapshot(model)
    handle = seat.patch(model, density=0.2)
    handle.optimizer(lr=1e-2, update_in_backward=True)
    loss = handle.loss(paired_batch()).loss
    with handle.reference():
        with pytest.raises(RuntimeError, match="base values inside handle.reference"):
            loss.backward()
    assert _same(model, base)  # neither the base values nor (after the block) the weights moved
    handle.revert()
    assert _same(model, base)


def test_reference_forward_is_deterministic_with_dropout_on():
    import transformers as tf

    config = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)
    assert config.resid_pdrop > 0 and config.attn_pdrop > 0  # GPT-2's defaults: dropout on
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    model.transformer.h[1].attn.eval()  # a module the user set apart keeps its own flag
    handle = seat.patch(model, density=0.05)
    batch = paired_batch()
    with handle.reference():
        assert not any(m.training for m in model.modules())
        first = model(input_ids=batch["pert_input_ids"], attention_mask=batch["pert_attention_mask"]).logits
        second = model(input_ids=batch["pert_input_ids"], attention_mask=batch["pert_attention_mask"]).logits
    assert torch.equal(first, second)
    assert model.training and model.transformer.h[0].attn.training and not model.transformer.h[1].attn.training
    model.eval()
    with torch.no_grad():
        base = model(input_ids=batch["pert_input_ids"], attention_mask=batch["pert_attention_mask"]).logits
    torch.testing.assert_close(first, base, rtol=0, atol=0)  # the base model in eval mode, exactly
