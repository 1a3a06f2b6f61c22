"""seat.memory on several GPUs (Options.gpus / strategy, seat/memory/_multi_gpu.py): one GPU
is what it was, dp adds its buckets, fsdp shards as FSDP2 does (checked by hand on a tiny
config), the bytes each GPU sends, and the arguments it refuses."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

import seat.memory as sm
from seat.memory import _multi_gpu as mg
from seat.memory.__main__ import main as cli_main

DATA = Path(__file__).resolve().parent / "data"

# H 64, I 128, 2 layers, 4 heads of 16 (q_dim 64), 2 kv heads (kv_dim 32), vocab 256, untied:
# per layer q 64x64, k 32x64, v 32x64, o 64x64, gate 128x64, up 128x64, down 64x128
# (36864 target elements) + two norms of 64; root: embeddings and lm_head 256x64, norm 64
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}
LAYER, ROOT, TARGETS = 36864 + 128, 2 * 16384 + 64, 2 * 36864


def tiny(**kw):
    return sm.estimate(TINY, density=0.25, seq=32, batch=1, gradient_checkpointing=True, **kw)


def run_cli(argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(argv) == 0
    return buf.getvalue()


# ---------------------------------------------------------------------- one GPU: unchanged
SNAPSHOT = json.loads((DATA / "single_gpu_outputs.json").read_text())


def _subset(old, new, path="") -> None:
    """Every key of `old` is in `new` with the same value (new keys may be added)."""
    if isinstance(old, dict):
        for key, value in old.items():
            assert key in new, f"{path}/{key} is gone"
            _subset(value, new[key], f"{path}/{key}")
    else:
        assert old == new, f"{path}: {old!r} -> {new!r}"


@pytest.mark.parametrize("case", SNAPSHOT["cases"], ids=lambda c: " ".join(c["argv"][1:4]))
@pytest.mark.parametrize("extra", [[], ["--gpus", "1"], ["--gpus", "1", "--strategy", "fsdp"]],
                         ids=["default", "gpus-1", "gpus-1-fsdp"])
def test_one_gpu_prints_what_it_printed_before(case, extra):
    """The outputs of the CLI before --gpus existed (tests/memory/data, written at commit
    691b0bb): reports and tables to the character; JSON gains keys only."""
    out = run_cli(case["argv"] + extra)
    if "--json" in case["argv"]:
        new = json.loads(out)
        _subset(json.loads(case["stdout"]), new)
        assert new["communication"]["sent_bytes_per_gpu"] == 0 and new["options"]["gpus"] == 1
    else:
        assert out == case["stdout"]


def test_one_gpu_ignores_the_strategy():
    for kw in ({}, dict(method="full"), dict(optimizer_in_backward=True, optimizer_bits=8)):
        a, b = tiny(**kw), tiny(gpus=1, strategy="fsdp", **kw)
        assert (a.state, a.phases, a.peak) == (b.state, b.phases, b.peak)
        assert a.communication.collectives == {} and a.communication.sent == a.communication.payload == 0


# ---------------------------------------------------------------------- dp
def test_dp_peak_is_one_gpus_plus_the_bucket_transient():
    kw = dict(density=0.05, seq=1024, batch=1, gradient_checkpointing=True)
    one = sm.estimate("Llama-3-8B", **kw)
    eight = sm.estimate("Llama-3-8B", gpus=8, **kw)
    compact = 4 * one.trainable  # fp32 compact gradients: 1.4 GB, far above a bucket
    assert eight.state == one.state
    assert one.peak_phase == eight.peak_phase == "backward"
    assert eight.phases["backward"] == {**one.phases["backward"],
                                        "all-reduce buckets (two flat copies)": 2 * 25 * 2**20}
    assert eight.peak == one.peak + 2 * 25 * 2**20 and compact > 25 * 2**20
    assert {k: v for k, v in eight.phases.items() if k != "backward"} == \
        {k: v for k, v in one.phases.items() if k != "backward"}
    # the update in backward all-reduces each compact gradient in place: nothing more
    lean = dict(kw, optimizer_in_backward=True, grad_dtype="bfloat16")
    assert sm.estimate("Llama-3-8B", gpus=8, **lean).peak == sm.estimate("Llama-3-8B", **lean).peak


def test_dp_by_hand_on_the_tiny_config():
    # nnz at density 0.25: q 1024, k 512, v 512, o 1024, gate, up, down 2048 each: 9216 per layer
    one, dp = tiny(), tiny(gpus=4)
    assert dp.trainable == 18432
    # buckets: two copies of min(bucket, 4 B x 18432 = 73728 B)
    assert dp.phases["backward"]["all-reduce buckets (two flat copies)"] == 2 * 73728
    assert tiny(gpus=4, bucket_bytes=10000).phases["backward"]["all-reduce buckets (two flat copies)"] == 20000
    assert tiny(gpus=4, grad_dtype="bfloat16").phases["backward"]["all-reduce buckets (two flat copies)"] == 2 * 36864
    assert dp.peak == one.peak + 2 * 73728
    c = dp.communication
    # ring all-reduce: 2 (N - 1) chunks of P / N
    assert c.collectives == {"all-reduce of the compact gradients (buckets)": (73728, 2 * 3 * 18432)}
    assert (c.payload, c.sent) == (73728, 110592)
    assert c.ddp_dense == (2 * TARGETS, 2 * 3 * 2 * TARGETS // 4)  # bf16 dense gradients
    assert c.fsdp_dense[1] == 381792  # see test_fsdp_bytes_sent_by_hand
    in_bwd = tiny(gpus=4, optimizer_in_backward=True, grad_dtype="bfloat16").communication
    assert in_bwd.collectives == {"all-reduce of each compact gradient in its hook": (36864, 2 * 3 * 9216)}


@pytest.mark.parametrize("method,grads", [("full", 2 * TARGETS), ("naive", 2 * TARGETS),
                                          ("lora", 4 * 2 * 8 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 128 + 64
                                                                + 128 + 64 + 64 + 128))])
def test_dp_baselines_hold_ddp_buckets(method, grads):
    """torch DDP's default buckets: a flat copy of every gradient (fp32 for LoRA's adapters:
    rank 8 x (in + out) of the 7 linears, 2 layers), between steps as in the step."""
    one, dp = tiny(method=method), tiny(method=method, gpus=4)
    assert dp.state == {**one.state, "DDP gradient buckets (a flat copy of every gradient)": grads}
    assert dp.phases == one.phases and dp.peak == one.peak + grads
    assert dp.communication.collectives == {"all-reduce of the dense gradients (DDP)": (grads, 6 * -(-grads // 4))}


# ---------------------------------------------------------------------- fsdp
def test_fsdp_state_and_phases_by_hand():
    one, f = tiny(), tiny(gpus=4, strategy="fsdp")
    # every dim 0 divides by 4: each GPU holds a quarter of every tensor, and of every mask
    assert f.state["weights"] == 2 * (2 * LAYER + ROOT) // 4 == 53408
    shares = 18432 // 4
    assert f.state["mask indices"] == 4 * shares
    assert f.state["original values at the mask"] == 2 * shares
    assert f.state["optimizer state (exp_avg, exp_avg_sq)"] == 8 * shares
    assert f.state["compact gradient"] == 4 * shares
    assert f.state["batch"] == one.state["batch"]
    whole_root, two_layers = 2 * ROOT, 2 * 2 * LAYER
    assert f.phases["ref_forward"] == {**one.phases["ref_forward"],
                                       "FSDP: the root's whole weights (embeddings, lm_head, final norm)": whole_root,
                                       "FSDP: two decoder layers' whole weights (all-gathered, prefetch)": two_layers}
    assert f.phases["loss"] == {**one.phases["loss"],
                                "FSDP: the root's whole weights (embeddings, lm_head, final norm)": whole_root}
    b = one.phases["backward"]
    # FSDP2 reduce-scatters a layer's dense bf16 gradients (36864 elements, whole: every dim 0
    # divides by 4) from a copy of them; the hooks then gather from the layer's reduce-scatter
    # output (a quarter) into the compact gradients (state): the first moment is the worse
    assert f.phases["backward"] == {
        "activations": b["activations"], "backward through one block": b["backward through one block"],
        "FSDP: one layer's whole dense weight gradients": 2 * 36864,
        "FSDP: reduce-scatter input (a copy of them)": 2 * 36864,
        "FSDP: the root's whole weights (embeddings, lm_head, final norm)": whole_root,
        "FSDP: two decoder layers' whole weights (all-gathered, prefetch)": two_layers}


def test_fsdp_pads_dim_0_as_fsdp2_does():
    """3 GPUs: ceil(dim0 / 3) rows each. q, o 22 x 64; k, v 11 x 64; gate, up 43 x 64;
    down 22 x 128; norms 22: 12588 per layer; embeddings, lm_head 86 x 64 and the norm's 22:
    11030 for the root."""
    f = tiny(gpus=3, strategy="fsdp")
    assert f.state["weights"] == 2 * (2 * 12588 + 11030)
    # a GPU's mask share: ceil(nnz x rows / dim0): q 1024 x 22 / 64 = 352, k 512 x 11 / 32 = 176,
    # gate 2048 x 43 / 128 = 688, down 2048 x 22 / 64 = 704
    assert f.state["original values at the mask"] == 2 * 2 * (352 + 176 + 176 + 352 + 688 + 688 + 704)
    assert f.phases["loss"]["FSDP: the root's whole weights (embeddings, lm_head, final norm)"] == 2 * 3 * 11030


def test_fsdp_lean_modes_by_hand():
    f = tiny(gpus=4, strategy="fsdp", optimizer_in_backward=True, grad_dtype="bfloat16", optimizer_bits=8,
             index_encoding="block16", master_weights=True)
    assert "compact gradient" not in f.state
    assert f.state["fp32 master values"] == 4 * 4608
    # 8-bit: per weight share k a code byte and an fp32 absmax per 256 entries, each moment
    per_layer = [256, 128, 128, 256, 512, 512, 512]
    assert f.state["optimizer state (exp_avg, exp_avg_sq)"] == 2 * sum(2 * (k + 4 * -(-k // 256)) for k in per_layer)
    # block16 over a GPU's shard: uint16 offsets + an int32 start per 65536 elements (+ 1)
    assert f.state["mask indices"] == 2 * 4608 + 2 * 7 * 4 * 2
    # the hook's transients (the share's bf16 compact gradient, 2 x 512, and one 8-bit chunk
    # of 512 entries, 9 x 512 + 4 x 2) and the layer's reduce-scatter output (2 x 36864 / 4)
    # stay below the layer's whole gradients (2 x 36864) they replace
    assert f.phases["backward"]["FSDP: one layer's whole dense weight gradients"] == 2 * 36864
    assert f.phases["backward"]["FSDP: reduce-scatter input (a copy of them)"] == 2 * 36864
    assert not any("compact gradient" in k or "8-bit" in k for k in f.phases["backward"])


def test_fsdp_hook_moment_by_hand():
    """Every entry trained (density 1), fp32 compact gradients and 8-bit state updated in
    backward on 2 GPUs: the worst hook outweighs the layer's whole gradients. Its gradient is
    a view of the layer's reduce-scatter output (one buffer, 2 B x 36864 / 2), which lives
    until the layer's last hook, beside FSDP2's reduce-scatter input (2 B x 36864); the whole
    dense gradients were freed once copied into it."""
    f = sm.estimate(TINY, density=1.0, seq=32, batch=1, gradient_checkpointing=True, gpus=2, strategy="fsdp",
                    optimizer_in_backward=True, optimizer_bits=8)
    # gate, up (64 of 128 rows x 64) and down (32 of 64 rows x 128): 4096 entries a GPU, all trained
    chunk = 8 * 4096 + 4096 + 4 * (4096 // 256)  # fp32 moments, new codes and absmax
    hook = {"FSDP: reduce-scatter input (a copy of them)": 2 * 36864,
            "FSDP: the layer's reduce-scatter output (its weights' dense shard gradients, one buffer)": 2 * 36864 // 2,
            "its transient compact gradient of the GPU's share (update in backward)": 4 * 4096,
            "8-bit update in backward: one chunk's fp32 moments and new codes": chunk}
    assert sum(hook.values()) == 163904 > 2 * 2 * 36864  # the other moment: whole gradients and their copy
    assert {k: v for k, v in f.phases["backward"].items() if k in hook or "whole dense" in k} == hook


def test_fsdp_implicit_masks_become_int32_positions():
    """seat.distributed.shard keeps an implicit mask as int32 positions of the shard: 4 B per
    entry (not a prefix count per block), and an 8-bit chunk is a view of them (no int32
    indices made per chunk as for a whole implicit mask)."""
    kw = dict(index_encoding="implicit", optimizer_bits=8, state_chunk=256)
    one, f = tiny(**kw), tiny(gpus=4, strategy="fsdp", **kw)
    assert f.state["mask indices"] == 4 * 4608  # density 0.25 of 2**32 is exact: 18432 / 4 entries
    assert one.state["mask indices"] == 2 * 4 * ((1 + 1) * 2 + (1 + 1) * 2 + (2 + 1) * 3)  # q,o 4096; k,v 2048; MLP 8192
    # the optimizer steps 256 entries at a time: fp32 moments, codes and absmax (+ 1 KiB of
    # int32 indices for the whole implicit mask, none on the shard)
    assert f.phases["optimizer"] == {"8-bit update: one chunk's fp32 moments and new codes": 9 * 256 + 4}
    assert one.phases["optimizer"] == {"8-bit update: one chunk's fp32 moments and new codes": 9 * 256 + 4 + 4 * 256}


def test_fsdp_full_fine_tuning_by_hand():
    one, f = tiny(method="full"), tiny(method="full", gpus=4, strategy="fsdp")
    assert f.state["weights"] == 53408
    assert f.state["optimizer state (exp_avg, exp_avg_sq)"] == 2 * 2 * TARGETS // 4
    assert f.phases["backward"]["FSDP: one layer's whole dense weight gradients"] == 2 * 36864
    assert f.phases["backward"]["FSDP: reduce-scatter input (a copy of them)"] == 2 * 36864
    assert f.phases["backward"]["logits' gradient and saved log-softmax"] == \
        one.phases["backward"]["logits' gradient and saved log-softmax"]
    # sharded dense gradients and foreach AdamW's temporaries over them
    assert f.phases["optimizer"] == {"dense gradients": 2 * TARGETS // 4, "AdamW step temporaries": 2 * TARGETS // 4}
    assert f.communication.collectives == mg._fsdp_dense(f.arch, f.options)
    assert f.communication.sent == f.communication.fsdp_dense[1]


def test_fsdp_bytes_sent_by_hand():
    f = tiny(gpus=4, strategy="fsdp")
    c = f.communication
    layer_share, root_share = 2 * 2 * LAYER // 4, 2 * ROOT // 4  # bf16 bytes per GPU
    assert c.collectives == {
        "all-gather of the decoder layers' weights (reference forward, forward, backward)":
            (3 * 4 * layer_share, 3 * 3 * layer_share),
        "all-gather of the root's weights (once)": (4 * root_share, 3 * root_share),
        # FSDP2 reduce-scatters the dense bf16 gradients, the compact ones never travel
        "reduce-scatter of the trained weights' dense gradients (FSDP2)": (2 * TARGETS, 3 * 2 * TARGETS // 4)}
    assert c.sent == 332928 + 49248 + 110592
    # FSDP dense: layers gathered twice, the root once, bf16 gradients reduce-scattered
    assert c.fsdp_dense == (2 * 4 * layer_share + 4 * root_share + 2 * TARGETS,
                            2 * 3 * layer_share + 3 * root_share + 3 * 2 * TARGETS // 4) == (509056, 381792)
    # seat sends more: the reference forward's all-gather of the layers
    assert c.sent - c.fsdp_dense[1] == 3 * layer_share
    dense = "reduce-scatter of the trained weights' dense gradients (FSDP2)"
    assert c.collectives[dense] == mg._fsdp_dense(f.arch, f.options)[dense]


def test_fsdp_shards_scale_as_one_over_n():
    kw = dict(density=0.05, seq=1024, batch=1, gradient_checkpointing=True)
    one = sm.estimate("Llama-3-8B", **kw)
    for n in (2, 8, 64):  # every dim 0 of Llama-3-8B divides by 64: exact quarters, eighths
        f = sm.estimate("Llama-3-8B", gpus=n, strategy="fsdp", **kw)
        assert f.state["weights"] == one.state["weights"] // n
        # a GPU's mask share is rounded up per weight (224 of them): within a byte-per-entry each
        for item, per_entry in (("mask indices", 4), ("original values at the mask", 2),
                                ("optimizer state (exp_avg, exp_avg_sq)", 8), ("compact gradient", 4)):
            assert 0 <= f.state[item] - one.state[item] / n <= per_entry * 224
        assert f.phase_bytes("backward") - f.state_bytes > one.phase_bytes("backward") - one.state_bytes
    peaks = [sm.estimate("Llama-3-70B", gpus=n, strategy="fsdp", **kw).peak for n in (2, 4, 8, 16, 32, 64)]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0] / 5


def test_traffic_against_dense_training():
    """seat's dp sends its compact gradients: 10x less than DDP dense at density 0.05
    (4 B per trained entry, 0.05 of them, vs 2 B per target element), 20x with bf16
    compact gradients; under fsdp seat sends what FSDP dense sends (FSDP2 reduce-scatters
    the dense gradients) and one more all-gather of the layers (its reference forward):
    Llama-3-8B's 32 layers of 218112000 bf16 parameters, 7/8 of them sent per gather."""
    kw = dict(density=0.05, gradient_checkpointing=True)
    dp = sm.estimate("Llama-3-8B", gpus=8, **kw).communication
    assert dp.sent * 10 == pytest.approx(dp.ddp_dense[1], rel=1e-3)
    bf16 = sm.estimate("Llama-3-8B", gpus=8, grad_dtype="bfloat16", **kw).communication
    assert bf16.sent * 20 == pytest.approx(dp.ddp_dense[1], rel=1e-3)
    f = sm.estimate("Llama-3-8B", gpus=8, strategy="fsdp", **kw).communication
    assert f.sent - f.fsdp_dense[1] == 7 * 32 * 218112000 * 2 // 8
    assert f.sent / f.fsdp_dense[1] == pytest.approx(50.70 / 38.48, abs=1e-3)  # the guide's table
    assert sm.estimate("Llama-3-8B", gpus=8, strategy="fsdp", **dict(kw, density=0.01)).communication.sent == f.sent


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("qwen2", {}), ("mixtral", {}),
                                              ("qwen2_moe", {"mlp_only_layers": [0]}), ("qwen3_moe", {})])
def test_the_tensors_fsdp_shards_are_the_models(model_type, extra):
    """(dim0, numel) of every parameter of each decoder layer and of the root, against a
    transformers model built on the meta device (transformers' default sizes)."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING[model_type](tie_word_embeddings=False, num_hidden_layers=2, **extra)
    arch = sm.Architecture.from_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = sorted((p.shape[0], p.numel()) for p in model.model.layers.parameters())
    assert shapes == sorted((d0, n) for layer in mg.layers(arch) for d0, n, _ in layer)
    in_layers = {id(p) for p in model.model.layers.parameters()}
    root = sorted((p.shape[0], p.numel()) for p in model.parameters() if id(p) not in in_layers)
    assert root == sorted((d0, n) for d0, n, _ in mg.root_tensors(arch))
    assert sorted(n for layer in mg.layers(arch) for _, n, t in layer if t) == sorted(arch.target_numels())


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,argument", [
    (dict(gpus=0), "gpus"), (dict(gpus=-1), "gpus"), (dict(gpus=2.0), "gpus"), (dict(gpus=True), "gpus"),
    (dict(strategy="zero3"), "strategy"), (dict(gpus=2, device="cpu"), "gpus"),
    (dict(gpus=2, strategy="fsdp", method="lora"), "strategy"),
    (dict(gpus=2, strategy="fsdp", method="naive"), "strategy"),
    (dict(gpus=2, strategy="fsdp", base_bits=4), "strategy"), (dict(bucket_bytes=0), "bucket_bytes"),
])
def test_bad_options_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        tiny(**kwargs)


@pytest.mark.parametrize("argv,flag,fix", [
    (["--gpus", "0"], "--gpus", "whole number >= 1"), (["--gpus", "-1"], "--gpus", "whole number >= 1"),
    (["--gpus", "two"], "--gpus", "whole number >= 1"), (["--gpus", "1.5"], "--gpus", "whole number >= 1"),
    (["--strategy", "xyz"], "--strategy", "choose from"),
    (["--gpus", "2", "--device", "cpu"], "--gpus", "pass device 'cuda'"),
    (["--gpus", "4", "--strategy", "fsdp", "--method", "lora"], "--strategy", "use strategy 'dp'"),
    (["--gpus", "4", "--strategy", "fsdp", "--base-bits", "4"], "--strategy", "use strategy 'dp'"),
])
def test_cli_bad_arguments_exit_2_with_one_line(argv, flag, fix, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--config", "Llama-3.2-1B", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m seat.memory: error: argument {flag}: ") and fix in err[-1]


def test_cli_reports_the_share_and_the_traffic():
    out = run_cli(["--config", "Llama-3-8B", "--gradient-checkpointing", "--gpus", "8", "--strategy", "fsdp",
                   "--gpu-memory", "24GiB"])
    est = sm.estimate("Llama-3-8B", gradient_checkpointing=True, gpus=8, strategy="fsdp")
    assert "8 GPUs (fsdp)" in out and f"{est.peak / 1e9:.3f}" in out
    assert f"{est.communication.sent / 1e9:.3f}" in out and "reduce-scatter of the trained weights' dense gradients (FSDP2)" in out
    assert f"{est.communication.fsdp_dense[1] / 1e9:,.2f} GB (FSDP)" in out
    d = json.loads(run_cli(["--config", "Llama-3-8B", "--gpus", "8", "--json"]))
    dp = sm.estimate("Llama-3-8B", gpus=8)
    assert d["peak_bytes"] == dp.peak and d["options"]["gpus"] == 8 and d["options"]["strategy"] == "dp"
    assert d["communication"] == dp.communication.to_dict()
    table = run_cli(["--config", "Llama-3-8B", "Mistral-7B", "--gpus", "8", "--gpu-memory", "24GiB"])
    assert "sent/GPU/step GB" in table and f"| {dp.communication.sent / 1e9:.2f} |" in table
