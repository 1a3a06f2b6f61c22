"""SeatTrainer and handle.optimizer with the lean SparseAdamW modes: options pass
through, incompatible TrainingArguments are refused, optimizer-in-backward trains the same
trajectory as the default mode, lean checkpoints resume bit-exactly."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seat  # noqa: E402
from _tokenizers import word_tokenizer  # noqa: E402
from seat.perturb import EntityPerturber  # noqa: E402
from test_trainer import RECORDS  # noqa: E402


def _setup(tmp_path, optimizer_kwargs=None, **arg_overrides):
    tokenizer = word_tokenizer([r["question"] + " " + r["answer"] for r in RECORDS])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                      max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    collator = seat.PairedCollator(tokenizer, EntityPerturber(exclude=[r["entity"] for r in RECORDS], seed=1))
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                max_steps=6, learning_rate=2e-2, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
                save_steps=3, save_strategy="steps", report_to=[], use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, remove_unused_columns=False, lr_scheduler_type="linear")
    args.update(arg_overrides)
    trainer = seat.SeatTrainer(model, transformers.TrainingArguments(**args), seat_config=seat.SeatConfig(density=0.2),
                               train_dataset=RECORDS, data_collator=collator, processing_class=tokenizer,
                               optimizer_kwargs=optimizer_kwargs)
    return trainer, model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_update_in_backward_trains_the_default_trajectory(tmp_path, checkpointing):
    """With a linear LR schedule: the update of step t runs in backward t with the lr the
    scheduler set after step t-1, as the default mode's step() t does. With gradient
    checkpointing too: a weight is updated only after its gradient is complete, so the
    recomputed forward of every segment still sees the old weights."""
    default, model_a = _setup(tmp_path / "a", gradient_checkpointing=checkpointing)
    default.train()
    lean, model_b = _setup(tmp_path / "b", optimizer_kwargs=dict(update_in_backward=True),
                           gradient_checkpointing=checkpointing)
    assert lean.seat._optimizer.update_in_backward and lean.seat._optimizer._grads == {}
    lean.train()
    assert model_b.is_gradient_checkpointing == checkpointing
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(p, q) for p, q in zip(model_b.parameters(), _setup(tmp_path / "c")[1].parameters()))


@pytest.mark.parametrize("overrides, match", [
    (dict(gradient_accumulation_steps=2), r"set gradient_accumulation_steps=1 \(got 2"),
    (dict(max_grad_norm=1.0), r"set max_grad_norm=0 in TrainingArguments \(got 1.0\)"),
])
def test_update_in_backward_refuses_accumulation_and_clipping(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _setup(tmp_path, optimizer_kwargs=dict(update_in_backward=True), **overrides)


def test_lean_checkpoint_resumes_bit_exactly(tmp_path):
    lean = dict(update_in_backward=True, state_bits=8, grad_dtype=torch.bfloat16)
    trainer, model = _setup(tmp_path / "a", optimizer_kwargs=lean)
    trainer.train()
    assert trainer.seat._optimizer.state[model.model.layers[0].self_attn.q_proj.weight]["exp_avg"].dtype == torch.uint8
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}
    resumed_trainer, resumed = _setup(tmp_path / "a", optimizer_kwargs=lean)
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for name, p in resumed.named_parameters():
        assert torch.equal(p, uninterrupted[name]), name


def test_handle_optimizer_passes_lean_options_through():
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    handle = seat.patch(model, seat.SeatConfig(density=0.5))
    opt = handle.optimizer(lr=1e-3, grad_dtype=torch.bfloat16, state_bits=8, update_in_backward=True)
    assert opt.grad_dtype == torch.bfloat16 and opt.state_bits == 8 and opt.update_in_backward
    assert all(opt.state[t.param]["exp_avg"].dtype == torch.uint8 for t in handle.targets.values())
    handle.unpatch()
