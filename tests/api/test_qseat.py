"""QSEAT: seat.patch on tiny Llama / Qwen2 models loaded with bitsandbytes 4-bit weights
(CPU): only the deltas train, the packed weights never change, reference() is the 4-bit
base bit-exactly, the loss is the naive float computation, every lean mode and mask
encoding, SeatTrainer with gradient checkpointing, deltas saved and loaded exactly onto
the 4-bit base or merged into a float one, and the refusals."""
from __future__ import annotations

import json

import pytest
import torch

import seat
from _models import paired_batch
from _qseat_helpers import (bnb_forward_logits, dequantized_float_twin, linear4bit_modules, packed_snapshot,
                            same_snapshot, tiny_4bit_model, tiny_float_model)
from seat.delta import DeltaMismatchError

pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [32, 38, 46, 26, 43, 38, 32, 79]])
KINDS = ["llama", "qwen2"]  # qwen2: q / k / v biases through the 4-bit forward


def _train(handle, steps: int = 2, lr: float = 1e-2, **opt_kwargs):
    opt = handle.optimizer(lr=lr, **opt_kwargs)
    losses = []
    batch = paired_batch(seed=0)  # one batch: its loss falls
    for _ in range(steps):
        out = handle.loss(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out)
    return opt, losses


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_deltas_train_and_the_base_never_changes(kind):
    model = tiny_4bit_model(kind)
    base_logits = bnb_forward_logits(model, IDS)
    packed = packed_snapshot(model)
    others = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = seat.patch(model, density=0.1)
    assert len(handle.targets) == 14 and all(hasattr(t, "delta") for t in handle.targets.values())
    report = handle.targeting_report()
    assert set(report.targeted.values()) == {"linear4bit"} and "4-bit linear weights" in report.summary()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".seat_delta") for n in trainable)
    assert handle.num_trainable == sum(t.delta.numel() for t in handle.targets.values())
    _, losses = _train(handle, steps=3)
    assert float(losses[0].kl.detach()) == 0.0  # the reference is the trained model before the first update
    assert float(losses[-1].kl.detach()) > 0.0
    assert all(bool(t.delta.detach().abs().sum() > 0) for t in handle.targets.values())
    assert same_snapshot(packed, packed_snapshot(model))  # the packed codes and their state: untouched
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p, others[n]), n
    with handle.reference():  # the 4-bit base's output, bit for bit
        assert torch.equal(model(IDS).logits, base_logits)
    with torch.no_grad():
        assert not torch.equal(model(IDS).logits, base_logits)
    handle.revert()  # the deltas and the forwards are gone: bitsandbytes' own layer again
    assert not any(n.endswith("seat_delta") for n, _ in model.named_parameters())
    assert all("forward" not in m.__dict__ for _, m in linear4bit_modules(model))
    assert torch.equal(bnb_forward_logits(model, IDS), base_logits)
    assert same_snapshot(packed, packed_snapshot(model))


@pytest.mark.parametrize("kind", KINDS)
def test_the_loss_is_the_naive_computation_on_the_dequantized_base(kind):
    """Compute dtype float32: the effective weight is dequant(W) + delta exactly as the
    naive float32 model holds it, so the losses agree to float32 rounding."""
    model = tiny_4bit_model(kind, compute_dtype=torch.float32)
    handle = seat.patch(model, density=0.2)
    _train(handle, steps=2)
    twin = dequantized_float_twin(model, handle)
    batch = paired_batch(seed=7)
    with torch.no_grad():
        got = handle.loss(batch)
        with handle.reference():
            base_logits = model(IDS).logits
        logits = model(IDS).logits
    twin_handle = seat.patch(twin, density=0.2)  # the same loss on the float twin (its masks are unused)
    base_twin = dequantized_float_twin(model)
    with torch.no_grad():
        want = twin_handle.loss(batch)
        torch.testing.assert_close(logits, twin(IDS).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base_logits, base_twin(IDS).logits, rtol=1e-5, atol=1e-5)
    # the twin's reference is the twin itself (nothing trained): compare CE exactly, KL via logits above
    torch.testing.assert_close(got.ce, want.ce, rtol=1e-5, atol=1e-6)


def test_bf16_compute_is_close_to_the_naive_computation():
    model = tiny_4bit_model("llama", compute_dtype=torch.bfloat16)
    handle = seat.patch(model, density=0.2)
    _train(handle, steps=2)
    twin = dequantized_float_twin(model, handle)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, twin(IDS).logits, rtol=0.02, atol=0.02)


def test_the_gradient_of_the_delta_is_the_masked_weight_gradient():
    """One layer against autograd through the naive float32 computation."""
    from seat.masks import mask_indices

    model = tiny_4bit_model("llama", compute_dtype=torch.float32)
    handle = seat.patch(model, density=0.3, seed=5)
    target = handle.targets["model.layers.0.mlp.down_proj.weight"]
    with torch.no_grad():
        target.delta.normal_(0, 0.01)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = target.module(x)
    g = torch.randn_like(y)
    y.backward(g)
    import bitsandbytes.functional as bnbf

    w = bnbf.dequantize_4bit(target.module.weight, target.module.weight.quant_state).float()
    idx = mask_indices(target.mask).long()
    w.view(-1)[idx] += target.delta.detach()
    w.requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, w).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target.delta.grad, w.grad.view(-1)[idx], rtol=1e-5, atol=1e-6)


LEAN = {"int32": ({}, "int32"),
        "block16": ({}, "block16"),
        "implicit+lean": (dict(update_in_backward=True, state_bits=8, grad_dtype=torch.bfloat16), "implicit"),
        "8bit": (dict(state_bits=8), "int32")}


@pytest.mark.parametrize("mode", list(LEAN))
def test_every_encoding_and_lean_mode_trains(mode):
    kwargs, encoding = LEAN[mode]
    model = tiny_4bit_model("qwen2")
    packed = packed_snapshot(model)
    handle = seat.patch(model, seat.SeatConfig(density=0.1, mask_encoding=encoding))
    assert {type(t.mask).__name__ for t in handle.targets.values()} == (
        {"Tensor"} if encoding == "int32" else {"Block16Mask"} if encoding == "block16" else {"ImplicitMask"})
    opt, losses = _train(handle, steps=3, **kwargs)
    assert float(losses[-1].loss.detach()) < float(losses[0].loss.detach())
    assert same_snapshot(packed, packed_snapshot(model))
    assert opt.state_bytes() > 0


def test_magnitude_masks_rank_the_dequantized_weight():
    from seat.masks import magnitude_mask, mask_indices

    model = tiny_4bit_model("llama")
    handle = seat.patch(model, density=0.1, mask="magnitude")
    import bitsandbytes.functional as bnbf

    for name, t in handle.targets.items():
        w = bnbf.dequantize_4bit(t.module.weight, t.module.weight.quant_state)
        assert torch.equal(mask_indices(t.mask), magnitude_mask(w, 0.1)), name


def test_seat_trainer_with_gradient_checkpointing_trains_a_4bit_model(tmp_path):
    import transformers

    from _trainer_helpers import ARGS, RECORDS, tiny_llama, tokenizer
    from seat.perturb import EntityPerturber

    tok = tokenizer()
    float_model = tiny_llama(tok)
    folder = tmp_path / "base"
    float_model.save_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True))
    model.gradient_checkpointing_enable()
    packed = packed_snapshot(model)
    collator = seat.PairedCollator(tok, EntityPerturber(exclude=[r["entity"] for r in RECORDS], seed=1))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), **{
        **ARGS, "max_steps": 3, "gradient_accumulation_steps": 1, "max_grad_norm": 0.0, "save_steps": 3,
        "gradient_checkpointing": True})
    trainer = seat.SeatTrainer(model, args, seat_config=seat.SeatConfig(density=0.2, mask_encoding="implicit"),
                               optimizer_kwargs=dict(update_in_backward=True, state_bits=8),
                               train_dataset=RECORDS, data_collator=collator, processing_class=tok)
    trainer.train()
    handle = seat.patching.handle_of(model)
    assert all(bool(t.delta.detach().abs().sum() > 0) for t in handle.targets.values())
    assert same_snapshot(packed, packed_snapshot(model))
    assert not model.__dict__.get("_hf_peft_config_loaded")  # set for transformers' check only
    delta = tmp_path / "out" / "checkpoint-3" / "seat_delta"
    meta = json.loads((delta / "seat_config.json").read_text())
    assert meta["format_version"] == 4
    assert {w["quant"]["quant_type"] for w in meta["weights"].values()} == {"fp4"}
    assert all(w["quant"]["double_quant"] for w in meta["weights"].values())


# ---------------------------------------------------------------------- deltas
def _trained_4bit(kind="llama", **load):
    model = tiny_4bit_model(kind, **load)
    handle = seat.patch(model, seat.SeatConfig(density=0.1, mask_encoding="implicit" if kind == "qwen2" else "int32"))
    _train(handle, steps=2)
    return model, handle


@pytest.mark.parametrize("kind", KINDS)
def test_a_delta_loads_exactly_onto_the_same_4bit_base(tmp_path, kind):
    model, handle = _trained_4bit(kind)
    with torch.no_grad():
        trained = model(IDS).logits
    handle.save_delta(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "seat_config.json").read_text())
    assert meta["format_version"] == 4
    info = next(iter(meta["weights"].values()))
    assert info["quant"]["quant_type"] == "nf4" and info["dtype"] == "bfloat16"
    fresh = tiny_4bit_model(kind)
    packed = packed_snapshot(fresh)
    seat.load_delta(fresh, tmp_path / "d")  # an unpatched 4-bit model: patched with the delta's config and masks
    fresh_handle = seat.patching.handle_of(fresh)
    for name, t in handle.targets.items():
        assert torch.equal(fresh_handle.targets[name].delta, t.delta), name
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, trained)
    assert same_snapshot(packed, packed_snapshot(fresh))
    # onto a model patched alike (a resumed run): the values go into its deltas
    again = tiny_4bit_model(kind)
    again_handle = seat.patch(again, handle.config)
    seat.load_delta(again, tmp_path / "d")
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, trained)
    fresh_handle.revert()
    assert torch.equal(bnb_forward_logits(fresh, IDS), bnb_forward_logits(tiny_4bit_model(kind), IDS))
    assert again_handle is seat.patching.handle_of(again)


def test_a_4bit_delta_refuses_other_quantization_settings_and_bases(tmp_path):
    _, handle = _trained_4bit("llama")
    handle.save_delta(tmp_path / "d")
    for load, what in ((dict(quant_type="fp4"), "quant_type"), (dict(double_quant=True), "double_quant"),
                       (dict(compute_dtype=torch.float32), "compute_dtype")):
        other = tiny_4bit_model("llama", **load)
        packed = packed_snapshot(other)
        with pytest.raises(DeltaMismatchError, match=f"quantized otherwise.*{what}"):
            seat.load_delta(other, tmp_path / "d")
        assert seat.patching.handle_of(other) is None and same_snapshot(packed, packed_snapshot(other))
    other_base = tiny_4bit_model("llama", seed=1)
    with pytest.raises(DeltaMismatchError, match="dequantized base under the mask differs"):
        seat.load_delta(other_base, tmp_path / "d")
    assert seat.patching.handle_of(other_base) is None
    # a model patched with other masks
    patched = tiny_4bit_model("llama")
    seat.patch(patched, density=0.1, seed=9)
    with pytest.raises(DeltaMismatchError, match="mask of .* differs"):
        seat.load_delta(patched, tmp_path / "d")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_4bit_delta_merges_into_a_float_base_approximately(tmp_path, dtype):
    """QLoRA's approximation: W[idx] += delta on the unquantized base. The merged model
    differs from the trained 4-bit one by the base's quantization error; measured here
    against the error of the 4-bit base itself (the same order, not more)."""
    model, handle = _trained_4bit("llama")
    with torch.no_grad():
        trained = model(IDS).logits.float()
        with handle.reference():
            base4 = model(IDS).logits.float()
    handle.save_delta(tmp_path / "d")
    float_model = tiny_float_model("llama", dtype=dtype)
    with torch.no_grad():
        base = float_model(IDS).logits.float()
    seat.load_delta(float_model, tmp_path / "d")
    assert seat.patching.handle_of(float_model) is None  # merged: nothing patched
    with torch.no_grad():
        merged = float_model(IDS).logits.float()
    merge_error = (merged - trained).abs().max().item()
    quant_error = (base - base4).abs().max().item()
    update = (trained - base4).abs().max().item()
    print(f"{dtype}: merged vs trained 4-bit logits max |diff| {merge_error:.4f}; the 4-bit base's own error "
          f"{quant_error:.4f}; the update moved the logits by {update:.4f}")
    assert update > 0.01 and merge_error <= 2 * quant_error + 0.02
    # the delta landed: the merged model moved from its base the way training moved the 4-bit one
    assert ((merged - base) * (trained - base4)).sum() > 0


def test_unpatch_is_refused_with_the_reason_and_changes_nothing():
    model, handle = _trained_4bit("llama")
    with torch.no_grad():
        trained = model(IDS).logits
    with pytest.raises(RuntimeError, match="quantized again"):
        handle.unpatch()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, trained)
    assert seat.patching.handle_of(model) is handle


def test_non_float_targets_other_than_4bit_are_refused():
    from _models import tiny_model

    model = tiny_model("llama")
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    layer.forward = lambda x: torch.nn.functional.linear(x, layer.weight.to(x.dtype))
    with pytest.raises(ValueError, match="q_proj.weight is a torch.int8 weight.*Linear4bit"):
        seat.patch(model, density=0.1)
    assert seat.patching.handle_of(model) is None


def test_a_weight_repacked_by_bitsandbytes_cpu_inference_is_refused():
    model = tiny_4bit_model("llama")
    module = linear4bit_modules(model)[0][1]
    module.weight.quant_state.packing_format_for_cpu = True  # what bitsandbytes' CPU inference path sets
    with pytest.raises(ValueError, match="repacked by bitsandbytes' CPU inference path"):
        seat.patch(model, density=0.1)
    assert seat.patching.handle_of(model) is None


def test_cpu_repacking_is_off_while_patched_and_restored_after():
    model = tiny_4bit_model("llama")
    flags = {n: m.support_avx512bf16_for_cpu for n, m in linear4bit_modules(model)}
    handle = seat.patch(model, density=0.1)
    assert not any(m.support_avx512bf16_for_cpu for _, m in linear4bit_modules(model))
    handle.revert()
    assert {n: m.support_avx512bf16_for_cpu for n, m in linear4bit_modules(model)} == flags


def test_a_4bit_seat_trainer_run_resumes_bit_exactly(tmp_path):
    """SeatTrainer's checkpoint of a QSEAT run (its delta, optimizer state, run record)
    continues on a fresh copy of the 4-bit base to the same deltas, bit for bit."""
    import transformers

    from _trainer_helpers import ARGS, RECORDS, tiny_llama, tokenizer
    from seat.perturb import EntityPerturber

    tok = tokenizer()
    tiny_llama(tok).save_pretrained(tmp_path / "base")

    def run(out, **overrides):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
        collator = seat.PairedCollator(tok, EntityPerturber(exclude=[r["entity"] for r in RECORDS], seed=1))
        args = transformers.TrainingArguments(output_dir=str(out), **{**ARGS, "max_steps": 4, "save_steps": 2})
        trainer = seat.SeatTrainer(model, args, seat_config=seat.SeatConfig(density=0.2),
                                   train_dataset=RECORDS, data_collator=collator, processing_class=tok)
        trainer.train(**overrides)
        handle = seat.patching.handle_of(model)
        return {n: t.delta.detach().clone() for n, t in handle.targets.items()}

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert any(bool(v.abs().sum() > 0) for v in straight.values())
