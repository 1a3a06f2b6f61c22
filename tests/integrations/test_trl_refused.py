"""SeatSFTTrainer's refusals, each before the model is patched (or, for a set-up refused
inside SFTTrainer, with the model left as it was given): bad rows and malformed messages
named by dataset and row, SFT options SEAT cannot take, empty datasets, an eval dataset in
another format, a collator whose columns are missing, rows longer than max_length, a pad
token not in the vocabulary; and what the trainer must not change (the caller's SFTConfig)
or must do as SFTTrainer does (model ids, pad_token)."""
from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

import datasets  # noqa: E402
import transformers  # noqa: E402
from trl import SFTConfig  # noqa: E402

import seat  # noqa: E402
from _trainer_helpers import RECORDS, tiny_llama  # noqa: E402
from _trl_helpers import SFT_ARGS, assistant, make_sft_trainer, tokenizer, trl_rows, user  # noqa: E402
from seat.data_formats import SFTPairedCollator  # noqa: E402
from seat.integrations.trl import SeatSFTTrainer  # noqa: E402
from seat.patching import handle_of  # noqa: E402
from seat.perturb import EntityPerturber  # noqa: E402


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
    """A row whose x is longer than max_length stops the set-up (before patching), naming
    the row; one whose x~ is longer (a longer fictitious name) stops at its step."""
    with pytest.raises(ValueError, match=r"train_dataset row 0 \(entity 'Ann Lee'\) is 1[0-9] tokens .*longer than "
                                         r"max_length=8: SEAT never truncates; raise SFTConfig.max_length"):
        _try(tmp_path, _rows("prompt-completion"), config=dict(max_length=8))
    with pytest.raises(ValueError, match=r"eval_dataset row 0 .*longer than max_length"):
        _try(tmp_path, _rows(), eval_dataset=[dict(_rows()[0], entity="Ann Lee", messages=[
            user("Ann Lee ? " * 20), assistant("Ann Lee .")])], config=dict(max_length=40))
    tok = tokenizer(chat=False)
    collator = SFTPairedCollator(tok, EntityPerturber(exclude=["Ann Lee", "Bo Tran"], names=["Al Cy Di Ed Fu"]),
                                 dataset_format="prompt-completion")
    longest = max(len(collator.encode(r["question"], r["answer"])[0]) for r in RECORDS)
    trainer, _ = make_sft_trainer(tmp_path, "prompt-completion", chat=False, max_length=longest, max_steps=1,
                                  trainer_kwargs=dict(data_collator=SFTPairedCollator(
                                      tok, collator.perturber, dataset_format="prompt-completion",
                                      max_length=longest)))
    with pytest.raises(ValueError, match=r"record \d \(entity '.*'\): x~ \(perturbed\) is \d+ tokens, longer than "
                                         f"max_length={longest}"):
        trainer.train()


# ---------------------------------------------------------------------- odd input, refused before patching

@pytest.mark.parametrize("kwargs, match", [
    (dict(eval_dataset=[]), r"eval_dataset is empty; give at least one record or leave eval_dataset out"),
    (dict(eval_dataset={"held_out": []}), r"eval_dataset\['held_out'\] is empty"),
    (dict(eval_dataset=_rows("prompt-completion")),
     r"eval_dataset is in TRL's 'prompt-completion' format, but its collator reads 'messages'"),
    (dict(data_collator=seat.PairedCollator(tokenizer(chat=True), EntityPerturber(exclude=["Ann Lee", "Bo Tran"]),
                                            use_chat_template=True)),
     r"data_collator \(PairedCollator\) reads the columns \['question', 'answer', 'entity'\], but train_dataset "
     r"has \['messages', 'entity'\] \(no 'question', 'answer'\).*leave data_collator=None"),
    (dict(perturber=EntityPerturber(exclude=["Ann Lee", "Bo Tran"], replace_parts=False)),
     r"train_dataset row 0 \(entity 'Ann Lee'\): entity 'Ann Lee' is mentioned in neither"),
    (dict(config=dict(model_init_kwargs={"quantization_config": {"load_in_8bit": True}})),
     r"does not take model_init_kwargs\['quantization_config'\]"),
    (dict(config=dict(pad_token="<nope>")), r"pad_token '<nope>' .*not in the tokenizer's vocabulary"),
    (dict(eval_dataset=[dict(_rows()[0], images=["photo.png"])]), r"eval_dataset has an 'images' column"),
], ids=["empty-eval", "empty-eval-in-dict", "eval-in-another-format", "paired-collator-on-trl-rows",
        "mention-the-perturber-would-not-replace", "quantized-via-model-init-kwargs", "pad-token-not-in-vocab",
        "images"])
def test_odd_datasets_and_collators_are_refused_before_patching(tmp_path, kwargs, match):
    rows = _rows()
    if "perturber" in kwargs:  # only first names: replaced with replace_parts=True, not without
        rows = [dict(r, messages=[{**m, "content": m["content"].replace("Ann Lee", "Ann")} for m in r["messages"]])
                for r in rows]
    with pytest.raises(ValueError, match=match):
        _try(tmp_path, rows, **kwargs)


def test_an_empty_iterable_dataset_is_refused(tmp_path):
    empty = datasets.Dataset.from_list(_rows()).to_iterable_dataset().filter(lambda row: False)
    with pytest.raises(ValueError, match="train_dataset is empty; give at least one record"):
        _try(tmp_path, empty, perturber=EntityPerturber(exclude=["Ann Lee", "Bo Tran"]))


def test_a_paired_collator_over_seat_records_trains(tmp_path):
    tok = tokenizer(chat=True)
    collator = seat.PairedCollator(tok, EntityPerturber(exclude=["Ann Lee", "Bo Tran"]), use_chat_template=True)
    args = SFTConfig(output_dir=str(tmp_path), **dict(SFT_ARGS, max_steps=1, save_steps=100))
    trainer = SeatSFTTrainer(tiny_llama(tok), args, train_dataset=RECORDS, data_collator=collator,
                             processing_class=tok)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_a_set_up_refused_inside_sft_trainer_restores_the_model_forward(tmp_path):
    """SFTTrainer replaces model.forward (its fused LM head) before a later check of its own
    refuses the set-up: the model keeps neither the SEAT patch nor the new forward."""
    tok = tokenizer(chat=True)
    model = tiny_llama(tok)
    args = SFTConfig(output_dir=str(tmp_path), **dict(SFT_ARGS, router_aux_loss_coef=0.5))
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        SeatSFTTrainer(model, args, train_dataset=_rows(), processing_class=tok)
    assert handle_of(model) is None and "forward" not in vars(model)


def test_a_refused_set_up_on_a_patched_model_drops_the_optimizer_it_made(tmp_path):
    """A model patched beforehand stays patched after a refused set-up, without the
    optimizer that set-up made: the next trainer makes its own, with its own lr."""
    tok = tokenizer(chat=True)
    model = tiny_llama(tok)
    handle = seat.patch(model, seat.SeatConfig(density=0.2))
    args = dict(SFT_ARGS, max_steps=1, save_steps=100)
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        SeatSFTTrainer(model, SFTConfig(output_dir=str(tmp_path), **dict(args, router_aux_loss_coef=0.5)),
                       train_dataset=_rows(), processing_class=tok)
    assert handle_of(model) is handle and handle._optimizer is None
    trainer = SeatSFTTrainer(model, SFTConfig(output_dir=str(tmp_path), **dict(args, learning_rate=0.125)),
                             train_dataset=_rows(), processing_class=tok)
    trainer.train()
    assert trainer.state.log_history[0]["learning_rate"] == 0.125


def test_the_callers_config_is_not_changed_and_a_model_id_loads_as_in_sft_trainer(tmp_path, monkeypatch):
    """SFTTrainer writes into args.accelerator_config (an IterableDataset turns dispatch_batches
    off): on the trainer's copy only. A model id is loaded with args.trust_remote_code and
    the tokenizer at model_init_kwargs' revision, as SFTTrainer loads them."""
    tok = tokenizer(chat=True)
    tiny_llama(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    loads = []
    load_tokenizer = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **kw: loads.append(kw) or load_tokenizer(*a, **kw))
    config = SFTConfig(output_dir=str(tmp_path / "out"), **dict(SFT_ARGS, max_steps=1, save_steps=100,
                                                                 accelerator_config={"dispatch_batches": True},
                                                                 model_init_kwargs={"revision": "main"}))
    rows = datasets.Dataset.from_list(_rows()).to_iterable_dataset()
    trainer = SeatSFTTrainer(str(tmp_path / "base"), config, train_dataset=rows,
                             perturber=EntityPerturber(exclude=["Ann Lee", "Bo Tran"]))
    assert trainer.processing_class.pad_token == tok.pad_token  # kept without SFTConfig.pad_token
    assert not trainer.args.accelerator_config.dispatch_batches
    assert config.accelerator_config.dispatch_batches and config.dataset_kwargs is None
    assert loads == [{"revision": "main", "trust_remote_code": False}]


def test_sft_config_pad_token_sets_the_tokenizers_as_in_sft_trainer(tmp_path):
    tok = tokenizer(chat=True)
    assert tok.pad_token == "[PAD]"
    args = SFTConfig(output_dir=str(tmp_path), **dict(SFT_ARGS, pad_token="[EOS]"))
    SeatSFTTrainer(tiny_llama(tok), args, train_dataset=_rows(), processing_class=tok)
    assert tok.pad_token == "[EOS]"
