"""SeatTrainer end to end on a tiny Llama and a word-level tokenizer: training lowers CE
on the facts, logs ce and kl, keeps the collator's columns with the default
remove_unused_columns, checkpoints deltas, resumes bit-exactly, and never lets a
non-finite loss reach the weights."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seat  # noqa: E402
from _tokenizers import word_tokenizer  # noqa: E402
from _trainer_helpers import ARGS, RECORDS, assert_params_equal, make_trainer, trained_params  # noqa: E402
from seat.perturb import EntityPerturber  # noqa: E402
from seat.trainer import BATCH_KEYS  # noqa: E402
from seat.trainer_collator import evaluation_collator  # noqa: E402


def _ce(handle, collator):
    with torch.no_grad():
        return handle.loss(copy.deepcopy(collator)(RECORDS)).ce.item()


def test_training_lowers_ce_and_logs_ce_and_kl(tmp_path):
    trainer, model, collator = make_trainer(tmp_path, max_steps=20, save_steps=100, learning_rate=5e-2)
    before = _ce(trainer.seat, collator)
    trainer.train()
    after = _ce(trainer.seat, collator)
    assert after < before - 1.0, (before, after)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("ce" in h and "kl" in h and h["nonfinite_skipped"] == 0 for h in logged)
    assert abs(logged[0]["kl"]) < 1e-4 <= max(h["kl"] for h in logged)  # 0 before the first update
    # the loss is CE + KL (kl_weight 1), per optimizer step
    assert all(h["loss"] == pytest.approx(h["ce"] + h["kl"], abs=1e-5) for h in logged)


def test_zero_kl_weight_trains_and_logs_no_kl(tmp_path):
    trainer, model, collator = make_trainer(tmp_path, max_steps=4, save_steps=100,
                                            seat_config=seat.SeatConfig(density=0.2, kl_weight=0.0))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("ce" in h and "kl" not in h for h in logged)  # the KL is not computed
    assert all(h["ce"] > 0 and h["loss"] > 0 for h in logged)


def test_default_remove_unused_columns_keeps_the_collators_columns(tmp_path):
    """TrainingArguments' default remove_unused_columns=True keeps only the model's
    forward arguments: the records' question/answer/entity must survive it, and the run
    must be the one remove_unused_columns=False trains."""
    explicit, model_a, _ = make_trainer(tmp_path / "a", max_steps=2, save_steps=100)
    explicit.train()
    default, model_b, _ = make_trainer(tmp_path / "b", max_steps=2, save_steps=100, remove_unused_columns=True)
    assert default.args.remove_unused_columns
    default.train()
    assert_params_equal(model_b, trained_params(model_a))


@pytest.mark.parametrize("accumulation,records", [(2, RECORDS), (1, RECORDS * 2)], ids=["epoch-end", "mid-epoch"])
def test_checkpoints_are_deltas_and_resume_is_bit_exact(tmp_path, accumulation, records):
    """mid-epoch: the data loader has built the next batch (and drawn its names) when the
    checkpoint is written; resuming must continue with the draws training actually used."""
    options = dict(records=records, gradient_accumulation_steps=accumulation)
    trainer, model, _ = make_trainer(tmp_path / "a", **options)
    trainer.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "seat_delta" / "delta.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    assert json.loads((checkpoint / "seat_collator.json").read_text()) == {"step": 3 * accumulation}
    run = json.loads((checkpoint / "seat_run.json").read_text())
    assert run["seat_config"]["density"] == 0.2 and run["nonfinite"] == {"mode": "skip", "skipped": 0}
    uninterrupted = trained_params(model)

    resumed_trainer, resumed, _ = make_trainer(tmp_path / "a", **options)  # a fresh base model, same seeds
    resumed_trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_params_equal(resumed, uninterrupted)


@pytest.mark.parametrize("mask_encoding", ["implicit", "block16"])
def test_resume_is_bit_exact_with_compact_mask_encodings(tmp_path, mask_encoding):
    config = seat.SeatConfig(density=0.2, mask_encoding=mask_encoding)
    trainer, model, _ = make_trainer(tmp_path / "a", seat_config=config)
    trainer.train()
    uninterrupted = trained_params(model)
    resumed_trainer, resumed, _ = make_trainer(tmp_path / "a", seat_config=config)
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert_params_equal(resumed, uninterrupted)


# ---------------------------------------------------------------------- non-finite losses

class _Snapshots(transformers.TrainerCallback):
    """The trained weights after every optimizer step (index 0: before training)."""

    def __init__(self, model):
        self.model, self.after = model, [trained_params(model)]

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append(trained_params(self.model))


def _poison(trainer, calls):
    """Make the loss of the given handle.loss calls (0-based, training micro-batches) NaN,
    still attached to the graph: a backward would put NaN in every trained entry."""
    loss_fn, count = trainer.seat.loss, [0]

    def loss(batch, **kwargs):
        out = loss_fn(batch, **kwargs)
        if count[0] in calls:
            out.loss = out.loss + float("nan")
        count[0] += 1
        return out

    trainer.seat.loss = loss


@pytest.mark.parametrize("bad_micro_batch", [0, 1], ids=["first-micro-batch", "last-micro-batch"])
def test_a_nonfinite_loss_skips_its_whole_optimizer_step(tmp_path, bad_micro_batch):
    """Step 2 (micro-batches 2 and 3) has a NaN loss in one micro-batch: the step leaves
    weights and optimizer state as they were (the other micro-batch's gradient is not
    applied alone), later steps train, the count is logged and checkpointed, and no loss
    reads 0.0."""
    trainer, model, _ = make_trainer(tmp_path, max_steps=3, save_steps=2)
    snapshots = _Snapshots(model)
    trainer.add_callback(snapshots)
    _poison(trainer, {2 + bad_micro_batch})
    with pytest.warns(RuntimeWarning, match=rf"micro-batch {bad_micro_batch + 1} of 2 of optimizer step 2 is nan"):
        trainer.train()
    after = snapshots.after
    assert len(after) == 4
    assert any(not torch.equal(after[1][n], after[0][n]) for n in after[0])  # step 1 trained
    for name in after[0]:
        assert torch.equal(after[2][name], after[1][name]), name  # the skipped step changed nothing
        assert torch.isfinite(after[3][name]).all(), name
    assert any(not torch.equal(after[3][n], after[2][n]) for n in after[0])  # training went on
    q = model.model.layers[0].self_attn.q_proj.weight
    assert trainer.seat._optimizer.state[q]["step"] == 2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["nonfinite_skipped"] for h in logged] == [0, 1, 1]
    assert math.isnan(logged[1]["loss"]) and math.isnan(logged[1]["ce"])  # never a silent 0.0
    assert logged[0]["loss"] > 0 and logged[2]["loss"] > 0
    final = trainer.state.log_history[-1]
    assert final["nonfinite_skipped"] == 1
    assert final["train_loss"] == pytest.approx((logged[0]["loss"] + logged[2]["loss"]) / 2)
    run = json.loads((tmp_path / "checkpoint-2" / "seat_run.json").read_text())
    assert run["nonfinite"] == {"mode": "skip", "skipped": 1}
    # a resume after the skipped step continues the same run, with its count
    resumed_trainer, resumed, _ = make_trainer(tmp_path, max_steps=3, save_steps=2)
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed_trainer.nonfinite_skipped == 1
    assert_params_equal(resumed, after[3])


def test_nonfinite_raise_stops_before_the_step_and_names_it(tmp_path):
    trainer, model, _ = make_trainer(tmp_path, max_steps=3, save_steps=100, trainer_kwargs=dict(nonfinite="raise"))
    snapshots = _Snapshots(model)
    trainer.add_callback(snapshots)
    _poison(trainer, {3})
    with pytest.raises(RuntimeError, match=r"micro-batch 2 of 2 of optimizer step 2 is nan .*nonfinite='raise'"):
        trainer.train()
    assert len(snapshots.after) == 2
    assert_params_equal(model, snapshots.after[1])  # the weights after step 1
    opt = trainer.seat._optimizer
    assert all(not g.any() for g in opt._grads.values())  # micro-batch 1's gradient is dropped
    assert not list(tmp_path.glob("checkpoint-*"))


def test_nonfinite_must_be_skip_or_raise(tmp_path):
    with pytest.raises(ValueError, match="nonfinite must be 'skip'.* or 'raise'.*got 'ignore'"):
        make_trainer(tmp_path, trainer_kwargs=dict(nonfinite="ignore"))


# ---------------------------------------------------------------------- refused set-ups

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
    assert seat.patching.handle_of(model) is None  # the refused trainer left the model unpatched


def test_a_second_trainer_on_the_same_model_takes_its_optimizer_hyperparameters_or_refuses(tmp_path):
    """The handle's optimizer is made once; a second trainer on the model trains with it.
    Its LR scheduler starts from the optimizer's initial_lr, so TrainingArguments with
    another lr (or betas, eps, weight decay) would be ignored: they are refused."""
    first, model, collator = make_trainer(tmp_path / "a", max_steps=1, save_steps=100)
    first.train()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "b"), **{**ARGS, "max_steps": 1,
                                                                             "learning_rate": 0.5, "adam_beta2": 0.9})
    with pytest.raises(ValueError, match=r"learning_rate=0.5 \(the optimizer has 0.02\), adam_beta2=0.9 "
                                         r"\(the optimizer has 0.999\): set them .*handle.unpatch\(\)"):
        seat.SeatTrainer(model, args, train_dataset=RECORDS, data_collator=collator)
    assert seat.patching.handle_of(model) is first.seat  # a refused trainer leaves the patch it found
    same = transformers.TrainingArguments(output_dir=str(tmp_path / "c"), **{**ARGS, "max_steps": 1})
    second = seat.SeatTrainer(model, same, train_dataset=RECORDS, data_collator=collator)
    second.train()
    assert [h["learning_rate"] for h in second.state.log_history if "loss" in h] == [ARGS["learning_rate"]]
    first.seat.unpatch()  # keeps the trained weights; a new trainer patches anew with its own optimizer
    third = seat.SeatTrainer(model, args, train_dataset=RECORDS, data_collator=collator,
                             seat_config=seat.SeatConfig(density=0.2))
    third.train()
    assert [h["learning_rate"] for h in third.state.log_history if "loss" in h] == [0.5]


def test_evaluation_draws_from_its_own_collator_so_a_resume_stays_bit_exact(tmp_path):
    """Evaluation during training perturbs the eval rows with a copy of the collator at draw
    0: the training collator's counter does not move, a resume from a checkpoint written
    after an evaluation continues bit-exactly, and two evaluations of one model are equal."""
    options = dict(eval_strategy="steps", eval_steps=3, trainer_kwargs=dict(eval_dataset=RECORDS[:3]))
    trainer, model, collator = make_trainer(tmp_path / "a", **options)
    trainer.train()
    assert len([h for h in trainer.state.log_history if "eval_loss" in h]) == 2
    assert collator.step == 12  # 6 steps of 2 micro-batches: evaluation drew none of its names
    uninterrupted = trained_params(model)
    resumed_trainer, resumed, _ = make_trainer(tmp_path / "a", **options)
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert_params_equal(resumed, uninterrupted)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"] and math.isfinite(first["eval_loss"])


def test_evaluation_normalizes_each_batch_by_its_own_counts(tmp_path):
    """The eval loss is the mean over eval batches of handle.loss of each batch alone (its
    own CE and KL counts), also after training: never the last training step's KL count."""
    trainer, model, _ = make_trainer(tmp_path, max_steps=2, save_steps=100, per_device_eval_batch_size=1,
                                     trainer_kwargs=dict(eval_dataset=RECORDS))
    trainer.train()
    got = trainer.evaluate()["eval_loss"]
    collator = evaluation_collator(trainer.data_collator)
    model.eval()
    with torch.no_grad():
        losses = [trainer.seat.loss({k: v for k, v in collator([r]).items() if k in BATCH_KEYS}) for r in RECORDS]
    assert all(out.kl > 0 for out in losses)  # the KL term counts
    assert got == pytest.approx(sum(float(out.loss) for out in losses) / len(losses), rel=1e-5)
