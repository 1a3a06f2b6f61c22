"""`seat` argument handling without training: every bad argument of `seat train` is
refused with exit code 2 and a message naming its flag, before the model is loaded and
before anything is written; --config files merge under the flags; the facts load alike
from every format; help, version and the delegated commands."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("yaml")

from _cli_helpers import TRAIN_FLAGS, run_cli, save_tiny_model, write_dataset, write_jsonl  # noqa: E402
from _trainer_helpers import RECORDS  # noqa: E402
from seat.cli import _facts, _options  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-args")
    return {"model": save_tiny_model(root / "model"), "facts": write_jsonl(root / "facts.jsonl"), "root": root}


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails the test: argument errors come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _argv(files, out, *extra, data=None):
    return ["train", "--model", files["model"], "--data", data or files["facts"], "--output-dir", out,
            *TRAIN_FLAGS, *extra]


def _refused(argv, flag: str, *fragments: str) -> str:
    code, _, err = run_cli(argv)
    assert code == 2, err
    assert f"error: argument {flag}" in err or (flag in err and "error:" in err), err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("extra, flag, fragment", [
    (["--density", "0"], "--density", "in (0, 1]"),
    (["--density", "1.5"], "--density", "got 1.5"),
    (["--lr", "-1"], "--lr", "must be > 0"),
    (["--lr", "nan"], "--lr", "finite"),
    (["--batch-size", "0"], "--batch-size", "must be > 0"),
    (["--epochs", "two"], "--epochs", "a number"),
    (["--kl-weight", "-0.5"], "--kl-weight", ">= 0"),
    (["--state-bits", "4"], "--state-bits", "invalid choice"),
    (["--mask", "magnitude", "--mask-encoding", "implicit"], "--mask-encoding", "implicit"),
    (["--update-in-backward", "--grad-accum", "2"], "--grad-accum", "--grad-accum 1"),
    (["--update-in-backward", "--max-grad-norm", "1"], "--max-grad-norm", "--max-grad-norm 0"),
    (["--lean", "--grad-accum", "2"], "--grad-accum", "set by --lean"),
    (["--targets", "all-linear", "*.q_proj"], "--targets", "cannot be mixed"),
    (["--prompt-format", "no field here"], "--prompt-format", "{question}"),
    (["--chat-template"], "--chat-template", "--no-chat-template"),
    (["--max-length", "4"], "--max-length", "record 1 (entity 'Ann Lee')"),
    (["--resume", "/nonexistent/checkpoint-3"], "--resume", "not a complete SeatTrainer checkpoint"),
])
def test_bad_option_is_refused_before_loading(files, tmp_path, no_model_load, extra, flag, fragment):
    out = tmp_path / "run"
    _refused(_argv(files, out, *extra), flag, fragment)
    assert not out.exists()


def test_targets_matching_nothing_are_refused_after_loading(files, tmp_path):
    """Which weights a pattern matches is known once the model is built: still exit 2,
    nothing written."""
    out = tmp_path / "run"
    _refused(_argv(files, out, "--targets", "*.nothing"), "--targets", "matches targets=['*.nothing']")
    assert not out.exists()


def test_damaged_weights_are_an_argument_error(files, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(files["model"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "run"
    _refused(_argv(files, out)[:2] + [damaged] + _argv(files, out)[3:], "--model", "do not load")
    assert not out.exists()


def test_max_length_counts_the_perturbed_copy(files, tmp_path, no_model_load):
    # a one-word entity is replaced by a two-word fictitious name: x~ is longer than x
    records = [{"question": "Where was Ann born ?", "answer": "Ann was born in Paris .", "entity": "Ann"}] * 4
    data = write_jsonl(tmp_path / "short.jsonl", records)
    err = _refused(_argv(files, tmp_path / "run", "--max-length", "1", data=data), "--max-length")
    length = int(err.split(" tokens long")[0].rsplit(" ", 1)[1])  # of x itself
    # x fits: refused before the model loads (not at the first batch that draws a long name, mid-run)
    _refused(_argv(files, tmp_path / "run", "--max-length", str(length), data=data), "--max-length",
             "perturbed copy x~", "raise --max-length")
    assert not (tmp_path / "run").exists()


def test_missing_required(files, tmp_path, no_model_load):
    code, _, err = run_cli(["train", "--data", str(files["facts"]), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "--model" in err and "required" in err


def test_cuda_without_gpu_is_refused(files, tmp_path, no_model_load):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    _refused(_argv(files, tmp_path / "run", "--device", "cuda"), "--device", "no CUDA GPU")


def _bad_facts(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name, text, fragments", [
    ("facts.jsonl", json.dumps(RECORDS[0]) + "\n{not json\n", ["facts.jsonl:2", "not valid JSON"]),
    ("facts.jsonl", json.dumps({"question": "Q Ann Lee ?", "entity": "Ann Lee"}) + "\n",
     ["facts.jsonl:1", "'answer'", "--answer-key"]),
    ("facts.jsonl", json.dumps({**RECORDS[0], "entity": "Zed Moe"}) + "\n", ["facts.jsonl:1", "'Zed Moe'",
                                                                              "mentioned in neither"]),
    ("facts.jsonl", json.dumps({**RECORDS[0], "answer": 7}) + "\n", ["facts.jsonl:1", "must be a str"]),
    ("facts.csv", "question,answer,entity\nWho is Ann Lee ?,A baker .,Ann Lee\nWhere is Bo Tran ?,,Bo Tran\n",
     ["facts.csv row 2 (line 3)", "'answer' is empty"]),
    ("facts.json", '["Who is Ann Lee ?"]', ["facts.json item 0", "is a str"]),
    ("facts.json", '{"data": []}', ["holds one JSON object (keys 'data')", "JSON array"]),
    ("facts.txt", "x", ["unknown file type '.txt'"]),
    ("facts.jsonl", "\n\n", ["holds no records"]),
    ("facts.csv", "question,answer,entity\r\n", ["holds no records"]),
    # a cell with an unquoted comma: a row longer than the header is refused, never read shifted
    ("facts.csv", "question,answer,entity\nWho is Ann Lee ?,Ann Lee, a baker .,Ann Lee\n",
     ["facts.csv row 1 (line 2) has 4 cells", "the header names 3", "quote"]),
    ("facts.csv", 'question,answer,entity\nWho is Ann Lee ?,"Ann Lee\nbakes .",Ann Lee\nWho is Bo ?,,Bo\n',
     ["facts.csv row 2 (line 4)", "'answer' is empty"]),
])
def test_bad_facts_name_the_record(files, tmp_path, no_model_load, name, text, fragments):
    path = _bad_facts(tmp_path, name, text)
    _refused(_argv(files, tmp_path / "run", data=path), "--data", *fragments)
    assert not (tmp_path / "run").exists()


def test_chat_message_questions(files, tmp_path, no_model_load):
    # a question may be chat messages, as seat.data.load_records allows: the entity is looked for in them
    chat = [{**r, "question": [{"role": "user", "content": r["question"]}]} for r in RECORDS]
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    assert _facts.load_facts(str(path)) == chat
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**chat[0], "entity": "Zed Moe"}])
    _refused(_argv(files, tmp_path / "run", data=bad), "--data", "'Zed Moe'", "mentioned in neither")
    # the tiny tokenizer has no chat template: refused before the model loads, not at the first batch
    _refused(_argv(files, tmp_path / "run", data=path), "--data", "record 1 (entity 'Ann Lee')", "chat template")
    assert not (tmp_path / "run").exists()


def test_missing_facts_file(files, tmp_path, no_model_load):
    _refused(_argv(files, tmp_path / "run", data=tmp_path / "nope.jsonl"), "--data", "does not exist")


def test_bad_model_folders(files, tmp_path, no_model_load):
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(["train", "--model", empty, "--data", files["facts"], "--output-dir", tmp_path / "o"], "--model",
             "no config.json")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(files["model"] / "config.json", weightless)
    _refused(["train", "--model", weightless, "--data", files["facts"], "--output-dir", tmp_path / "o"],
             "--model", "holds no weights")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_dir_that_cannot_be_created_is_refused(files, tmp_path, no_model_load):
    # /proc takes no new folders, even from root (whom os.access lets write anywhere)
    _refused(_argv(files, "/proc/seat-cli-test/run"), "--output-dir", "cannot be created")
    _refused(_argv(files, files["facts"] / "run"), "--output-dir", "not a writable folder")


def test_output_dir_with_other_files_is_refused_and_kept(files, tmp_path, no_model_load):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _refused(_argv(files, out), "--output-dir", "not a seat run", "notes.txt")
    _refused(_argv(files, out, "--resume", "auto"), "--output-dir", "not a seat run")
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused(_argv(files, a_file), "--output-dir", "is a file")


def test_earlier_run_needs_resume(files, tmp_path, no_model_load):
    out = tmp_path / "run"
    out.mkdir()
    (out / "seat_train_args.json").write_text("{}")
    (out / "seat_report.json").write_text("{}")
    _refused(_argv(files, out, "--resume", "never"), "--resume", "--resume auto to continue")
    # finished, and no checkpoint left to resume from: nothing is overwritten
    _refused(_argv(files, out), "--output-dir", "finished seat run")


# ----------------------------------------------------------------------------- --config

def _parse(argv):
    parser, own = __import__("seat.cli", fromlist=["build_parser"]).build_parser()
    return _options.resolve(parser.parse_args(["train", *map(str, argv)]))


def test_config_file_merges_under_the_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: m\ndata: d.jsonl\noutput_dir: o\ndensity: 0.1\nlr: 1e-3\ntargets: ['*.q_proj']\n"
                      "lean: true\nstate_bits: 32\nprogress: false\n")
    values, explicit = _parse(["--config", config, "--density", "0.3", "--progress"])
    assert values["density"] == 0.3 and values["lr"] == 1e-3 and values["targets"] == ["*.q_proj"]
    assert values["progress"] is True  # the flag wins over the file
    # --lean sets what neither the file nor the flags set; the file's state_bits wins
    assert (values["update_in_backward"], values["grad_dtype"], values["state_bits"]) == (True, "bfloat16", 32)
    assert values["max_grad_norm"] == 0.0 and values["config"] == str(config)
    assert {"density", "lr", "lean", "progress"} <= explicit
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"model": "m", "data": "d", "output_dir": "o", "max_steps": 7}))
    assert _parse(["--config", json_config])[0]["max_steps"] == 7
    # Notepad's "UTF-8 with BOM": the mark is not part of the first key
    for path in (json_config, config):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert _parse(["--config", json_config])[0]["max_steps"] == 7
    assert _parse(["--config", config])[0]["model"] == "m"


@pytest.mark.parametrize("content, fragments", [
    ("kl-weight: 0.5\n", ["unknown keys 'kl-weight'", "did you mean 'kl_weight'"]),
    ("densty: 0.5\nfoo: 1\n", ["'densty' (did you mean 'density'?)", "'foo'"]),
    ("density: 2\n", ["'density'", "in (0, 1]"]),
    ("reverse_kl: yes please\n", ["'reverse_kl'", "true or false"]),
    ("mask: [random]\n", ["'mask'", "single value"]),
    ("- density\n", ["must hold a mapping"]),
    ("density: [\n", ["not valid YAML"]),
])
def test_bad_config_files(files, tmp_path, no_model_load, content, fragments):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    _refused(_argv(files, tmp_path / "run", "--config", config), "--config", *fragments)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- facts formats

@pytest.mark.parametrize("kind, suffix", [("json", ".json"), ("csv", ".csv"), ("parquet", ".parquet"),
                                          ("disk", "")])
def test_every_format_reads_the_same_facts(tmp_path, kind, suffix):
    rename = {"question": "prompt", "entity": "person"}
    path = write_dataset(tmp_path / f"facts{suffix}", kind, rename=rename)
    records = _facts.load_facts(str(path), question_key="prompt", entity_key="person")
    assert records == RECORDS
    assert _facts.fingerprint(records) == _facts.fingerprint(_facts.load_facts(str(write_jsonl(tmp_path / "f.jsonl"))))


def test_csv_with_byte_order_mark_and_crlf_reads_the_same_facts(tmp_path):
    # what Excel's "CSV UTF-8" writes: a byte-order mark before the header, CRLF line ends
    path = write_dataset(tmp_path / "plain.csv", "csv")
    bom = tmp_path / "facts.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert _facts.load_facts(str(bom)) == RECORDS


def test_csv_cells_may_be_long(tmp_path):
    # longer than the csv module's default field limit (131072 characters)
    answer = "Ann Lee " + "bakes bread . " * 20000
    path = tmp_path / "facts.csv"
    path.write_text(f'question,answer,entity\nWho is Ann Lee ?,"{answer}",Ann Lee\n', encoding="utf-8")
    assert _facts.load_facts(str(path))[0]["answer"] == answer


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text("question,answer,entity\nWhen was Ann Lee born ?,1984,Ann Lee\n")
    assert _facts.load_facts(str(path))[0]["answer"] == "1984"  # not the int 1984 (refused as "not a str")
    path.write_text("question,answer,entity\nWhen was Ann Lee born ?,0042,Ann Lee\n")
    assert _facts.load_facts(str(path))[0]["answer"] == "0042"


# ----------------------------------------------------------------------------- help and delegation

def test_help_lists_every_command_and_option():
    code, out, _ = run_cli(["--help"])
    assert code == 0 and all(c in out for c in ("train", "merge", "eval", "memory", "info"))
    code, out, _ = run_cli(["train", "--help"])
    assert code == 0
    for o in _options.OPTIONS:
        assert o.flag in out, o.flag
    code, out, _ = run_cli(["--version"])
    from seat import __version__

    assert code == 0 and out.strip() == f"seat {__version__}"
    code, _, err = run_cli([])
    assert code == 2 and "usage: seat" in err


def test_memory_and_info_are_delegated(files):
    code, out, _ = run_cli(["memory", "--config", files["model"] / "config.json", "--device", "cpu", "--json"])
    assert code == 0 and json.loads(out)
    code, out, _ = run_cli(["info", "--json"])
    from seat import __version__

    assert code == 0 and __version__ in out and "backends" in json.loads(out)
    code, _, err = run_cli(["eval", "--model", files["model"]])
    assert code == 2 and "--questions" in err  # seat.evaluate's own parser


def test_python_dash_m_seat_runs_in_a_fresh_process():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "seat", "train", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and "--output-dir" in done.stdout
    done = subprocess.run([sys.executable, "-m", "seat", "train", "--density", "3"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "--density" in done.stderr
    done = subprocess.run([sys.executable, "-c", "import sys, seat.cli; seat.cli.build_parser(); "
                           "print([m for m in ('torch', 'transformers', 'datasets') if m in sys.modules])"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr  # `seat --help` and its parse errors stay fast


def _installed() -> bool:
    try:
        importlib.metadata.distribution("seat")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="seat is not pip-installed here (its console script comes with the install)")
def test_console_script():
    # pip puts the script beside the interpreter of the environment it installs into
    beside = Path(sys.executable).with_name("seat")
    script = str(beside) if beside.exists() else shutil.which("seat")
    assert script is not None, "seat is installed but its `seat` console script is neither beside python nor on PATH"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout


def test_the_guide_documents_every_flag():
    guide = (REPO / "docs" / "guides" / "cli.md").read_text(encoding="utf-8")
    parser, own = __import__("seat.cli", fromlist=["build_parser"]).build_parser()
    for command in own.values():
        for action in command._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in guide, flag
