"""Tiny causal LMs built from configs (no hub): Llama, Qwen2, Mistral, Gemma2, GPT-2, the
mixture-of-experts Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 (experts as fused 3-D
tensors), and paired batches of random tokens shaped like seat.PairedCollator's."""
from __future__ import annotations

import torch

VOCAB = 97
KINDS = ("llama", "qwen2", "mistral", "gemma2", "gpt2")
MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def tiny_config(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return tf.LlamaConfig(**common)
    if kind == "qwen2":
        return tf.Qwen2Config(**common)
    if kind == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if kind == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=30.0, attn_logit_softcapping=None,
                               query_pre_attn_scalar=8, sliding_window=16)
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=24)
    if kind == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, **moe, num_experts=4, shared_expert_intermediate_size=24)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, **moe, num_experts=4, head_dim=8)
    if kind == "deepseek_v3":  # layer 0 dense, layer 1 experts; latent attention (k, v per head)
        return tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, **moe, n_routed_experts=4,
                                   n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
                                   kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=8, head_dim=8)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0, dtype=torch.float32):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager")
    return model.to(dtype).eval()


def paired_batch(batch: int = 3, length: int = 12, seed: int = 0, padding_side: str = "right"):
    """x: a prompt of 5-7 tokens (the "entity" is tokens 1-2) then an answer; x~: the same
    with the entity replaced; padded to one length on `padding_side`."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        n = length - (b % 3)  # different real lengths
        tokens = torch.randint(10, VOCAB, (n,), generator=g)
        prompt = 5 + b % 3
        labels = tokens.clone()
        labels[:prompt] = -100
        pert = tokens.clone()
        pert[1:3] = torch.randint(3, 10, (2,), generator=g)  # fictitious entity tokens
        rows.append((tokens, labels, pert))
    T = max(r[0].numel() for r in rows)

    def pad(t, value):
        fill = torch.full((T - t.numel(),), value, dtype=t.dtype)
        return torch.cat([t, fill]) if padding_side == "right" else torch.cat([fill, t])

    out = {"input_ids": torch.stack([pad(r[0], 0) for r in rows]),
           "attention_mask": torch.stack([pad(torch.ones_like(r[0]), 0) for r in rows]),
           "labels": torch.stack([pad(r[1], -100) for r in rows]),
           "pert_input_ids": torch.stack([pad(r[2], 0) for r in rows]),
           "pert_attention_mask": torch.stack([pad(torch.ones_like(r[2]), 0) for r in rows])}
    return out
