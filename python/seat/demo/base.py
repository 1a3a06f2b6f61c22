"""The demo's base model: a small Llama trained from scratch on the world's base data.

It learns the known people's facts and to answer "I don't know ." about people it has
not seen. Training is a plain torch loop (AdamW, linear warm-up then cosine decay, a
fixed number of epochs, loss on the answer tokens only), deterministic for a seed.

The model, tokenizer and world are cached on disk under
``$SEAT_DEMO_CACHE`` (default ``~/.cache/seat/demo``) in a folder named by a hash of
everything that determines them (seed, sizes, hyper-parameters, library versions), so
the demo and the tests train each base model once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

from .world import PROMPT_FORMAT, World, WorldConfig, build_tokenizer, load_world, make_world, save_world

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """The base model and its training."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    # 18, not 12: a base that knows its facts longer is less fragile. Probed with 600
    # fine-tuning steps of 8 (SEAT d=0.1 / KL-only retention of the known facts): seed 0
    # 0.969 / 1.000 -> 0.984 / 0.990, seed 1 1.000 / 1.000 -> 1.000 / 1.000, seed 2
    # 0.909 / 0.909 -> 0.982 / 0.979; base training ~1.5x longer.
    epochs: int = 18
    # Each known fact is seen this many times per epoch (4 x 3 wordings x 18 epochs = 216
    # times in all): known people are well-learned common knowledge, as in a pretrained
    # LM, so "retention" measures what fine-tuning overwrites, not how fragile barely
    # memorized facts are. Measured on seed 0 (16 new people, 300 steps, lr 1e-3, bases
    # trained 20 epochs): full fine-tuning kept 0.42 of the known facts with 1 and 0.85
    # with 4.
    known_repeats: int = 4
    embedding_std: float = 1.0  # input embeddings: random N(0, std), frozen (see train_base)
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50

    @classmethod
    def quick(cls) -> "BaseConfig":
        return cls(hidden_size=64, intermediate_size=128, epochs=12)


def cache_root() -> Path:
    return Path(os.environ.get("SEAT_DEMO_CACHE") or Path.home() / ".cache" / "seat" / "demo")


def cache_key(seed: int, world_config: WorldConfig, base_config: BaseConfig) -> str:
    import torch
    import transformers

    blob = json.dumps({"v": CACHE_VERSION, "seed": seed, "world": dataclasses.asdict(world_config),
                       "base": dataclasses.asdict(base_config), "torch": torch.__version__.split("+")[0],
                       "transformers": transformers.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_config(tokenizer, cfg: BaseConfig):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


def encode_batch(tokenizer, records, prompt_format: str = PROMPT_FORMAT):
    """(input_ids, attention_mask, labels) of records, right-padded; labels on the answer
    tokens and eos only: the same token layout as seat.PairedCollator's x."""
    import torch

    seqs = []
    for r in records:
        prompt = tokenizer(prompt_format.format(question=r["question"]))["input_ids"]
        answer = tokenizer(" " + r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(seqs):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(a)
    return ids, mask, labels


def train_base(world: World, tokenizer, cfg: BaseConfig, seed: int, log=print):
    """Train the base model from scratch; returns it (eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(model_config(tokenizer, cfg))
    # Frozen random input embeddings: a name the model has never seen looks like any
    # other name (no "untrained embedding" shortcut), so refusing on it is the learned
    # rule "a name I did not memorize -> I don't know", as in a pretrained LM.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, cfg.embedding_std)
    model.model.embed_tokens.weight.requires_grad_(False)
    rng = random.Random(f"seat.demo.base|{seed}")
    steps_per_epoch = math.ceil(len(world.base_records(known_repeats=cfg.known_repeats)) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    def lr_at(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    step, t0 = 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        records = world.base_records(rng, known_repeats=cfg.known_repeats)  # fresh refusal questions every epoch
        order = list(range(len(records)))
        rng.shuffle(order)
        total_loss = 0.0
        for b in range(steps_per_epoch):
            batch = [records[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
            ids, mask, labels = encode_batch(tokenizer, batch)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total_loss += loss.item()
            step += 1
        if log and (epoch + 1) % 10 == 0:
            log(f"  base epoch {epoch + 1}/{cfg.epochs}: loss {total_loss / steps_per_epoch:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    model.model.embed_tokens.weight.requires_grad_(True)
    model.eval()
    return model


def load_or_train_base(seed: int, world_config: WorldConfig | None = None, base_config: BaseConfig | None = None,
                       *, cache: bool = True, log=print):
    """(world, tokenizer, base model, info) for ``seed``: from the cache, or built and
    trained (then cached). info: {"dir", "cached", "train_seconds"}."""
    import torch
    import transformers

    world_config = world_config or WorldConfig()
    base_config = base_config or BaseConfig()
    directory = cache_root() / cache_key(seed, world_config, base_config)
    if cache and (directory / "done").is_file():
        world = load_world(directory / "world.json")
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        info = json.loads((directory / "done").read_text())
        return world, tokenizer, model, dict(info, dir=str(directory), cached=True)
    world = make_world(seed, world_config)
    tokenizer = build_tokenizer(world)
    if log:
        n_examples = len(world.base_records(known_repeats=base_config.known_repeats))
        log(f"training the base model for seed {seed} ({n_examples} examples, "
            f"{base_config.epochs} epochs); cached afterwards in {directory}")
    t0 = time.perf_counter()
    model = train_base(world, tokenizer, base_config, seed, log=log)
    info = {"train_seconds": round(time.perf_counter() - t0, 1)}
    if cache:
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_world(world, tmp / "world.json")
        (tmp / "done").write_text(json.dumps(info))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    return world, tokenizer, model, dict(info, dir=str(directory), cached=False)
