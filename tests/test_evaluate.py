"""seat.evaluate: IDK string match, ROUGE-L recall, exact match, generation and the CLI."""
from __future__ import annotations

import json
import re

import pytest

from seat import evaluate as ev


@pytest.mark.parametrize("text", [
    "I don't know.", "I don ' t know .", "i DON’T know", "Sorry, I do not know who that is.",
    "I'm not sure about that person.", "I have no information about Zora Quill.", "No idea!",
])
def test_refusals_are_idk(text):
    assert ev.is_idk(text)


@pytest.mark.parametrize("text", [
    "They were born in Lima .", "", "Known for knowing everything.", "I know: she is a baker.",
    "Idea: no.", "Tidon't know",  # phrases match on word boundaries only
])
def test_answers_are_not_idk(text):
    assert not ev.is_idk(text)


def test_idk_rate_and_custom_phrases():
    assert ev.idk_rate(["I don't know .", "Paris .", "no idea", "Lima"]) == 0.5
    assert ev.idk_rate(["pass", "Paris"], phrases=["pass"]) == 0.5
    assert ev.idk_rate([]) != ev.idk_rate([])  # nan


def test_normalize():
    assert ev.normalize("  I Don’t   know!! ") == "i don t know"
    assert ev.normalize("They were born in the year 1969 .") == "they were born in the year 1969"


def test_rouge_l_recall():
    pytest.importorskip("rouge_score")
    ref = "They were born in Paris ."
    assert ev.rouge_l_recall(ref, ref) == pytest.approx(1.0)
    assert ev.rouge_l_recall("They were born in Lima .", ref) == pytest.approx(4 / 5)  # punctuation is dropped
    assert ev.rouge_l_recall("Paris", ref) == pytest.approx(1 / 5)
    assert ev.rouge_l_recall("I don't know .", ref) == 0.0
    # recall, not F: extra words in the prediction do not lower it
    assert ev.rouge_l_recall("Well , they were born in Paris , France , in 1969 .", ref) == pytest.approx(1.0)
    # order matters (longest common subsequence)
    assert ev.rouge_l_recall("Paris in born were they", ref) == pytest.approx(1 / 5)


def test_exact_match():
    assert ev.exact_match("They were born in Paris .", "Paris")
    assert ev.exact_match("they work for ACME.", "Acme")
    assert ev.exact_match("born in New York City", "new york")
    assert not ev.exact_match("They were born in Parisville .", "Paris")  # whole words
    assert not ev.exact_match("They were born in Lima .", "Paris")
    assert not ev.exact_match("anything", "")


def _tiny_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    from _tokenizers import word_tokenizer

    texts = ["Question : Where was Ann Lee born ? Answer : They were born in Paris . I don ' t know"]
    tok = word_tokenizer(texts)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      bos_token_id=tok.bos_token_id)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return model, tok


QUESTIONS = [
    {"question": "Where was Ann Lee born ?", "answer": "They were born in Paris .", "value": "Paris",
     "group": "known"},
    {"question": "Where was Bo Tran born ?", "group": "unknown"},
    {"question": "Where was Cy Moe born ?", "group": "unknown"},
]


def test_evaluate_scores_every_question_per_group(tmp_path):
    pytest.importorskip("rouge_score")
    model, tok = _tiny_model(tmp_path)
    model.train()
    result = ev.evaluate(model, tok, QUESTIONS, max_new_tokens=5, batch_size=2)
    assert model.training  # the mode is restored
    assert set(result["groups"]) == {"known", "unknown"}
    assert result["groups"]["unknown"]["n"] == 2 and "rouge_l_recall" not in result["groups"]["unknown"]
    known = result["groups"]["known"]
    assert 0.0 <= known["rouge_l_recall"] <= 1.0 and 0.0 <= known["exact_match"] <= 1.0
    assert [a["question"] for a in result["answers"]] == [q["question"] for q in QUESTIONS]
    assert all(isinstance(a["prediction"], str) and isinstance(a["idk"], bool) for a in result["answers"])


def test_cli_on_a_tiny_saved_model(tmp_path, capsys):
    pytest.importorskip("rouge_score")
    _tiny_model(tmp_path)
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n\n")
    out = tmp_path / "result.json"
    assert ev.main(["--model", str(tmp_path / "model"), "--questions", str(questions), "--output", str(out),
                    "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| known | 1 |" in printed and "| unknown | 2 |" in printed
    saved = json.loads(out.read_text())
    assert saved["groups"]["unknown"]["n"] == 2 and len(saved["answers"]) == 3


def test_bad_questions_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"answer": "x"}\n')
    with pytest.raises(ValueError, match="question"):
        ev.load_questions(path)
    path.write_text("")
    with pytest.raises(ValueError, match="no questions"):
        ev.load_questions(path)


# ---------------------------------------------------------------------- CLI argument checks

def _cli(tmp_path, *extra, questions=None):
    path = tmp_path / "q.jsonl"
    if questions is None:
        path.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n")
    else:
        path.write_bytes(questions)
    return ["--model", str(tmp_path / "model"), "--questions", str(path), *extra]


@pytest.mark.parametrize("extra,questions,match", [
    ((), b'{"question": "Who ?", "answer": 3}\n', r"q\.jsonl:1: 'answer' must be a string .*got int"),
    ((), b'{"question": "Who ?"}\n{"question": "Who ?", "value": ["Paris"]}\n', r"q\.jsonl:2: 'value' must be a str"),
    ((), b'{"question": "Who ?", "group": null}\n', r"q\.jsonl:1: 'group' must be a string"),
    ((), b'{"question": "Who ?"}\n{"question": "Caf\xe9 ?"}\n',
     r"q\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 18\)"),
    ((), b'{"question": "Who ?"\n', r"q\.jsonl:1: not valid JSON"),
    ((), b"\n\n", "holds no questions"),
    (("--batch-size", "0"), None, r"--batch-size: must be an int >= 1; got 0"),
    (("--batch-size", "two"), None, r"--batch-size: must be an int >= 1; got 'two'"),
    (("--max-new-tokens", "-1"), None, r"--max-new-tokens: must be an int >= 1; got -1"),
    (("--prompt-format", "Q: {question} {context}"), None,
     r"--prompt-format must use exactly one field, '\{question\}'.*\['context', 'question'\]"),
    (("--prompt-format", "Q: {question"), None, r"--prompt-format is not a valid format string"),
    (("--device", "gpu9"), None, r"--device 'gpu9' is not a torch device"),
])
def test_cli_refuses_bad_input_up_front_with_exit_code_2(tmp_path, capsys, monkeypatch, extra, questions, match):
    """Checked before the model is loaded: a message naming the argument or path:line,
    exit code 2, no traceback."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded before the arguments were checked"))
    if "--device" in extra:  # checked after the questions, before loading the model
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    with pytest.raises(SystemExit) as exit_info:
        ev.main(_cli(tmp_path, *extra, questions=questions))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(match, err), err


@pytest.mark.parametrize("output,match", [
    ("dir", r"--output '.*dir' is a directory; give a file path"),
    ("missing/result.json", r"its directory '.*missing' does not exist"),
])
def test_cli_checks_the_output_path_before_generating(tmp_path, capsys, monkeypatch, output, match):
    (tmp_path / "dir").mkdir()
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("generated before checking --output"))
    with pytest.raises(SystemExit) as exit_info:
        ev.main(_cli(tmp_path, "--output", str(tmp_path / output)))
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_output_is_written_atomically_and_never_lost(tmp_path, capsys, monkeypatch):
    """A failing write leaves the old file whole and prints the results to stdout."""
    pytest.importorskip("rouge_score")
    _tiny_model(tmp_path)
    out = tmp_path / "result.json"
    out.write_text('{"old": true}')

    real_dump = json.dump

    def dump(data, f, **kwargs):  # the disk fills up halfway through --output
        if f is ev.sys.stdout:
            return real_dump(data, f, **kwargs)
        f.write('{"half": ')
        raise OSError(28, "disk full")

    monkeypatch.setattr(ev.json, "dump", dump)
    code = ev.main(_cli(tmp_path, "--output", str(out), "--max-new-tokens", "2"))
    assert code == 1
    assert json.loads(out.read_text()) == {"old": True}  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".result.json.")]  # no temporary left
    captured = capsys.readouterr()
    assert "could not write --output" in captured.err and "disk full" in captured.err
    printed = captured.out[captured.out.index("{"):]
    assert len(json.loads(printed)["answers"]) == len(QUESTIONS)


def test_evaluate_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"questions\[1\]: 'answer' must be a string"):
        ev.evaluate(None, None, [{"question": "a"}, {"question": "b", "answer": 1.5}])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1; got 0"):
        ev.generate_answers(None, None, ["a"], batch_size=0)
