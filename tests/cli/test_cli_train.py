"""`seat train` end to end on a tiny Llama saved to a folder: the delta, checkpoints and
report it writes; a run interrupted mid-way and resumed with --resume auto ends with the
uninterrupted run's delta bit for bit (and refuses to resume with other arguments or other
facts); a YAML config file with Parquet facts and the lean modes."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("yaml")

import seat  # noqa: E402
from _cli_helpers import TRAIN_FLAGS, load_model, run_cli, save_tiny_model, write_dataset, write_jsonl  # noqa: E402
from _trainer_helpers import RECORDS, tiny_llama, tokenizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from seat.trainer import SeatTrainer  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-train")
    return {"model": save_tiny_model(root / "model"), "facts": write_jsonl(root / "facts.jsonl"), "root": root}


def _argv(base, out, *extra):
    return ["train", "--model", base["model"], "--data", base["facts"], "--output-dir", out, *TRAIN_FLAGS, *extra]


def _train(argv, trainers: list | None = None):
    """run_cli(argv), keeping the SeatTrainer it built in `trainers`."""
    original = SeatTrainer.train

    def keep(self, *args, **kwargs):
        trainers.append(self)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        if trainers is not None:
            mp.setattr(SeatTrainer, "train", keep)
        return run_cli(argv)


@pytest.fixture(scope="module")
def full(base):
    out, trainers = base["root"] / "full", []
    code, stdout, stderr = _train(_argv(base, out), trainers)
    assert code == 0, stderr
    return {"out": out, "trainer": trainers[0], "stdout": stdout,
            "report": json.loads((out / "seat_report.json").read_text())}


def _delta_tensors(directory):
    return load_file(directory / "delta.safetensors")


def test_train_writes_delta_checkpoints_and_report(base, full):
    out, trainer, report = full["out"], full["trainer"], full["report"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "delta", "seat_report.json",
                                                      "seat_train_args.json"]
    assert (out / "checkpoint-2" / "seat_train_args.json").exists()
    assert report["steps"] == 4 and report["resumed"] is False and report["records"] == len(RECORDS)
    assert report["arguments"]["density"] == 0.2 and report["arguments"]["max_steps"] == 4
    assert report["arguments"]["data"] == str(base["facts"]) and report["arguments"]["max_grad_norm"] == 1.0
    assert set(report["versions"]) == {"seat", "torch", "transformers", "python"}
    assert report["versions"]["seat"] == seat.__version__
    entries = report["trained_entries"]
    assert entries["total"] == trainer.seat.num_trainable == sum(entries["per_weight"].values())
    assert set(entries["per_weight"]) == set(trainer.seat.targets)
    # logging_steps=1: the report's numbers are the per-step losses' last value and mean
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]
    assert report["loss"]["final"] == logged[-1]["loss"]
    assert math.isclose(report["loss"]["mean"], sum(e["loss"] for e in logged) / 4, rel_tol=1e-12)
    assert math.isclose(report["kl"]["mean"], sum(e["kl"] for e in logged) / 4, rel_tol=1e-12)
    assert report["loss"]["final"] < logged[0]["loss"]
    # the delta carries the trained model: a fresh base plus the delta equals it bit for bit
    fresh = load_model(base["model"])
    seat.load_delta(fresh, out / "delta")
    trained = dict(trainer.model.named_parameters())
    changed = 0
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trained[name]), name
        changed += not torch.equal(p, load_model(base["model"]).get_parameter(name)) if "q_proj" in name else 0
    assert changed > 0
    assert not [p for p in out.rglob(".*")]  # no temporary files left


def test_interrupted_run_resumes_to_the_same_delta(base, full, tmp_path):
    out = tmp_path / "run"
    argv = _argv(base, out)
    original = SeatTrainer.training_step

    def killed_at_step_4(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SeatTrainer, "training_step", killed_at_step_4)
        code, _, err = run_cli(argv)
    assert code == 130 and "--resume auto" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "seat_train_args.json"]
    # a kill while checkpoint-4 was being written: an incomplete folder, skipped
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "seat_run.json").write_text((out / "checkpoint-2" / "seat_run.json").read_text())

    code, _, err = run_cli([*argv, "--lr", "0.01"])
    assert code == 2 and "--lr: checkpoint 0.02, now 0.01" in err and "Traceback" not in err
    other_facts = write_jsonl(tmp_path / "other.jsonl", RECORDS[:3])
    code, _, err = run_cli([*argv, "--data", other_facts])
    assert code == 2 and "--data: the facts differ" in err and "(4 records then, 3 now)" in err
    code, _, err = run_cli([*argv, "--resume", "never"])
    assert code == 2 and "argument --resume" in err
    # the checkpoint folder itself as --output-dir: refused, not written into
    listing = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    code, _, err = run_cli(_argv(base, out / "checkpoint-2"))
    assert code == 2 and "is a checkpoint folder" in err and str(out) in err, err
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == listing
    assert not (out / "delta").exists()

    trainers = []
    code, _, err = _train(argv, trainers)
    assert code == 0, err
    report = json.loads((out / "seat_report.json").read_text())
    assert report["resumed"] is True and report["resumed_from"] == str(out / "checkpoint-2")
    assert report["steps"] == 4
    for key in ("loss", "ce", "kl"):  # steps 1-2 from the checkpoint's log, 3-4 trained again
        assert report[key] == full["report"][key], key
    expected = _delta_tensors(full["out"] / "delta")
    for directory in (out / "delta", out / "checkpoint-4" / "seat_delta"):
        got = _delta_tensors(directory)
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    assert (out / "checkpoint-4" / "seat_train_args.json").exists()


def test_resume_from_a_checkpoint_of_another_model_leaves_nothing(base, full, tmp_path):
    other = tmp_path / "other"
    tok = tokenizer()
    tiny_llama(tok, seed=1).save_pretrained(other)
    tok.save_pretrained(other)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--model", other, "--data", base["facts"], "--output-dir", out, *TRAIN_FLAGS,
                            "--resume", full["out"] / "checkpoint-2"])
    assert code == 2 and "argument --resume" in err and "Traceback" not in err, err
    assert not out.exists()  # the new folder it had begun is gone again
    # an --output-dir that existed (empty) stays, empty
    out.mkdir()
    code, _, err = run_cli(["train", "--model", other, "--data", base["facts"], "--output-dir", out, *TRAIN_FLAGS,
                            "--resume", full["out"] / "checkpoint-2"])
    assert code == 2 and os.listdir(out) == []
    # resuming an earlier run's folder with another model: its record of the arguments is kept as it was
    earlier = tmp_path / "earlier"
    shutil.copytree(full["out"], earlier)
    shutil.rmtree(earlier / "checkpoint-4")
    before = (earlier / "seat_train_args.json").read_bytes()
    code, _, err = run_cli(_argv(base, earlier) + ["--model", other])
    assert code == 2 and "argument --resume" in err, err
    assert (earlier / "seat_train_args.json").read_bytes() == before


def test_save_total_limit_keeps_a_complete_checkpoint_through_an_interrupt(base, tmp_path):
    from seat.cli import _rundir

    out = tmp_path / "run"
    argv = _argv(base, out, "--save-total-limit", "1", "--save-steps", "1", "--max-steps", "3")
    original = _rundir.write_args

    def killed_marking_checkpoint_2(directory, record):
        if directory.name == "checkpoint-2":
            raise KeyboardInterrupt
        return original(directory, record)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_rundir, "write_args", killed_marking_checkpoint_2)
        code, _, err = run_cli(argv)
    assert code == 130, err
    # checkpoint-1 (complete) is still there to resume from; checkpoint-2 lacks its marker
    assert _rundir.is_complete(out / "checkpoint-1", ours=True)
    code, _, err = run_cli(argv)
    assert code == 0, err
    assert json.loads((out / "seat_report.json").read_text())["resumed_from"] == str(out / "checkpoint-1")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]


def test_config_file_with_parquet_facts_and_lean_modes(base, full, tmp_path):
    pytest.importorskip("bitsandbytes")
    facts = write_dataset(tmp_path / "facts.parquet", "parquet", rename={"question": "prompt"})
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    flags = dict(zip(TRAIN_FLAGS[::2], TRAIN_FLAGS[1::2]))  # the value flags, plus --no-progress
    lines = [f"{flag[2:].replace('-', '_')}: '{value}'" for flag, value in flags.items() if flag != "--no-progress"]
    config.write_text("\n".join([f"model: {base['model']}", f"data: {facts}", f"output_dir: {out}",
                                 "question_key: prompt", "lean: true", "progress: false", *lines]) + "\n")
    trainers = []
    code, _, err = _train(["train", "--config", config, "--max-steps", "2"], trainers)
    assert code == 0, err
    report = json.loads((out / "seat_report.json").read_text())
    args = report["arguments"]
    assert args["config"] == str(config) and args["max_steps"] == 2 and args["density"] == 0.2
    assert (args["update_in_backward"], args["state_bits"], args["grad_dtype"], args["max_grad_norm"]) == \
        (True, 8, "bfloat16", 0.0)
    assert report["steps"] == 2 and report["data_sha256"] == full["report"]["data_sha256"]
    opt = trainers[0].seat._optimizer
    assert opt.update_in_backward and opt.state_bits == 8 and opt.grad_dtype == torch.bfloat16
    fresh = load_model(base["model"])
    seat.load_delta(fresh, out / "delta")
    for name, p in trainers[0].model.named_parameters():
        assert torch.equal(p, fresh.get_parameter(name)), name
