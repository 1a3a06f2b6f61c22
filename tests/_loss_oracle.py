"""The float64 oracle of the paired SEAT loss, built from torch.nn.functional (shared by
the paired_loss and fused_linear_paired_loss tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ZERO = torch.zeros((), dtype=torch.float64)


def kl_oracle_rows(cur, ref, temperature, reverse):
    """Per-row KL(p_ref || p_cur) (reverse: KL(p_cur || p_ref)) via F.kl_div, 0 * log 0 = 0."""
    log_cur = F.log_softmax(cur / temperature, dim=-1)
    log_ref = F.log_softmax(ref.double() / temperature, dim=-1)
    inp, target = (log_ref, log_cur) if reverse else (log_cur, log_ref)
    gone = target == float("-inf")
    terms = F.kl_div(torch.where(gone, ZERO, inp), torch.where(gone, ZERO, target), log_target=True,
                     reduction="none")
    return torch.where(gone, ZERO, terms).sum(-1)


def paired_terms(logits, labels, ref_logits, kl_mask=None, *, kl_weight=1.0, ignore_index=-100, temperature=1.0,
                 reduction="mean", ce_num_items=None, kl_num_items=None, reverse_kl=False):
    """(loss, ce, kl), differentiable w.r.t. the float64 CPU `logits` (x rows, then x~ rows)."""
    labels = labels.cpu().long()
    n_ce = labels.numel()
    ce = F.cross_entropy(logits[:n_ce], labels, ignore_index=ignore_index, reduction="sum")
    kl_rows = kl_oracle_rows(logits[n_ce:], ref_logits.cpu(), temperature, reverse_kl)
    if kl_mask is not None:
        kl_rows = torch.where(kl_mask.cpu(), kl_rows, ZERO)
    kl = kl_rows.sum()
    if reduction == "mean":
        n_valid = int((labels != ignore_index).sum())
        n_kl = kl_rows.numel() if kl_mask is None else int(kl_mask.sum())
        ce = ce / (ce_num_items if ce_num_items is not None else max(n_valid, 1))
        kl = kl / (kl_num_items if kl_num_items is not None else max(n_kl, 1))
    return ce + kl_weight * kl, ce, kl
