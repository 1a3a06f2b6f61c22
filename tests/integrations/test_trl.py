"""seat.integrations.trl.SeatSFTTrainer against the installed TRL, on a tiny Llama: on the same
records, seeds and masks it builds SeatTrainer's batches and trains SeatTrainer's run bit for
bit (losses per step and weights) in each TRL format; only masked entries change; multi-turn
prompts with a system message train; delta checkpoints resume bit-exactly; default
remove_unused_columns keeps the columns; a resume with shuffle_dataset changed is refused; and
a missing TRL says how to install it. Refused input: test_trl_refused.py."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import transformers  # noqa: E402
from trl import SFTConfig  # noqa: E402

import seat  # noqa: E402
from _trainer_helpers import RECORDS, assert_params_equal, tiny_llama, trained_params  # noqa: E402
from _trl_helpers import (FORMATS, SFT_ARGS, assert_only_masked_entries_changed, assistant,  # noqa: E402
                          make_seat_trainer, make_sft_trainer, tokenizer, trl_rows, user)
from seat.data_formats import SFTPairedCollator  # noqa: E402
from seat.integrations.trl import SeatSFTTrainer  # noqa: E402

CASES = [(f, True) for f in FORMATS] + [("prompt-completion", False)]
CASE_IDS = ["plain-chat-tokenizer", "conversational", "messages", "plain-word-tokenizer"]


def _logged(trainer) -> list[tuple[float, float, float]]:
    return [(h["loss"], h["ce"], h["kl"]) for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("dataset_format, chat", CASES, ids=CASE_IDS)
def test_same_batches_losses_and_weights_as_seat_trainer(tmp_path, dataset_format, chat):
    """Bit-exact, not within a tolerance: both trainers run the same ops on the same
    batches in the same order (SeatSFTTrainer with SFTConfig's gradient checkpointing on,
    SeatTrainer without: the recomputed forward is the same arithmetic)."""
    sft, sft_model = make_sft_trainer(tmp_path / "sft", dataset_format, chat=chat, save_steps=100)
    ref, ref_model, ref_collator = make_seat_trainer(tmp_path / "ref", dataset_format, chat=chat, save_steps=100)
    collator = sft.data_collator.inner
    assert isinstance(collator, SFTPairedCollator) and collator.dataset_format == dataset_format
    assert sft.args.gradient_checkpointing and not ref.args.gradient_checkpointing
    for a, b in zip(trained_params(sft_model).values(), trained_params(ref_model).values()):
        assert torch.equal(a, b)  # the same masks and base weights
    rows, mine, theirs = trl_rows(dataset_format), copy.deepcopy(collator), copy.deepcopy(ref_collator)
    for step in range(3):
        batch, expected = mine(rows[step % 2::2]), theirs(RECORDS[step % 2::2])
        assert batch.keys() == expected.keys()
        for key in expected:
            assert torch.equal(batch[key], expected[key]), (step, key)
    before = trained_params(sft_model)
    sft.train()
    ref.train()
    assert len(_logged(sft)) == 6 and _logged(sft) == _logged(ref)
    assert all(torch.isfinite(torch.tensor(step)).all() for step in _logged(sft))
    assert_params_equal(sft_model, trained_params(ref_model))
    assert_only_masked_entries_changed(sft, before)


def test_multi_turn_prompt_with_a_system_message(tmp_path):
    """The prompt is every message before the last (system, user, assistant, user), rendered
    by the chat template for x and x~ alike; the entity is replaced in every message."""
    def conversation(r):
        return [{"role": "system", "content": f"Facts about {r['entity']} follow ."}, user("Hello ."),
                assistant("Hello ."), user(r["question"]), assistant(r["answer"])]

    rows = [{"messages": conversation(r), "entity": r["entity"]} for r in RECORDS]
    trainer, model = make_sft_trainer(tmp_path, "messages", rows=rows, max_steps=3, save_steps=100)
    tok, collator = trainer.processing_class, copy.deepcopy(trainer.data_collator.inner)
    batch = collator(rows[:1])
    fake = collator.last_fake_names[0]
    prompt = tok.apply_chat_template(rows[0]["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    answer = tok(RECORDS[0]["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(prompt) + len(answer)
    assert batch["input_ids"][0, :n].tolist() == list(prompt) + answer
    assert batch["labels"][0, :len(prompt)].eq(-100).all() and batch["labels"][0, len(prompt):n].tolist() == answer
    perturbed = [{**m, "content": m["content"].replace("Ann Lee", fake)} for m in rows[0]["messages"][:-1]]
    pert_prompt = tok.apply_chat_template(perturbed, add_generation_prompt=True, tokenize=True, return_dict=False)
    pert_answer = tok(RECORDS[0]["answer"].replace("Ann Lee", fake), add_special_tokens=False)["input_ids"]
    assert batch["pert_input_ids"][0, :len(pert_prompt) + len(pert_answer)].tolist() == list(pert_prompt) + pert_answer
    # the same batch as PairedCollator on {question: the messages before the answer, answer, entity}
    as_seat = [{"question": conversation(r)[:-1], "answer": r["answer"], "entity": r["entity"]} for r in RECORDS[:1]]
    expected = seat.PairedCollator(tok, copy.deepcopy(collator.perturber))(as_seat)
    assert batch.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in batch.items())
    before = trained_params(model)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(step)).all() for step in _logged(trainer))
    assert_only_masked_entries_changed(trainer, before)


def test_delta_checkpoint_and_bit_exact_resume(tmp_path):
    trainer, model = make_sft_trainer(tmp_path, "messages")
    trainer.train()
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / "seat_delta" / "delta.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    assert json.loads((checkpoint / "seat_collator.json").read_text()) == {"step": 6}
    run = json.loads((checkpoint / "seat_run.json").read_text())
    assert run["collator"]["class"] == "SFTPairedCollator" and run["collator"]["dataset_format"] == "messages"
    uninterrupted = trained_params(model)
    resumed_trainer, resumed = make_sft_trainer(tmp_path, "messages")  # a fresh base model, same seeds
    resumed_trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_params_equal(resumed, uninterrupted)
    # a run on another format is another run: refused, naming the difference
    other, _ = make_sft_trainer(tmp_path, "conversational prompt-completion")
    with pytest.raises(seat.ResumeMismatchError, match="dataset_format"):
        other.train(resume_from_checkpoint=str(checkpoint))


def test_a_resume_with_shuffle_dataset_changed_is_refused(tmp_path):
    """SFTConfig.shuffle_dataset reorders the training rows: a resume must use the same."""
    shuffled, _ = make_sft_trainer(tmp_path / "a", "messages", max_steps=3, shuffle_dataset=True)
    shuffled.train()
    plain, _ = make_sft_trainer(tmp_path / "b", "messages", max_steps=3)
    plain.train()
    for trainer, other in ((plain, tmp_path / "a"), (shuffled, tmp_path / "b")):
        with pytest.raises(seat.ResumeMismatchError, match="training_args.shuffle_dataset"):
            trainer.train(resume_from_checkpoint=str(other / "checkpoint-3"))
    resumed, _ = make_sft_trainer(tmp_path / "a", "messages", max_steps=3, shuffle_dataset=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))


def test_default_remove_unused_columns_and_plain_training_arguments(tmp_path):
    """SFTConfig's and TrainingArguments' default remove_unused_columns=True keep the
    collator's columns (an extra column is dropped); TrainingArguments are converted to an
    SFTConfig as SFTTrainer does; the caller's arguments are not changed."""
    explicit, model_a = make_sft_trainer(tmp_path / "a", "messages", max_steps=2, save_steps=100)
    explicit.train()
    rows = [dict(r, source="wiki") for r in trl_rows("messages")]
    default, model_b = make_sft_trainer(tmp_path / "b", "messages", rows=rows, max_steps=2, save_steps=100,
                                        remove_unused_columns=True)
    default.train()
    assert_params_equal(model_b, trained_params(model_a))

    tok = tokenizer(chat=True)
    model_c = tiny_llama(tok)
    options = {k: v for k, v in SFT_ARGS.items() if k != "remove_unused_columns"}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "c"), **dict(options, max_steps=2,
                                                                                   save_steps=100))
    assert args.remove_unused_columns
    plain = SeatSFTTrainer(model_c, args, train_dataset=rows, processing_class=tok,
                           seat_config=seat.SeatConfig(density=0.2))
    assert isinstance(plain.args, SFTConfig) and not isinstance(args, SFTConfig)
    plain.train()
    assert_params_equal(model_c, trained_params(model_a))
    config = SFTConfig(output_dir=str(tmp_path / "d"), **dict(SFT_ARGS, max_steps=1))
    SeatSFTTrainer(tiny_llama(tok), config, train_dataset=rows, processing_class=tok)
    assert config.dataset_kwargs is None  # the trainer set skip_prepare_dataset on its own copy


def test_custom_entity_column_eval_and_a_model_path(tmp_path):
    tok = tokenizer(chat=True)
    base = tiny_llama(tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"prompt": r["prompt"], "completion": r["completion"], "person": r["entity"]}
            for r in trl_rows("conversational prompt-completion")]
    args = SFTConfig(output_dir=str(tmp_path / "out"), **dict(SFT_ARGS, max_steps=2, save_steps=100))
    trainer = SeatSFTTrainer(str(tmp_path / "base"), args, train_dataset=rows, eval_dataset=rows[:2],
                             entity_column="person", seat_config=seat.SeatConfig(density=0.2))
    assert trainer.data_collator.record_keys == ("prompt", "completion", "person")
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_without_trl_the_import_error_says_how_to_install():
    code = ("import sys; sys.modules['trl'] = None\n"
            "try:\n    import seat.integrations.trl\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install seat[trl]" in out
    light = subprocess.run([sys.executable, "-c", "import sys, seat, seat.integrations; "
                            "print('trl' in sys.modules, 'datasets' in sys.modules)"],
                           capture_output=True, text=True, check=True).stdout
    assert light.split() == ["False", "False"]
