"""The architecture sweep on a representative subset (benchmarks/architecture_sweep.py runs
every causal LM type transformers ships): the types whose decoder is not at
base_model (Llama 4, Mllama), whose head takes a narrower input than the hidden state
(Electra, RemBERT), whose vocabularies differ (Inkling2), mixture-of-experts models
with fused 3-D experts, an encoder-decoder's decoder (BART: cross-attention no text
forward reaches), and plain ones. Plus the probe's behaviour on crafted models."""
from __future__ import annotations

import pytest
import torch

import seat
from _arch_sweep import build_tiny, check_architecture
from _models import paired_batch, tiny_model
from seat.patching import handle_of

pytest.importorskip("transformers")

PASS = ["llama", "gpt2", "gemma2", "bart", "llama4_text", "llama4", "mllama", "inkling2_text", "mixtral", "qwen2_moe",
        "qwen3_moe", "deepseek_v3", "gpt_oss"]
MOE = {"llama4_text", "llama4", "inkling2_text", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"}
# type -> what the refusal must say besides the class name
REFUSED = {"electra": "width 64 but the output head takes 32", "rembert": "width 64 but the output head takes 48",
           "bert": "logits are not lm_head"}


def _known(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


@pytest.mark.parametrize("model_type", PASS)
def test_architecture_trains_only_its_masks_and_reports_the_rest(model_type):
    if not _known(model_type):
        pytest.skip(f"this transformers has no {model_type}")
    result = check_architecture(model_type)
    assert result.status == "pass", result.reason
    assert result.targets > 0 and result.trained_entries > 0 and not result.untrained_targets
    assert (result.expert_targets > 0) == (model_type in MOE)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_architecture_is_refused_with_its_reason(model_type):
    result = check_architecture(model_type)
    assert result.status == "refused", result.reason
    assert result.reason.startswith("ValueError: seat.patch cannot use " + result.model_class)
    assert REFUSED[model_type] in result.reason


@pytest.mark.parametrize("model_type", ["llama4_text", "mllama"])
def test_the_loss_runs_the_decoder_the_probe_validated(model_type):
    """base_model is the model itself here (base_model_prefix names a missing attribute):
    the CE of seat's loss equals the model's own loss only through the inner decoder."""
    model = build_tiny(model_type)
    batch = paired_batch()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    handle = seat.patch(model, density=0.1)
    assert handle.decoder is model.model and model.base_model is model
    torch.testing.assert_close(handle.loss(batch).ce, expected, rtol=1e-4, atol=1e-5)


def test_weights_no_gradient_reaches_are_reported_not_targeted():
    model = build_tiny("bart")  # BartForCausalLM: decoder layers with cross-attention, run without an encoder
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    handle = seat.patch(model, density=0.1)
    skipped = handle.targeting_report().skipped
    cross = [n for n in skipped if ".encoder_attn." in n and n.endswith("proj.weight")]
    assert len(cross) == 8 and all(skipped[n].startswith("no gradient reaches it") for n in cross)
    assert not any(".encoder_attn." in n for n in handle.targets)
    assert any(".self_attn." in n for n in handle.targets)
    handle.unpatch()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_probe_ids_stay_inside_the_input_embedding():
    model = tiny_model()  # 97 input rows
    model.lm_head = torch.nn.Linear(32, 160, bias=False)  # a head over more tokens than the input table
    handle = seat.patch(model, density=0.1)
    assert torch.isfinite(handle.loss(paired_batch()).loss)


@pytest.mark.parametrize("where", ["model", "decoder"])
def test_a_probe_that_crashes_is_a_value_error_and_leaves_the_model_as_it_was(where, monkeypatch):
    model = tiny_model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    target = model if where == "model" else model.model

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the forward")

    monkeypatch.setattr(target, "forward", broken)
    with pytest.raises(ValueError, match=r"seat.patch cannot use LlamaForCausalLM: .*RuntimeError: boom"):
        seat.patch(model, density=0.1)
    assert handle_of(model) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_the_benchmark_script_writes_its_results(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "architecture_sweep.py"
    proc = subprocess.run([sys.executable, str(script), "--types", "gpt2", "electra", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "architecture-sweep.json").read_text())
    assert data["counts"] == {"pass": 1, "refused": 1, "fail": 0, "unbuilt": 0}
    assert "| electra | ElectraForCausalLM | refused |" in (tmp_path / "architecture-sweep.md").read_text()
