"""The shapes the memory model needs, read from a Hugging Face config.

`load_config(name_or_path)` reads a known name (shipped as package data, see KNOWN) or a
path to a config.json through transformers' own config classes
(`AutoConfig.for_model(model_type, **fields)`), so defaults the JSON leaves out (head_dim,
tie_word_embeddings, biases) are the ones the model would really have.
`Architecture.from_config(config)` turns it into counts of elements.

Supported: decoder-only Llama-style models (Llama, Mistral, Qwen2): per block
q, k, v, o, gate, up, down linears, two RMSNorms, rotary positions; an untied or tied
lm_head. transformers is imported on first use only (`import seat` stays light).
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
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
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
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-style decoders)")


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


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Element counts of a Llama-style decoder (no dtype: the estimate applies one).

    hidden (H), intermediate (I), layers (L), heads, kv_heads, head_dim, vocab (V);
    q_dim = heads * head_dim, kv_dim = kv_heads * head_dim.
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

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "Architecture":
        c = config
        heads = int(c.num_attention_heads)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
        return cls(
            name=name or getattr(c, "_name_or_path", "") or c.model_type,
            model_type=c.model_type, hidden=int(c.hidden_size), intermediate=int(c.intermediate_size),
            layers=int(c.num_hidden_layers), heads=heads, kv_heads=kv_heads, head_dim=int(head_dim),
            vocab=int(c.vocab_size), tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=c.model_type == "qwen2", attention_bias=bool(getattr(c, "attention_bias", False)),
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each block linear weight (one block)."""
        H, I = self.hidden, self.intermediate
        return {"q_proj": (self.q_dim, H), "k_proj": (self.kv_dim, H), "v_proj": (self.kv_dim, H),
                "o_proj": (H, self.q_dim), "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}

    @property
    def block_linear_params(self) -> int:
        """Elements of the block linear weights of all layers: what SEAT (and the full
        fine-tuning baseline here) trains."""
        return self.layers * sum(o * i for o, i in self.block_linear_shapes().values())

    @property
    def largest_block_linear(self) -> int:
        """Elements of the largest single block linear weight (one dense gradient)."""
        return max(o * i for o, i in self.block_linear_shapes().values())

    @property
    def bias_params(self) -> int:
        per_layer = 0
        if self.qkv_bias or self.attention_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        if self.attention_bias:
            per_layer += self.hidden
        if self.mlp_bias:
            per_layer += 2 * self.intermediate + self.hidden
        return self.layers * per_layer

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def embedding_params(self) -> int:
        """Input embedding plus, when untied, the lm_head."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def total_params(self) -> int:
        return self.block_linear_params + self.bias_params + self.norm_params + self.embedding_params
