"""The shapes the memory model needs, read from a Hugging Face config.

`load_config(name_or_path)` reads a known name (shipped as package data, see KNOWN) or a
path to a config.json through transformers' own config classes
(`AutoConfig.for_model(model_type, **fields)`), so defaults the JSON leaves out (head_dim,
tie_word_embeddings, biases) are the ones the model would really have.
`Architecture.from_config(config)` turns it into counts of elements.

Supported: decoder-only Llama-style models (Llama, Mistral, Qwen2): per block
q, k, v, o, gate, up, down linears, two RMSNorms, rotary positions; an untied or tied
lm_head. Mixture-of-experts variants of them (Mixtral, Qwen2-MoE, Qwen3-MoE): the MLP of
a sparse layer is a router (E x H, not trained), fused expert tensors gate_up (E, 2I_e, H)
and down (E, H, I_e) that seat.patch targets like linear weights, and for Qwen2-MoE a
shared expert (gate, up, down linears of I_s) with a 1 x H linear gate.
transformers is imported on first use only (`import seat` stays light).
"""
from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

# known name -> file under seat/memory/known-configs (package data; a folder name that is no
# Python identifier, so setuptools does not take it for a package) (names match case-insensitively)
KNOWN = {
    "Llama-3-8B": "llama-3-8b.json",
    "Qwen2.5-7B": "qwen2.5-7b.json",
    "Mistral-7B": "mistral-7b.json",
    "Llama-3.2-1B": "llama-3.2-1b.json",
    "Llama-3-70B": "llama-3-70b.json",
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def known_names() -> list[str]:
    return list(KNOWN)


def _known_file(name: str) -> str | None:
    by_lower = {k.lower(): v for k, v in KNOWN.items()}
    return by_lower.get(name.lower())


def read_config_dict(config: str | Path | Mapping[str, Any], *, argument: str = "config") -> dict:
    """The fields of a config: a known name, a path to a config.json (or a folder holding
    one), or a mapping of the fields. Raises ValueError naming `argument` otherwise."""
    if isinstance(config, Mapping):
        return dict(config)
    text = str(config)
    known = _known_file(text)
    if known is not None:
        return json.loads(resources.files(__package__).joinpath("known-configs", known).read_text())
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{argument}: {path} is not valid JSON ({exc})") from None
    raise ValueError(f"{argument}: {text!r} is neither a known model name ({', '.join(KNOWN)}) nor a path to a "
                     "Hugging Face config.json")


def _check_model_type(model_type, argument: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{argument}: model_type {model_type!r} is not supported by the memory model; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-style decoders and their "
                         "mixture-of-experts variants)")


def load_config(config, *, argument: str = "config"):
    """A transformers PretrainedConfig for `config` (a known name, a path, a mapping of
    fields, or a PretrainedConfig, returned as is)."""
    if hasattr(config, "to_dict") and hasattr(config, "model_type"):
        _check_model_type(config.model_type, argument)
        return config
    fields = read_config_dict(config, argument=argument)
    model_type = fields.get("model_type")
    _check_model_type(model_type, argument)
    from transformers import AutoConfig

    fields = {k: v for k, v in fields.items() if k != "model_type"}
    return AutoConfig.for_model(model_type, **fields)


def _sparse_layers(c) -> int:
    """How many decoder layers have a mixture-of-experts MLP (as transformers builds them)."""
    if c.model_type == "mixtral":
        return int(c.num_hidden_layers)
    if c.model_type in ("qwen2_moe", "qwen3_moe"):
        only = set(getattr(c, "mlp_only_layers", None) or [])
        step = int(getattr(c, "decoder_sparse_step", 1) or 1)
        return sum(1 for i in range(int(c.num_hidden_layers))
                   if i not in only and int(c.num_experts) > 0 and (i + 1) % step == 0)
    return 0


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Element counts of a Llama-style decoder (no dtype: the estimate applies one).

    hidden (H), intermediate (I: the dense MLP), layers (L), heads, kv_heads, head_dim,
    vocab (V); q_dim = heads * head_dim, kv_dim = kv_heads * head_dim. Mixture of experts
    (all 0 for a dense model): experts (E) per sparse layer, experts_per_token (k),
    expert_intermediate (I_e), shared_intermediate (I_s, 0 without a shared expert),
    sparse_layers (how many layers have the experts instead of the dense MLP).
    """

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool  # Qwen2: biases on q, k, v
    attention_bias: bool  # Llama's attention_bias: biases on q, k, v and o
    mlp_bias: bool
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    sparse_layers: int = 0
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "Architecture":
        c = config
        heads = int(c.num_attention_heads)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
        moe = {}
        if c.model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
            mixtral = c.model_type == "mixtral"
            moe = dict(experts=int(c.num_local_experts if mixtral else c.num_experts),
                       experts_per_token=int(c.num_experts_per_tok),
                       expert_intermediate=int(c.intermediate_size if mixtral else c.moe_intermediate_size),
                       shared_intermediate=int(getattr(c, "shared_expert_intermediate_size", 0) or 0)
                       if c.model_type == "qwen2_moe" else 0,
                       sparse_layers=_sparse_layers(c))
        return cls(
            name=name or getattr(c, "_name_or_path", "") or c.model_type,
            model_type=c.model_type, hidden=int(c.hidden_size), intermediate=int(c.intermediate_size),
            layers=int(c.num_hidden_layers), heads=heads, kv_heads=kv_heads, head_dim=int(head_dim),
            vocab=int(c.vocab_size), tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=c.model_type in ("qwen2", "qwen2_moe"), attention_bias=bool(getattr(c, "attention_bias", False)),
            mlp_bias=bool(getattr(c, "mlp_bias", False)), qk_norm=c.model_type == "qwen3_moe", **moe,
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def dense_layers(self) -> int:
        return self.layers - self.sparse_layers

    def attention_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of the attention linear weights of one block."""
        H = self.hidden
        return {"q_proj": (self.q_dim, H), "k_proj": (self.kv_dim, H), "v_proj": (self.kv_dim, H),
                "o_proj": (H, self.q_dim)}

    def block_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear weight of a dense block."""
        H, I = self.hidden, self.intermediate
        return {**self.attention_shapes(), "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}

    def sparse_block_target_numels(self) -> dict[str, int]:
        """Elements of each weight seat.patch targets in one mixture-of-experts block:
        the attention linears, the fused expert tensors, the shared expert's linears."""
        H, E, Ie, Is = self.hidden, self.experts, self.expert_intermediate, self.shared_intermediate
        out = {k: o * i for k, o, i in ((k, *v) for k, v in self.attention_shapes().items())}
        out.update({"experts.gate_up_proj": E * 2 * Ie * H, "experts.down_proj": E * H * Ie})
        if Is:
            out.update({"shared_expert.gate_proj": Is * H, "shared_expert.up_proj": Is * H,
                        "shared_expert.down_proj": H * Is, "shared_expert_gate": H})
        return out

    def target_numels(self) -> list[int]:
        """Elements of every weight seat.patch targets, over all layers."""
        dense = [o * i for o, i in self.block_linear_shapes().values()]
        return dense * self.dense_layers + list(self.sparse_block_target_numels().values()) * self.sparse_layers

    @property
    def block_linear_params(self) -> int:
        """Elements of the target weights of all layers (linear layers and fused expert
        tensors): what SEAT (and the full fine-tuning baseline here) trains."""
        return sum(self.target_numels())

    @property
    def largest_block_linear(self) -> int:
        """Elements of the largest single target weight (one dense gradient)."""
        return max(self.target_numels())

    @property
    def active_intermediate(self) -> int:
        """The MLP width one token runs through in a block (activations): I for a dense
        model, k * I_e + I_s when every layer is sparse (the experts' hidden layers a
        token is routed to, and the shared expert's)."""
        if not self.sparse_layers:
            return self.intermediate
        sparse = self.experts_per_token * self.expert_intermediate + self.shared_intermediate
        return -(-(sparse * self.sparse_layers + self.intermediate * self.dense_layers) // self.layers)

    @property
    def router_params(self) -> int:
        """The routers of the sparse layers (E x H each; not trained)."""
        return self.sparse_layers * self.experts * self.hidden

    @property
    def bias_params(self) -> int:
        per_layer = 0
        if self.qkv_bias or self.attention_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        if self.attention_bias:
            per_layer += self.hidden
        mlp = self.dense_layers * (2 * self.intermediate + self.hidden) if self.mlp_bias else 0
        return self.layers * per_layer + mlp

    @property
    def norm_params(self) -> int:
        qk = 2 * self.head_dim * self.layers if self.qk_norm else 0
        return (2 * self.layers + 1) * self.hidden + qk

    @property
    def embedding_params(self) -> int:
        """Input embedding plus, when untied, the lm_head."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def total_params(self) -> int:
        return (self.block_linear_params + self.router_params + self.bias_params + self.norm_params
                + self.embedding_params)
