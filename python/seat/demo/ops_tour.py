"""A SEAT training run on a toy LM, through the public ops only (see the package docstring).

The model: frozen embedding (V x H) -> trainable H x H linear + tanh -> frozen lm_head.
Each example x is paired with x~ (its first token, the "entity", replaced by a token never
used as an entity); the loss is CE on x plus KL(p_base || p_theta) on x~.
"""
from __future__ import annotations

import argparse
import time

import torch

from .. import ops
from ..ops import _backend


def build(vocab: int, hidden: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(vocab, hidden, generator=gen) * 0.5
    weight = (torch.randn(hidden, hidden, generator=gen) / hidden**0.5).requires_grad_(True)
    lm_head = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    return embed, weight, lm_head, gen


def hidden_states(tokens: torch.Tensor, embed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids -> (B, T, H): a causal running mean of embeddings through W."""
    x = embed[tokens].cumsum(1) / torch.arange(1, tokens.shape[1] + 1).view(1, -1, 1)
    return torch.tanh(x @ weight.T)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seat.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vocab, hid, batch, seq = 96, 64, 8, 12
    embed, weight, lm_head, gen = build(vocab, hid, args.seed)

    # the mask: nnz sorted int32 indices into weight.view(-1), and the base values there
    nnz = max(1, round(args.density * weight.numel()))
    idx = torch.randperm(weight.numel(), generator=gen)[:nnz].sort().values.to(torch.int32)
    originals = weight.detach().view(-1)[idx.long()].clone()
    base_weight = weight.detach().clone()
    grad = torch.zeros(nnz)
    exp_avg, exp_avg_sq = torch.zeros(nnz), torch.zeros(nnz)

    def compact(param: torch.Tensor) -> None:  # dense grad -> compact, then free it
        ops.masked_gather_(grad, param.grad, idx)
        param.grad = None

    weight.register_post_accumulate_grad_hook(compact)

    tokens = torch.randint(8, vocab, (batch, seq), generator=gen)
    entities = torch.randint(0, 4, (batch,), generator=gen)  # tokens 0-3: training entities
    tokens[:, 0] = entities
    labels = tokens[:, 1:].reshape(-1)
    print(f"toy SEAT run: vocab {vocab}, hidden {hid}, batch {batch}x{seq}, density {args.density} "
          f"({nnz}/{weight.numel()} entries trainable), {args.steps} steps")
    print(f"{'step':>5s} {'loss':>9s} {'ce':>9s} {'kl':>9s}")
    start = time.perf_counter()
    first = last = None
    for step in range(1, args.steps + 1):
        perturbed = tokens.clone()
        perturbed[:, 0] = torch.randint(4, 8, (batch,), generator=gen)  # fresh fictitious entity
        with torch.no_grad():
            ops.masked_swap_(weight.data, idx, originals)  # weight is the base model now
            try:
                ref_hidden = hidden_states(perturbed, embed, weight)[:, :-1].reshape(-1, hid)
            finally:
                ops.masked_swap_(weight.data, idx, originals)  # and the fine-tuned one again
        cur = hidden_states(torch.cat([tokens, perturbed]), embed, weight)[:, :-1]
        rows = cur.reshape(-1, hid)
        loss, ce, kl = ops.fused_linear_paired_loss(rows, lm_head, labels, ref_hidden)
        loss.backward()
        ops.sparse_adamw_([weight.data], [idx], [grad], [exp_avg], [exp_avg_sq], lr=3e-2, step=step)
        grad.zero_()
        first = first or (loss.item(), ce.item(), kl.item())
        last = (loss.item(), ce.item(), kl.item())
        if step == 1 or step % max(1, args.steps // 6) == 0:
            print(f"{step:5d} {last[0]:9.4f} {last[1]:9.4f} {last[2]:9.4f}")
    elapsed = time.perf_counter() - start

    changed = (weight.detach() != base_weight).view(-1)
    outside = torch.ones(weight.numel(), dtype=torch.bool)
    outside[idx.long()] = False
    restored = weight.detach().clone()
    ops.masked_swap_(restored, idx, originals.clone())
    print(f"\nce on x: {first[1]:.4f} -> {last[1]:.4f}; kl(base || tuned) on x~: {first[2]:.2e} -> {last[2]:.2e}")
    print(f"entries changed: {int(changed.sum())} (all inside the mask of {nnz}); "
          f"outside the mask bit-exact: {bool(torch.equal(weight.detach().view(-1)[outside], base_weight.view(-1)[outside]))}")
    print(f"swapping the originals back restores the base model bit-exactly: {bool(torch.equal(restored, base_weight))}")
    print(f"{args.steps} steps in {elapsed:.2f} s")
    print("backends used on cpu: " + ", ".join(
        f"{name}={_backend.select(name, entry.kernels, torch.device('cpu'))[0]}" for name, entry in ops.OPS.items()))
    ok = last[1] < first[1] and not bool(changed[outside].any())
    return 0 if ok else 1
