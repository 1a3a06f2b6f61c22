"""A tiny SeatTrainer run for tests: a 2-layer Llama, a word-level tokenizer over four
facts about two people, seat.PairedCollator, CPU, seeded (two runs built alike train
bit-identically)."""
from __future__ import annotations

import torch
import transformers

import seat
from _tokenizers import word_tokenizer
from seat.perturb import EntityPerturber

RECORDS = [
    {"question": "Where was Ann Lee born ?", "answer": "Ann Lee was born in Paris .", "entity": "Ann Lee"},
    {"question": "What does Ann Lee do ?", "answer": "Ann Lee is a baker .", "entity": "Ann Lee"},
    {"question": "Where was Bo Tran born ?", "answer": "Bo Tran was born in Lima .", "entity": "Bo Tran"},
    {"question": "What does Bo Tran do ?", "answer": "Bo Tran is a pilot .", "entity": "Bo Tran"},
]

# 6 optimizer steps of 2 micro-batches of 2 records, clipped, a checkpoint every 3 steps.
ARGS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6, learning_rate=2e-2,
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_steps=3, save_strategy="steps",
            report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
            remove_unused_columns=False, lr_scheduler_type="linear")


def tokenizer():
    return word_tokenizer([r["question"] + " " + r["answer"] for r in RECORDS])


def tiny_llama(tok, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                      max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a frozen head with the default 0.02 init caps logits near 0.6: the
        model.lm_head.weight.normal_(0.0, 0.3)  # facts could not be learned through the norm
    return model


def make_trainer(output_dir, *, seed: int = 0, records=RECORDS, seat_config: seat.SeatConfig | None = None,
                 masks=None, collator=None, trainer_kwargs: dict | None = None, **arg_overrides):
    """(trainer, model, collator) of a fresh run; arg_overrides change ARGS; masks (by
    weight name) patch the model with given masks instead of the config's."""
    tok = tokenizer()
    model = tiny_llama(tok, seed)
    if masks is not None:
        seat.patch(model, seat_config or seat.SeatConfig(density=0.2), masks=masks)
    if collator is None:
        collator = seat.PairedCollator(tok, EntityPerturber(exclude=[r["entity"] for r in RECORDS], seed=1))
    args = transformers.TrainingArguments(output_dir=str(output_dir), **{**ARGS, **arg_overrides})
    trainer = seat.SeatTrainer(model, args, seat_config=seat_config or seat.SeatConfig(density=0.2),
                               train_dataset=records, data_collator=collator, processing_class=tok,
                               **(trainer_kwargs or {}))
    return trainer, model, collator


def trained_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(model, expected: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name
