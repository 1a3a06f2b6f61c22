"""seat.patch on tiny Llama / Qwen2 / Mistral / Gemma2 / GPT-2 models: targets, the
reference forward, training touching only masked entries, unpatch / revert; on tiny
mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3): the fused expert
tensors as targets, the targeting report, their delta round trip."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import seat
from _models import KINDS, MOE_KINDS, paired_batch, tiny_model

pytest.importorskip("transformers")

LINEARS_PER_BLOCK = {"llama": 7, "qwen2": 7, "mistral": 7, "gemma2": 7, "gpt2": 4}


def _train(handle, steps=3, lr=1e-2, seed=0):
    opt = handle._optimizer or handle.optimizer(lr=lr)
    for step in range(steps):
        out = handle.loss(paired_batch(seed=seed + step))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("kind", KINDS)
def test_targets_are_the_block_linears_and_only_they_train(kind):
    model = tiny_model(kind)
    handle = seat.patch(model, density=0.1)
    assert len(handle.targets) == 2 * LINEARS_PER_BLOCK[kind]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(handle.targets)
    assert not any("embed" in n or "wte" in n or "lm_head" in n for n in trainable)
    for t in handle.targets.values():
        assert t.idx.numel() == round(0.1 * t.param.numel())


@pytest.mark.parametrize("kind", KINDS)
def test_reference_is_the_base_model_bit_exactly_after_training(kind):
    model = tiny_model(kind)
    base = copy.deepcopy(model)
    handle = seat.patch(model, density=0.2, seed=3)
    _train(handle)
    batch = paired_batch(seed=9)
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with handle.reference():
            inside = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(inside, expected)
    assert torch.equal(after, trained)
    assert not torch.equal(trained, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_only_masked_entries_move(kind):
    model = tiny_model(kind)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = seat.patch(model, density=0.05)
    _train(handle, steps=4)
    for name, p in model.named_parameters():
        changed = (p.detach() != base[name]).view(-1)
        if name in handle.targets:
            allowed = torch.zeros_like(changed)
            allowed[handle.targets[name].idx.long()] = True
            assert changed.any(), f"{name} did not train"
            assert not (changed & ~allowed).any(), f"{name} changed outside its mask"
        else:
            assert not changed.any(), f"frozen {name} changed"


@pytest.mark.parametrize("kind", KINDS)
def test_kl_is_zero_before_training(kind):
    handle = seat.patch(tiny_model(kind), density=0.05)
    out = handle.loss(paired_batch())
    assert abs(out.kl.item()) < 1e-6  # reference and current forwards differ only in batch size
    assert out.ce.item() > 0 and out.n_ce_tokens > 0 and out.n_kl_tokens > 0


@pytest.mark.parametrize("kind", ["llama", "gemma2"])  # the fused-linear loss and the logits path
def test_zero_kl_weight_runs_x_alone_and_gives_the_plain_ce_gradient(kind, monkeypatch):
    from seat.masks import mask_indices

    model = tiny_model(kind)
    batch = paired_batch(seed=3)
    plain = copy.deepcopy(model)
    expected = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    expected.backward()
    handle = seat.patch(model, density=0.2, kl_weight=0.0)
    monkeypatch.setattr(handle, "reference", lambda: pytest.fail("the reference forward ran with kl_weight=0"))
    opt = handle.optimizer(lr=1e-2)
    out = handle.loss(batch)
    assert torch.isnan(out.kl) and out.n_kl_tokens == 0 and out.n_ce_tokens > 0
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.ce, expected, rtol=1e-4, atol=1e-6)
    out.loss.backward()
    plain_params = dict(plain.named_parameters())
    for name, t in handle.targets.items():
        want = plain_params[name].grad.reshape(-1)[mask_indices(t.idx).long()]
        assert want.abs().sum() > 0
        torch.testing.assert_close(opt.compact_grad(t.param), want.float(), rtol=1e-4, atol=1e-7)


def test_reference_restores_weights_on_exception():
    model = tiny_model()
    handle = seat.patch(model, density=0.2)
    _train(handle, steps=1)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with handle.reference():
            raise RuntimeError("boom")
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())


def test_unpatch_keeps_trained_weights_and_removes_hooks():
    model = tiny_model()
    handle = seat.patch(model, density=0.2)
    _train(handle, steps=2)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle.unpatch()
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())  # the flags the model had
    batch = paired_batch()
    model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
    name = next(iter(trained))
    assert all(p.grad is not None for p in model.parameters()), "a compaction hook survived unpatch"
    assert seat.patch(model, density=0.1) is not None  # patchable again
    del name


def test_revert_restores_original_weights_bit_exactly():
    model = tiny_model("gpt2")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = seat.patch(model, density=0.3)
    _train(handle, steps=2)
    handle.revert()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


def test_patching_twice_is_an_error():
    model = tiny_model()
    seat.patch(model, density=0.1)
    with pytest.raises(RuntimeError, match="already patched"):
        seat.patch(model, density=0.1)


def test_targets_patterns_and_bad_config():
    model = tiny_model()
    handle = seat.patch(model, seat.SeatConfig(density=0.1, targets=["*.q_proj", "*.v_proj"]))
    assert len(handle.targets) == 4 and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in handle.targets)
    handle.unpatch()
    with pytest.raises(ValueError, match="no linear layer or expert tensor"):
        seat.patch(model, targets=["*.nothing"])
    with pytest.raises(ValueError, match="density must be in"):
        seat.patch(model, density=1.5)
    with pytest.raises(TypeError, match="either a SeatConfig or its fields"):
        seat.patch(model, seat.SeatConfig(), density=0.1)


def test_gradient_accumulation_equals_one_big_batch():
    batch = paired_batch(batch=4, seed=5)
    grads = []
    for split in (False, True):
        handle = seat.patch(tiny_model(), density=0.2)
        opt = handle.optimizer(lr=1e-2)
        if split:
            parts = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
            n_ce = int((batch["labels"][:, 1:] != -100).sum())
            n_kl = sum(handle.loss(p).n_kl_tokens for p in parts)
            for part in parts:
                handle.loss(part, num_items_in_batch=n_ce, kl_num_items=n_kl).loss.backward()
        else:
            handle.loss(batch).loss.backward()
        grads.append([opt.compact_grad(t.param).clone() for t in handle.targets.values()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            model.train()
        handle = seat.patch(model, density=0.2)
        opt = handle.optimizer(lr=1e-2)
        handle.loss(paired_batch()).loss.backward()
        grads.append([opt.compact_grad(t.param).clone() for t in handle.targets.values()])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_left_and_right_padding_give_the_same_loss():
    losses = []
    for side in ("right", "left"):
        handle = seat.patch(tiny_model(), density=0.2)
        _train(handle, steps=1)
        out = handle.loss(paired_batch(seed=4, padding_side=side))
        losses.append((out.ce.item(), out.kl.item()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-7)


def test_bf16_model_trains():
    model = tiny_model(dtype=torch.bfloat16)
    handle = seat.patch(model, density=0.1, stochastic_rounding=True)
    opt = _train(handle, steps=2)
    assert torch.isfinite(handle.loss(paired_batch()).loss)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_softcapped_model_takes_the_logits_path(monkeypatch):
    from seat import ops

    calls = []
    original = ops.paired_loss
    monkeypatch.setattr(ops, "paired_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    handle = seat.patch(tiny_model("gemma2"), density=0.1)
    handle.loss(paired_batch()).loss.backward()
    assert calls == [1]


def test_granite_logits_scaling_is_applied():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GraniteConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=48, logits_scaling=8.0, pad_token_id=0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    batch = paired_batch()
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
    handle = seat.patch(model, density=0.1)
    torch.testing.assert_close(handle.loss(batch).ce, expected, rtol=1e-4, atol=1e-5)


def test_a_model_whose_logits_are_not_the_head_is_refused():
    model = tiny_model()
    original = model.forward

    def odd_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * 3.0  # a transform seat does not know
        return out

    model.forward = odd_forward
    with pytest.raises(ValueError, match="logits are not lm_head"):
        seat.patch(model, density=0.1)
    import transformers as tf

    bare = tf.AutoModel.from_config(tiny_model().config)
    with pytest.raises(ValueError, match="no linear output head"):
        seat.patch(bare, density=0.1)


def _changes(model, before, handle):
    """{name: (changed anywhere, changed outside the mask)} for every parameter."""
    from seat.masks import mask_indices

    out = {}
    for name, p in model.named_parameters():
        changed = (p.detach() != before[name]).reshape(-1)
        allowed = torch.zeros_like(changed)
        if name in handle.targets:
            allowed[mask_indices(handle.targets[name].idx).long()] = True
        out[name] = (bool(changed.any()), bool((changed & ~allowed).any()))
    return out


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_moe_experts_train_only_at_their_mask_and_the_loss_goes_down(kind):
    model = tiny_model(kind)
    experts = {n for n, p in model.named_parameters() if p.dim() == 3}
    assert experts, "the tiny model keeps its experts as fused 3-D tensors"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = seat.patch(model, density=0.2)
    assert experts <= set(handle.targets)
    opt = handle.optimizer(lr=1e-2)
    batch = paired_batch(seed=1)
    losses = []
    for _ in range(5):
        out = handle.loss(batch)
        losses.append(out.ce.item())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.05, losses
    for name, (changed, outside) in _changes(model, before, handle).items():
        assert not outside, f"{name} changed outside its mask"
        assert changed == (name in handle.targets), f"{name}: changed={changed}, target={name in handle.targets}"


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen2_moe"])
def test_targeting_report_accounts_for_every_parameter(kind, caplog):
    model = tiny_model(kind)
    with caplog.at_level(logging.INFO, logger="seat"):
        handle = seat.patch(model, density=0.1)
    report = handle.targeting_report()
    names = {n for n, _ in model.named_parameters()}
    assert set(report.targeted) == set(handle.targets)
    assert set(report.targeted) | set(report.skipped) == names and not set(report.targeted) & set(report.skipped)
    assert report.trained_entries == {n: t.idx.numel() for n, t in handle.targets.items()}
    assert report.skipped["lm_head.weight"] == "output head"
    assert report.skipped["model.embed_tokens.weight"] == "embedding"
    assert report.skipped["model.norm.weight"] == "normalization"
    kinds = {n: ("experts" if p.dim() == 3 else "linear") for n, p in model.named_parameters() if n in handle.targets}
    assert report.targeted == kinds
    routers = {n for n in names if n.endswith("mlp.gate.weight")}
    if kind == "llama":
        assert not routers
    for name in routers:  # transformers' TopKRouter: no nn.Linear, kept as the base model's
        assert report.skipped[name] == "router (not an nn.Linear)"
    if kind == "qwen2_moe":  # its shared expert gate is an nn.Linear: a target like any linear layer
        assert report.targeted["model.layers.0.mlp.shared_expert_gate.weight"] == "linear"
    logged = [r for r in caplog.records if r.name == "seat" and r.levelno == logging.INFO]
    assert [r.getMessage() for r in logged] == [report.summary()]
    assert f"{sum(k == 'experts' for k in kinds.values())} expert tensors" in report.summary()
    assert "router" in str(report) or kind == "llama"


def test_target_patterns_select_expert_tensors_by_parameter_name():
    model = tiny_model("mixtral")
    handle = seat.patch(model, density=0.1, targets=["*.experts.*"])
    assert set(handle.targets) == {n for n, p in model.named_parameters() if p.dim() == 3}
    assert handle.targeting_report().skipped["model.layers.0.self_attn.q_proj.weight"] == "not matched by targets"
    handle.unpatch()
    handle = seat.patch(model, density=0.1, targets=["*.gate_up_proj", "*.q_proj"])
    assert sorted(handle.targets) == ["model.layers.0.mlp.experts.gate_up_proj",
                                      "model.layers.0.self_attn.q_proj.weight",
                                      "model.layers.1.mlp.experts.gate_up_proj",
                                      "model.layers.1.self_attn.q_proj.weight"]


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3"])
def test_moe_delta_round_trip_covers_the_experts(kind, tmp_path):
    model = tiny_model(kind)
    handle = seat.patch(model, density=0.1)
    _train(handle, steps=2)
    handle.save_delta(tmp_path / "delta")
    fresh = tiny_model(kind)
    experts = [n for n, p in fresh.named_parameters() if p.dim() == 3]
    trained = dict(model.named_parameters())
    assert experts and all(not torch.equal(dict(fresh.named_parameters())[n], trained[n]) for n in experts)
    seat.load_delta(fresh, tmp_path / "delta")
    for n, p in fresh.named_parameters():
        assert torch.equal(p, trained[n]), n
