"""The architecture sweep: every causal LM type transformers ships, built small, through
seat.patch, one SEAT step, and the checks that catch a crash or a silently untrained
weight. Shared by tests/conformance/test_architecture_sweep.py (a representative subset)
and benchmarks/architecture_sweep.py (every type).

A tiny config is the type's default config with every size field shrunk (hidden 64,
2 layers, 4 heads, 4 experts, vocab 128, ...), per-layer lists cut to the layers kept.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from _models import paired_batch

TINY_VOCAB = 128
LAYERS = 2
# field name -> tiny value; a field is set only where the type's default config has it
SIZES = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "model_dim", "word_embed_proj_dim"), 64),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
                     "num_decoder_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "decoder_attention_heads", "num_heads",
                     "swa_num_attention_heads", "encoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "swa_num_key_value_heads",
                     "multi_query_group_num", "num_key_value_groups"), 2),
    **dict.fromkeys(("head_dim", "swa_head_dim", "attention_head_dim", "kv_channels", "d_head", "d_kv",
                     "linear_key_head_dim", "linear_value_head_dim", "mamba_d_head"), 16),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "decoder_ffn_dim", "d_ff", "ffn_hidden_size",
                     "intermediate_size_mlp", "d_inner", "n_inner", "encoder_ffn_dim", "dense_intermediate_size"), 96),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "moe_ffn_hidden_size", "ffn_hidden_size_moe", "moe_shared_expert_intermediate_size"), 32),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "ffn_num_experts",
                     "attn_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_selected_experts", "moe_top_k", "top_k",
                     "num_experts_per_token", "moe_k"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    **dict.fromkeys(("rotary_dim", "rotary_emb_dim"), 8),
    "first_k_dense_replace": 1, "moe_layer_end_index": LAYERS - 1,
    # Jamba-style hybrids: layer 1 has the attention and the experts
    **dict.fromkeys(("attn_layer_period", "expert_layer_period"), 2),
    **dict.fromkeys(("attn_layer_offset", "expert_layer_offset"), 1),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length",
                     "max_sequence_length"), 128),
    **dict.fromkeys(("sliding_window", "sliding_window_size", "attention_chunk_size", "window_size",
                     "rel_extent"), 32),
    **dict.fromkeys(("embedding_size", "input_embedding_size", "hidden_size_per_layer_input"), 32),
    "output_embedding_size": 48,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    **dict.fromkeys(("state_size", "mamba_d_state", "ssm_state_size", "d_state"), 8),
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 8),
    **dict.fromkeys(("mamba_n_heads", "n_mamba_heads"), 8),  # x 16 per head = the expanded width 2 x 64
    "linear_num_value_heads": 4,
    **dict.fromkeys(("linear_num_key_heads", "n_groups", "mamba_n_groups"), 2),
    "laurel_rank": 8, "altup_num_inputs": 2, "vocab_size_per_layer_input": TINY_VOCAB,
    "num_kv_shared_layers": 0, "num_memory_blocks": 2,
}
VOCAB_FIELDS = ("vocab_size", "n_vocab", "padded_vocab_size")
# fields a MoE config may leave None, filled when the config has experts
FILL_NONE = {"num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "n_routed_experts": 4, "n_shared_experts": 1}
# lists whose entries are layer indices (filtered to the layers kept), not per-layer values
INDEX_LISTS = ("moe_layers", "cross_attention_layers", "attn_layer_indices", "global_attn_layers",
               "full_attn_idxs", "kv_shared_layers", "mlp_only_layers")


def _layer_count(fields: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"):
        if isinstance(fields.get(key), int):
            return fields[key]
    return None


EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _per_layer(values: list) -> list:
    """A per-layer list cut to LAYERS entries that keep its kinds of layer where it can
    (["linear", "linear", "linear", "full", ...] -> ["linear", "full"]): the first entry
    of each distinct value, then the next entries."""
    firsts = {}
    for i, v in enumerate(values):
        firsts.setdefault(repr(v), i)
    keep = sorted(firsts.values())[:LAYERS]
    keep += [i for i in range(len(values)) if i not in keep][:LAYERS - len(keep)]
    return [values[i] for i in sorted(keep)]


def _shrink(fields: dict) -> dict:
    """A copy of a config's fields with the size fields made tiny (nested configs too)."""
    layers = _layer_count(fields)
    out = {}
    for key, value in fields.items():
        if key == "per_layer_config" and isinstance(value, dict) and all(str(k).isdigit() for k in value):
            kept = {k: v for k, v in value.items() if int(k) < LAYERS}
            if value and not kept:  # keep one layer of the listed kind
                first = sorted(value, key=int)[0]
                kept = {str(LAYERS - 1).zfill(len(str(first))): value[first]}
            out[key] = kept
        elif isinstance(value, dict) and key.endswith("_config"):
            out[key] = _shrink(value)
        elif key in VOCAB_FIELDS and isinstance(value, int):
            out[key] = TINY_VOCAB
        elif key == "unpadded_vocab_size" and isinstance(value, int):
            out[key] = TINY_VOCAB - 8
        elif key in SIZES and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, SIZES[key]) if key.startswith(("num_experts_per", "top_k", "moe_top")) else SIZES[key]
        elif key in INDEX_LISTS and isinstance(value, list) and all(isinstance(v, int) for v in value):
            kept = [v for v in value if v < LAYERS]
            # keep one layer of the listed kind (a hybrid's attention layer), except cross-attention,
            # which a text-only forward skips
            out[key] = kept or ([LAYERS - 1] if value and key != "cross_attention_layers" else [])
        elif isinstance(value, list) and layers is not None and len(value) == layers and layers != LAYERS:
            out[key] = _per_layer(value)
        elif value is None and key == "attn_layer_indices":  # a hybrid whose default has no attention layer
            out[key] = [LAYERS - 1]
        elif value is None and key in FILL_NONE and (any(isinstance(fields.get(k), int) for k in EXPERT_FIELDS)
                                                     or isinstance(fields.get("moe_intermediate_size"), int)):
            out[key] = FILL_NONE[key]
        elif key.endswith(("_token_id", "_token_index")) and isinstance(value, int) and value >= TINY_VOCAB:
            out[key] = TINY_VOCAB - 1
        else:
            out[key] = value
    if isinstance(out.get("qk_rope_head_dim"), int):  # multi-head latent attention: rotary part, nope part
        if "head_dim" in out:
            out["head_dim"] = out["qk_rope_head_dim"]
        if "qk_head_dim" in out:
            out["qk_head_dim"] = out["qk_rope_head_dim"] + out.get("qk_nope_head_dim", 0)
        if "num_key_value_heads" in out and "num_attention_heads" in out:
            out["num_key_value_heads"] = out["num_attention_heads"]  # latent attention expands k, v per head
    if isinstance(out.get("num_experts_per_tok"), int) and isinstance(out.get("num_local_experts"), int):
        out["num_experts_per_tok"] = min(out["num_experts_per_tok"], out["num_local_experts"])
    return out


def tiny_config(model_type: str):
    """The default config of `model_type`, shrunk (see the module docstring)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    fields = _shrink(cls().to_dict())
    for key in ("transformers_version", "model_type", "architectures", "_name_or_path", "id2label", "label2id"):
        fields.pop(key, None)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(fields.get(key), int) and fields[key] >= TINY_VOCAB:
            fields[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
    config = cls(**fields)
    config.is_decoder = True  # encoder stacks (BERT family) build their causal LM only as a decoder
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "activation_dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    return config


def build_tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    """The causal LM of `model_type` at tiny size, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    except (ValueError, TypeError):  # a model without an eager attention implementation
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def looks_trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters a user would expect SEAT to train or to say why not: the weights of
    nn.Linear and GPT-2's Conv1D, and fused expert tensors (floating, 3-D or more, not a
    convolution's kernel), outside the input embeddings and the output head."""
    head = model.get_output_embeddings()
    skip = {id(head.weight)} if head is not None else set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            skip.add(id(module.weight))
    out = {}
    for mname, module in model.named_modules():
        conv = isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if id(p) in skip or not p.is_floating_point():
                continue
            linear = pname == "weight" and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
            if linear or (p.dim() >= 3 and not conv):
                out[name] = p
    return out


@dataclasses.dataclass
class SweepResult:
    model_type: str
    model_class: str = ""
    status: str = "pass"  # pass | refused | fail | unbuilt (the harness could not make a working tiny model)
    reason: str = ""
    targets: int = 0
    expert_targets: int = 0
    trained_entries: int = 0
    untrained_targets: list = dataclasses.field(default_factory=list)  # targets no gradient reached
    seconds: float = 0.0


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _reported_skips(handle) -> set[str]:
    report = getattr(handle, "targeting_report", None)
    return set(report().skipped) if callable(report) else set()


def check_architecture(model_type: str, density: float = 0.25, seed: int = 0) -> SweepResult:
    """Build `model_type` small, seat.patch it, run one SEAT loss + backward + optimizer
    step, and check: every target changed only inside its mask, nothing else changed,
    the loss is finite, and every weight that looks trainable (looks_trainable) is a
    target or is listed with a reason in handle.targeting_report(). A ValueError from
    seat.patch is a refusal; any other exception, or a failed check, is a failure."""
    import seat
    from seat.masks import mask_indices

    result = SweepResult(model_type)
    start = time.perf_counter()
    try:
        model = build_tiny(model_type, seed)
    except Exception as exc:  # the harness could not build it: not seat's doing
        result.status, result.reason = "unbuilt", _why(exc)
        return result
    result.model_class = type(model).__name__
    try:
        batch = paired_batch(seed=seed)
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except Exception as exc:  # the tiny config builds a model that does not run: not seat's doing
        result.status, result.reason = "unbuilt", "its own forward fails: " + _why(exc)
        return result
    try:
        try:
            handle = seat.patch(model, density=density, seed=seed)
        except ValueError as exc:
            result.status, result.reason = "refused", _why(exc)
            return result
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = handle.optimizer(lr=1e-2)
        out = handle.loss(batch)
        if not torch.isfinite(out.loss):
            raise AssertionError(f"loss is {out.loss.item()}")
        out.loss.backward()
        opt.step()
        problems = []
        for name, p in model.named_parameters():
            changed = (p.detach() != before[name]).reshape(-1)
            if name in handle.targets:
                allowed = torch.zeros_like(changed)
                allowed[mask_indices(handle.targets[name].idx).long()] = True
                if (changed & ~allowed).any():
                    problems.append(f"{name} changed outside its mask")
                if not changed.any():
                    result.untrained_targets.append(name)
            elif changed.any():
                problems.append(f"untargeted {name} changed")
        skipped = _reported_skips(handle)
        silent = [n for n in looks_trainable(model) if n not in handle.targets and n not in skipped]
        if silent:
            problems.append(f"{len(silent)} weights neither targeted nor reported, e.g. {', '.join(silent[:3])}")
        result.targets = len(handle.targets)
        result.expert_targets = sum(t.param.dim() >= 3 for t in handle.targets.values())
        result.trained_entries = handle.num_trainable
        if problems:
            result.status, result.reason = "fail", "; ".join(problems)[:600]
    except Exception as exc:
        result.status, result.reason = "fail", _why(exc)
    finally:
        result.seconds = round(time.perf_counter() - start, 2)
    return result


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal LM class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
