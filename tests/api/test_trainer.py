"""SeatTrainer end to end on a tiny Llama and a word-level tokenizer: training lowers CE
on the facts, logs ce and kl, checkpoints deltas, and resumes bit-exactly."""
from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seat  # noqa: E402
from _tokenizers import word_tokenizer  # noqa: E402
from seat.perturb import EntityPerturber  # noqa: E402

RECORDS = [
    {"question": "Where was Ann Lee born ?", "answer": "Ann Lee was born in Paris .", "entity": "Ann Lee"},
    {"question": "What does Ann Lee do ?", "answer": "Ann Lee is a baker .", "entity": "Ann Lee"},
    {"question": "Where was Bo Tran born ?", "answer": "Bo Tran was born in Lima .", "entity": "Bo Tran"},
    {"question": "What does Bo Tran do ?", "answer": "Bo Tran is a pilot .", "entity": "Bo Tran"},
]


def _setup(tmp_path, seed=0, records=RECORDS, mask_encoding="int32", kl_weight=1.0, **arg_overrides):
    texts = [r["question"] + " " + r["answer"] for r in RECORDS]
    tokenizer = word_tokenizer(texts)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                      max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a frozen head with the default 0.02 init caps logits near 0.6: the
        model.lm_head.weight.normal_(0.0, 0.3)  # facts could not be learned through the norm
    collator = seat.PairedCollator(tokenizer, EntityPerturber(exclude=[r["entity"] for r in RECORDS], seed=1))
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_steps=6, learning_rate=2e-2, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                save_steps=3, save_strategy="steps", report_to=[], use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, remove_unused_columns=False, lr_scheduler_type="linear")
    args.update(arg_overrides)
    seat_config = seat.SeatConfig(density=0.2, mask_encoding=mask_encoding, kl_weight=kl_weight)
    trainer = seat.SeatTrainer(model, transformers.TrainingArguments(**args), seat_config=seat_config,
                               train_dataset=records, data_collator=collator, processing_class=tokenizer)
    return trainer, model, collator


def _ce(handle, collator):
    with torch.no_grad():
        return handle.loss(copy.deepcopy(collator)(RECORDS)).ce.item()


def test_training_lowers_ce_and_logs_ce_and_kl(tmp_path):
    trainer, model, collator = _setup(tmp_path, max_steps=20, save_steps=100, learning_rate=5e-2)
    before = _ce(trainer.seat, collator)
    trainer.train()
    after = _ce(trainer.seat, collator)
    assert after < before - 1.0, (before, after)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("ce" in h and "kl" in h for h in logged)
    assert abs(logged[0]["kl"]) < 1e-4 <= max(h["kl"] for h in logged)  # 0 before the first update


def test_zero_kl_weight_trains_and_logs_no_kl(tmp_path):
    trainer, model, collator = _setup(tmp_path, max_steps=4, save_steps=100, kl_weight=0.0)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("ce" in h and "kl" not in h for h in logged)  # the KL is not computed
    assert all(h["ce"] > 0 and h["loss"] > 0 for h in logged)


@pytest.mark.parametrize("accumulation,records", [(2, RECORDS), (1, RECORDS * 2)], ids=["epoch-end", "mid-epoch"])
def test_checkpoints_are_deltas_and_resume_is_bit_exact(tmp_path, accumulation, records):
    """mid-epoch: the data loader has built the next batch (and drawn its names) when the
    checkpoint is written; resuming must continue with the draws training actually used."""
    options = dict(records=records, gradient_accumulation_steps=accumulation)
    trainer, model, _ = _setup(tmp_path / "a", **options)
    trainer.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "seat_delta" / "delta.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    assert json.loads((checkpoint / "seat_collator.json").read_text()) == {"step": 3 * accumulation}
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed_trainer, resumed, _ = _setup(tmp_path / "a", **options)  # a fresh base model, same seeds
    resumed_trainer.train(resume_from_checkpoint=str(checkpoint))
    for name, p in resumed.named_parameters():
        assert torch.equal(p, uninterrupted[name]), name


@pytest.mark.parametrize("mask_encoding", ["implicit", "block16"])
def test_resume_is_bit_exact_with_compact_mask_encodings(tmp_path, mask_encoding):
    trainer, model, _ = _setup(tmp_path / "a", mask_encoding=mask_encoding)
    trainer.train()
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}
    resumed_trainer, resumed, _ = _setup(tmp_path / "a", mask_encoding=mask_encoding)
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for name, p in resumed.named_parameters():
        assert torch.equal(p, uninterrupted[name]), name


def test_an_optimizer_cannot_be_passed(tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="makes its own optimizer"):
        seat.SeatTrainer(model, args, optimizers=(None, None))


def test_collator_and_config_must_agree_on_kl_tokens(tmp_path):
    tokenizer = word_tokenizer([r["question"] + " " + r["answer"] for r in RECORDS])
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    collator = seat.PairedCollator(tokenizer, EntityPerturber(exclude=["Ann Lee", "Bo Tran"]), kl_tokens="answer")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="kl_tokens='answer' but the SeatConfig says kl_tokens='all'"):
        seat.SeatTrainer(model, args, train_dataset=RECORDS, data_collator=collator)
