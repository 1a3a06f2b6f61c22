"""seat.integrations.trl.SeatSFTTrainer against the installed TRL, on a tiny Llama: on the same
records, seeds and masks it builds SeatTrainer's batches and trains SeatTrainer's run bit for
bit (losses per step and weights) in each TRL format; only masked entries change; multi-turn
prompts with a system message train; delta checkpoints resume bit-exactly; default
remove_unused_columns keeps the columns; bad rows and SFT options SEAT cannot take are refused
before the model is patched; and a missing TRL says how to install it."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import datasets  # noqa: E402
import transformers  # noqa: E402
from trl import SFTConfig  # noqa: E402

import seat  # noqa: E402
from _trainer_helpers import RECORDS, assert_params_equal, tiny_llama, trained_params  # noqa: E402
from _trl_helpers import (FORMATS, SFT_ARGS, assert_only_masked_entries_changed, assistant,  # noqa: E402
                          make_seat_trainer, make_sft_trainer, tokenizer, trl_rows, user)
from seat.data_formats import SFTPairedCollator  # noqa: E402
from seat.integrations.trl import SeatSFTTrainer  # noqa: E402
from seat.patching import handle_of  # noqa: E402

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


# ---------------------------------------------------------------------- refused input

def _try(tmp_path, rows, **kwargs):
    tok = tokenizer(chat=True)
    model = tiny_llama(tok)
    config = kwargs.pop("config", {})
    args = SFTConfig(output_dir=str(tmp_path), **dict(SFT_ARGS, **config))
    try:
        SeatSFTTrainer(model, args, train_dataset=rows, processing_class=tok, **kwargs)
    finally:
        assert handle_of(model) is None  # refused before the model was patched


def _rows(fmt="messages"):
    return trl_rows(fmt)


@pytest.mark.parametrize("change, match", [
    (lambda rows: [{k: v for k, v in r.items() if k != "entity"} for r in rows],
     r"train_dataset has no 'entity' column .*add a column 'entity'"),
    (lambda rows: rows[:1] + [dict(rows[1], entity=None)] + rows[2:],
     r"train_dataset row 1 has no 'entity': SEAT needs each record's subject entity"),
    (lambda rows: rows[:2] + [dict(rows[2], entity="Cy Vo")],
     r"train_dataset row 2 \(entity 'Cy Vo'\): entity 'Cy Vo' is mentioned in neither"),
    (lambda rows: rows[:3] + [dict(rows[3], messages=rows[3]["messages"][:1])],
     r"train_dataset row 3 \(entity 'Bo Tran'\): 'messages' must end with the assistant's answer .*\['user'\]"),
    (lambda rows: rows[:1] + [dict(rows[1], messages=[user("Who is Ann Lee ?"), user("Ann Lee ?")])],
     r"row 1 .*must end with the assistant's answer"),
    (lambda rows: [{"text": "Ann Lee was born in Paris .", "entity": "Ann Lee"}],
     r"language modeling text .*prompt-completion format"),
    (lambda rows: [{"conversations": [{"from": "human", "value": "Ann Lee ?"}], "entity": "Ann Lee"}],
     r"ShareGPT .*convert them to 'messages'"),
    (lambda rows: [{"question": "Ann Lee ?", "answer": "Ann Lee .", "entity": "Ann Lee"}],
     r"has keys \['answer', 'entity', 'question'\]; SEAT reads TRL's prompt-completion"),
    (lambda rows: [dict(r, tools="[]") for r in rows], r"'tools' column"),
], ids=["no-entity-column", "entity-none", "entity-not-mentioned", "no-answer", "last-not-assistant",
        "text-format", "sharegpt", "seat-records", "tools-column"])
def test_bad_rows_are_named_before_anything_is_patched(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        _try(tmp_path, change(_rows()))


@pytest.mark.parametrize("rows, exc, match", [
    ([{"messages": "Ann Lee ?", "entity": "Ann Lee"}], TypeError, r"row 0 .*'messages' must be a list of chat"),
    ([{"messages": [{"role": r, "content": [{"type": "text", "text": "Ann Lee ."}]} for r in ("user", "assistant")],
       "entity": "Ann Lee"}], TypeError,
     r"row 0 .*'messages'\[0\]\['content'\] must be a str; got list"),
    ([{"messages": [{"role": "user"}, assistant("Ann Lee .")], "entity": "Ann Lee"}], TypeError,
     r"'messages'\[0\]\['content'\] must be a str; got missing"),
    ([{"prompt": [user("Ann Lee ?")], "completion": [assistant("Ann Lee ."), user("?")], "entity": "Ann Lee"}],
     ValueError, r"'completion' must be one assistant message"),
    ([{"prompt": "Ann Lee ?", "completion": 3, "entity": "Ann Lee"}], TypeError,
     r"'completion' must be a str in a prompt-completion dataset"),
    ([{"messages": [user("Ann Lee ?"), assistant("Ann Lee .")], "entity": 7}], TypeError,
     r"'entity' must be a str"),
], ids=["messages-str", "multimodal-content", "no-content", "two-completion-messages", "completion-int",
        "entity-int"])
def test_malformed_messages_are_named(tmp_path, rows, exc, match):
    with pytest.raises(exc, match=match):
        _try(tmp_path, rows)


@pytest.mark.parametrize("kwargs, match", [
    (dict(config=dict(packing=True)), "packing"),
    (dict(config=dict(padding_free=True)), "padding_free"),
    (dict(config=dict(assistant_only_loss=True)), "assistant_only_loss=True"),
    (dict(config=dict(completion_only_loss=False)), "completion_only_loss=False"),
    (dict(config=dict(loss_type="dft")), "loss_type='dft'"),
    (dict(peft_config=object()), "does not take peft_config"),
    (dict(formatting_func=lambda r: r["prompt"]), "does not take formatting_func"),
    (dict(optimizers=(None, None)), "makes its own optimizer"),
    # refused after the model was patched: the patch is reverted
    (dict(optimizer_kwargs=dict(update_in_backward=True)), "update_in_backward=True .* gradient_accumulation_steps"),
])
def test_options_seat_cannot_take_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _try(tmp_path, _rows(), **kwargs)


def test_an_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        _try(tmp_path, datasets.Dataset.from_list([]))


def test_conversational_rows_need_a_chat_template(tmp_path):
    tok = tokenizer(chat=False)
    args = SFTConfig(output_dir=str(tmp_path), **SFT_ARGS)
    with pytest.raises(ValueError, match="rendered with the tokenizer's chat template, but the tokenizer has none"):
        SeatSFTTrainer(tiny_llama(tok), args, train_dataset=_rows(), processing_class=tok)


def test_too_long_rows_are_an_error_not_truncated(tmp_path):
    trainer, _ = make_sft_trainer(tmp_path, "prompt-completion", max_length=8, max_steps=1)
    with pytest.raises(ValueError, match=r"record 0 .*longer than max_length=8"):
        trainer.train()


def test_without_trl_the_import_error_says_how_to_install():
    code = ("import sys; sys.modules['trl'] = None\n"
            "try:\n    import seat.integrations.trl\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install seat[trl]" in out
    light = subprocess.run([sys.executable, "-c", "import sys, seat, seat.integrations; "
                            "print('trl' in sys.modules, 'datasets' in sys.modules)"],
                           capture_output=True, text=True, check=True).stdout
    assert light.split() == ["False", "False"]
