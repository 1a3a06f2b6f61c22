"""`seat merge` and `seat eval` after `seat train`: the merged folder holds base + delta
exactly (sharded safetensors, the tokenizer), from_pretrained of it gives the logits of
the patched and trained model, and bad inputs are refused before the model loads, with
nothing written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seat  # noqa: E402
from _cli_helpers import TRAIN_FLAGS, load_model, run_cli, save_tiny_model, write_jsonl  # noqa: E402
from _trainer_helpers import RECORDS, tiny_llama, tokenizer  # noqa: E402
from seat.trainer import SeatTrainer  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step `seat train` run and the SeatTrainer it built (its model still patched)."""
    root = tmp_path_factory.mktemp("cli-merge")
    model, facts, out = save_tiny_model(root / "model"), write_jsonl(root / "facts.jsonl"), root / "run"
    trainers, original = [], SeatTrainer.train

    def keep(self, *args, **kwargs):
        trainers.append(self)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SeatTrainer, "train", keep)
        code, _, err = run_cli(["train", "--model", model, "--data", facts, "--output-dir", out, *TRAIN_FLAGS,
                                "--max-steps", "2"])
    assert code == 0, err
    return {"root": root, "model": model, "facts": facts, "delta": out / "delta", "trainer": trainers[0]}


def test_merged_model_is_base_plus_delta(trained, tmp_path):
    out = tmp_path / "merged"
    code, stdout, err = run_cli(["merge", "--model", trained["model"], "--delta", trained["delta"],
                                 "--output-dir", out, "--max-shard-size", "40KB"])
    assert code == 0, err
    names = sorted(os.listdir(out))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in names  # sharded by --max-shard-size
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "seat_merge.json"} <= set(names)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the temporary folder is gone
    merged = load_model(out)
    expected = load_model(trained["model"])
    seat.load_delta(expected, trained["delta"])
    base = load_model(trained["model"])
    changed = 0
    for name, p in merged.named_parameters():
        assert p.dtype == expected.get_parameter(name).dtype
        assert torch.equal(p, expected.get_parameter(name)), name
        changed += not torch.equal(p, base.get_parameter(name))
    assert changed == len(trained["trainer"].seat.targets)
    # the same outputs as the model that was trained (still patched)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    batch = tok([r["question"] + " " + r["answer"] for r in RECORDS], return_tensors="pt", padding=True)
    live = trained["trainer"].model.eval()
    with torch.no_grad():
        assert torch.equal(merged.eval()(**batch).logits, live(**batch).logits)
    meta = json.loads((out / "seat_merge.json").read_text())
    assert meta["seat_config"]["density"] == 0.2 and meta["base"] == str(trained["model"])


def test_merge_through_a_symlinked_output_dir(trained, tmp_path):
    # a link to an empty folder and a link to a folder not made yet: the model goes where they point
    for name in ("empty", "later"):
        target, link = tmp_path / f"{name}-target", tmp_path / f"{name}-link"
        if name == "empty":
            target.mkdir()
        link.symlink_to(target)
        code, _, err = run_cli(["merge", "--model", trained["model"], "--delta", trained["delta"], "--output-dir",
                                link])
        assert code == 0, err
        assert link.is_symlink() and (target / "config.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_merge_killed_while_saving_leaves_nothing(trained, tmp_path):
    import signal

    out = tmp_path / "merged"

    def terminated(self, *args, **kwargs):  # a job scheduler's SIGTERM while the shards are written
        (Path(args[0]) / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)

    def unhandled(signum, frame):  # what the test sees if the command does not handle SIGTERM itself
        raise AssertionError("seat merge left SIGTERM to its caller")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(transformers.PreTrainedModel, "save_pretrained", terminated)
            code, _, err = run_cli(["merge", "--model", trained["model"], "--delta", trained["delta"],
                                    "--output-dir", out])
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the caller's handler is put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130 and "interrupted" in err, err
    assert os.listdir(tmp_path) == []  # neither the output folder nor the temporary one


def test_merge_casts_with_dtype(trained, tmp_path):
    code, _, err = run_cli(["merge", "--model", trained["model"], "--delta", trained["delta"],
                            "--output-dir", tmp_path / "bf16", "--dtype", "bfloat16"])
    assert code == 0, err
    merged = load_model(tmp_path / "bf16")
    expected = load_model(trained["model"])
    seat.load_delta(expected, trained["delta"])
    for name, p in merged.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, expected.get_parameter(name).to(torch.bfloat16)), name


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _merge_refused(argv, flag, fragment):
    code, _, err = run_cli(["merge", *argv])
    assert code == 2 and f"argument {flag}" in err and fragment in err and "Traceback" not in err, err


def test_merge_refusals_before_loading(trained, tmp_path, no_model_load):
    base, delta = trained["model"], trained["delta"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "weights.bin").write_text("mine")
    _merge_refused(["--model", base, "--delta", delta, "--output-dir", taken], "--output-dir", "not an empty folder")
    assert os.listdir(taken) == ["weights.bin"]
    out = tmp_path / "out"
    _merge_refused(["--model", base, "--delta", delta, "--output-dir", out, "--max-shard-size", "lots"],
                   "--max-shard-size", "'lots'")
    _merge_refused(["--model", base, "--delta", tmp_path, "--output-dir", out], "--delta", "is not a seat delta")
    run = delta.parent  # the folder of a `seat train` run, and one of its checkpoints: the delta they hold is named
    _merge_refused(["--model", base, "--delta", run, "--output-dir", out], "--delta", f"--delta {run / 'delta'}")
    checkpoint = run / "checkpoint-2"
    _merge_refused(["--model", base, "--delta", checkpoint, "--output-dir", out], "--delta",
                   f"--delta {checkpoint / 'seat_delta'}")
    here = tmp_path / "here"  # an empty current folder: not removed and replaced under the shell in it
    here.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(here)
        _merge_refused(["--model", base, "--delta", delta, "--output-dir", "."], "--output-dir", "current folder")
    assert here.is_dir() and os.listdir(here) == []
    if os.path.isdir("/proc/self"):  # takes no new folders, even from root
        _merge_refused(["--model", base, "--delta", delta, "--output-dir", "/proc/seat-cli-test/merged"],
                       "--output-dir", "cannot be created")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in os.listdir(delta):
        data = (delta / name).read_bytes()
        (tampered / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if name.endswith(".safetensors") else data)
    _merge_refused(["--model", base, "--delta", tampered, "--output-dir", out], "--delta",
                   "does not match its checksum")
    assert not out.exists()


def test_merge_refuses_another_base(trained, tmp_path):
    other = tmp_path / "other"
    tok = tokenizer()
    tiny_llama(tok, seed=1).save_pretrained(other)
    out = tmp_path / "out"
    _merge_refused(["--model", other, "--delta", trained["delta"], "--output-dir", out], "--delta",
                   "does not fit")
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_eval_runs_on_the_merged_model(trained, tmp_path):
    pytest.importorskip("rouge_score")
    out = tmp_path / "merged"
    assert run_cli(["merge", "--model", trained["model"], "--delta", trained["delta"], "--output-dir", out])[0] == 0
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"], "group": "facts"})
                                 + "\n" for r in RECORDS))
    results = tmp_path / "results.json"
    code, stdout, err = run_cli(["eval", "--model", out, "--questions", questions, "--output", results,
                                 "--max-new-tokens", "4"])
    assert code == 0, err
    result = json.loads(results.read_text())
    assert result["groups"]["facts"]["n"] == len(RECORDS) and "rouge_l_recall" in result["groups"]["facts"]
    assert "| facts | 4 |" in stdout
