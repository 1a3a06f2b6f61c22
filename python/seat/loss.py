"""The SEAT loss of a paired batch on a patched model.

    L = CE(answer tokens of x) + kl_weight * KL(p_base(. | x~) || p_theta(. | x~))

1. Reference forward on x~ through the decoder, inside handle.reference() (the base
   model: original values swapped into the masked entries), without grad.
2. Current forward on x and x~ together as one batch of 2B sequences.
3. The loss from hidden states and the frozen lm_head with
   seat.ops.fused_linear_paired_loss, over only the rows that count (answer positions of
   x, KL positions of x~), so no N x V logits exist. Models whose logits are not a plain
   linear map of the hidden state (final logit soft-capping, a logit scale) take
   seat.ops.paired_loss on logits of those rows instead.

With kl_weight == 0 (the sparse-only ablation) steps 1 and 2 run on x only: the KL term
would add nothing to the loss or its gradient, so x~ is not run and the KL reads NaN.

Batch (from seat.PairedCollator), all (B, T):
  input_ids, attention_mask, labels (-100 where no loss; HF convention: labels[t] is the
  token at t, predicted from position t-1), pert_input_ids, pert_attention_mask and
  pert_kl_mask (bool: the positions of x~ whose next-token prediction counts; optional
  with kl_tokens="all": then every non-pad position followed by a non-pad token).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
from torch import Tensor

from . import ops
from ._constants import IGNORE_INDEX
from ._modes import eval_mode


@dataclasses.dataclass
class SeatLoss:
    loss: Tensor  # scalar, differentiable: ce + kl_weight * kl
    ce: Tensor  # scalar
    kl: Tensor  # scalar; NaN when kl_weight == 0 (x~ is not run then)
    n_ce_tokens: int
    n_kl_tokens: int  # 0 when kl_weight == 0


REQUIRED_KEYS = ("input_ids", "attention_mask", "labels", "pert_input_ids", "pert_attention_mask")


def _check_batch(batch: Mapping[str, Tensor], kl_tokens: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; build batches with seat.PairedCollator")
    shape = batch["input_ids"].shape
    for key in (*REQUIRED_KEYS, "pert_kl_mask"):
        if key in batch and batch[key].shape != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, batch['input_ids'] {tuple(shape)}: "
                             "x and x~ must be padded to the same length (seat.PairedCollator does this)")
    if kl_tokens == "answer" and "pert_kl_mask" not in batch:
        raise ValueError("kl_tokens='answer' needs batch['pert_kl_mask'] (seat.PairedCollator(kl_tokens='answer'))")


def kl_row_mask(batch: Mapping[str, Tensor]) -> Tensor:
    """(B, T) bool: the positions of x~ whose next-token prediction enters the KL:
    batch["pert_kl_mask"] when given, else every non-pad position followed by a real token."""
    if "pert_kl_mask" in batch:
        return batch["pert_kl_mask"].bool()
    mask = batch["pert_attention_mask"].bool()
    rows = torch.zeros_like(mask)
    rows[:, :-1] = mask[:, :-1] & mask[:, 1:]
    return rows


def _position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def decoder_candidates(model) -> list[torch.nn.Module]:
    """The modules that may be `model`'s decoder (hidden states in, lm_head after), most
    likely first: transformers' get_decoder(), base_model, then the usual attribute names.
    Composite models (Llama 4, Mllama) name a base_model_prefix ("language_model") they
    do not have, so base_model and get_decoder() can be the model itself; those are left
    out. seat.patch keeps the first that reproduces the model's logits (see
    check_logits_from_hidden)."""
    found = []
    getter = getattr(model, "get_decoder", None)
    if callable(getter):
        try:
            found.append(getter())
        except Exception:  # a get_decoder that does not apply to this model
            pass
    found.append(getattr(model, "base_model", None))
    for attr in ("model", "transformer", "language_model", "decoder", "gpt_neox", "backbone"):
        found.append(getattr(model, attr, None))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for module in found:
        if isinstance(module, torch.nn.Module) and module is not model and module is not head and \
                all(module is not m for m in out):
            out.append(module)
    return out


def _decoder(model) -> torch.nn.Module:
    """The decoder seat.patch validated for `model` (else the first candidate)."""
    handle = getattr(model, "_seat_handle", None)
    decoder = getattr(handle, "decoder", None)
    if decoder is not None:
        return decoder
    candidates = decoder_candidates(model)
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no decoder module (get_decoder(), base_model, .model)")
    return candidates[0]


def _hidden(model, input_ids: Tensor, attention_mask: Tensor, decoder: torch.nn.Module | None = None) -> Tensor:
    """(B, T, H) last hidden states of `decoder` (default: the one seat.patch validated)."""
    decoder = _decoder(model) if decoder is None else decoder
    position_ids = _position_ids(attention_mask)
    if getattr(getattr(model, "_seat_handle", None), "_sharding", None) is not None:
        return _hidden_through_root(model, decoder, input_ids, attention_mask, position_ids)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out[0]


def _hidden_through_root(model, decoder, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """The decoder's hidden states from the root model's forward (FSDP2: the root's forward
    all-gathers the root's weights, lm_head's among them, and schedules the end of
    backward; a call of the decoder alone would skip both), with logits for the last
    position only."""
    seen = []
    hook = decoder.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=1)
    finally:
        hook.remove()
    return seen[-1]


def logit_transform(config):
    """What the model does to lm_head's output, if anything: None or a callable.
    Known: a logit scale (Cohere: logits * logit_scale), a logit divisor (Granite:
    logits / logits_scaling) and final soft-capping (Gemma2). seat.patch checks on a probe
    input that this reproduces the model's own logits and refuses a model where it does not."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    scale = None if scale in (None, 1, 1.0) else scale
    divisor = None if divisor in (None, 1, 1.0) else divisor
    if not cap and scale is None and divisor is None:
        return None

    def transform(logits: Tensor) -> Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def _probe_ids(model, head) -> Tensor:
    """(1, 8) token ids valid for both the input embedding and the output head (their
    vocabularies can differ: a padded input table, a head over fewer tokens)."""
    vocab = head.weight.shape[0]
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embed, "num_embeddings", None)
    if isinstance(rows, int) and rows > 0:
        vocab = min(vocab, rows)
    return (torch.arange(8, device=head.weight.device) * 7919 % vocab).unsqueeze(0)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _probe_decoder(model, decoder, head, ids, mask, expected, transform) -> str | None:
    """None if lm_head(decoder(ids)) (transformed) gives `expected`, else why not."""
    label = type(decoder).__name__
    try:
        hidden = _hidden(model, ids, mask, decoder)
    except Exception as exc:
        return f"{label} failed on the probe ({_why(exc)})"
    if not isinstance(hidden, Tensor) or hidden.shape[:-1] != ids.shape:
        return f"{label} does not return (batch, tokens, hidden) hidden states first"
    width = head.weight.shape[1]
    if hidden.shape[-1] != width:
        return (f"{label} gives hidden states of width {hidden.shape[-1]} but the output head takes {width}: "
                "a layer between them (a projection or prediction head) that SEAT's loss from hidden states "
                "would skip")
    try:
        got = head(hidden)
        got = transform(got) if transform is not None else got
    except Exception as exc:
        return f"lm_head fails on {label}'s hidden states ({_why(exc)})"
    tol = 1e-4 if expected.dtype == torch.float32 else 3e-2
    if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol):
        return (f"the logits are not lm_head({label} hidden states) up to a known scale or soft-cap "
                "(seat.loss.logit_transform; supported: plain heads, logit_scale, logits_scaling, "
                "final_logit_softcapping)")
    return None


def _probe(model) -> tuple[torch.nn.Module | None, list[str]]:
    """(the first decoder candidate that reproduces the model's logits on a probe, or
    None; why each one tried does not). The model's own forward raises through."""
    head = model.get_output_embeddings()
    ids = _probe_ids(model, head)
    mask = torch.ones_like(ids)
    transform = logit_transform(model.config)
    with eval_mode(model):
        expected = model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), use_cache=False).logits
        reasons = []
        for decoder in decoder_candidates(model):
            reason = _probe_decoder(model, decoder, head, ids, mask, expected, transform)
            if reason is None:
                return decoder, reasons
            reasons.append(reason)
        return None, reasons or ["no decoder module found (get_decoder(), base_model, .model, .transformer)"]


@torch.no_grad()
def check_logits_from_hidden(model) -> torch.nn.Module:
    """The decoder of `model` whose hidden states, through lm_head and logit_transform,
    give the model's own logits: the one SEAT's loss will run. One 8-token forward of a
    probe sequence, then one per decoder candidate (decoder_candidates) until one fits.
    Raises ValueError naming the model class and the reason when none fits (the loss
    would be silently wrong), and when the probe itself fails."""
    name = type(model).__name__
    try:
        decoder, reasons = _probe(model)
    except Exception as exc:
        raise ValueError(f"seat.patch cannot use {name}: its forward fails on an 8-token probe "
                         f"({_why(exc)})") from exc
    if decoder is None:
        raise ValueError(f"seat.patch cannot use {name}: SEAT's loss from hidden states would be wrong for it; "
                         + "; ".join(dict.fromkeys(reasons)))
    return decoder


def params_reached(model, decoder: torch.nn.Module) -> set[int]:
    """ids of the floating parameters of `decoder` that a gradient of its hidden states
    reaches on the probe sequence: found by walking the autograd graph of one 8-token
    forward (eval mode, no backward, so no gradient is formed). A parameter the forward
    never uses (cross-attention without encoder states, an image tower) or uses only
    through a non-differentiable step (a top-k index selection) is not reached.
    requires_grad flags are restored."""
    params = [p for p in decoder.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    ids = _probe_ids(model, model.get_output_embeddings())
    mask = torch.ones_like(ids)
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad(), eval_mode(model):
            hidden = _hidden(model, ids, mask, decoder)
        reached, seen, stack = set(), set(), [hidden.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
            if variable is not None:
                reached.add(id(variable))
            stack.extend(n for n, _ in node.next_functions)
        return reached
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def seat_loss(handle, batch: Mapping[str, Tensor], *, num_items_in_batch=None, kl_num_items=None) -> SeatLoss:
    config, model = handle.config, handle.model
    _check_batch(batch, config.kl_tokens)
    x_ids, x_mask = batch["input_ids"], batch["attention_mask"]
    p_ids, p_mask = batch["pert_input_ids"], batch["pert_attention_mask"]
    n = x_ids.shape[0]
    shifted = batch["labels"][:, 1:]
    ce_rows = shifted != IGNORE_INDEX
    if config.kl_weight == 0:
        # The KL term has no weight: skip x~ altogether (no reference forward, no
        # forward and backward of the perturbed half) so that a sparse-only run costs
        # what plain CE costs. The KL is not computed and reads NaN.
        hidden = _hidden(model, x_ids, x_mask)
        rows = hidden[:, :-1][ce_rows]
        ref_hidden = rows.new_empty(0, rows.shape[-1]).detach()
    else:
        kl_rows = kl_row_mask(batch)
        with handle.reference():
            ref_hidden = _hidden(model, p_ids, p_mask)[kl_rows]
        hidden = _hidden(model, torch.cat([x_ids, p_ids]), torch.cat([x_mask, p_mask]))
        rows = torch.cat([hidden[:n, :-1][ce_rows], hidden[n:][kl_rows]])
    labels = shifted[ce_rows]
    options = dict(kl_weight=config.kl_weight, temperature=config.temperature, reverse_kl=config.reverse_kl,
                   ce_num_items=None if num_items_in_batch is None else float(num_items_in_batch),
                   kl_num_items=None if kl_num_items is None else float(kl_num_items))

    head = model.get_output_embeddings()
    transform = logit_transform(model.config)
    if transform is None:
        loss, ce, kl = ops.fused_linear_paired_loss(rows, head.weight, labels, ref_hidden, None, head.bias,
                                                    chunk_size=config.chunk_size, **options)
    else:  # soft-capping or a logit scale: logits of the counted rows only
        logits = transform(head(rows).float())
        with torch.no_grad():
            ref_logits = transform(head(ref_hidden).float())
        loss, ce, kl = ops.paired_loss(logits, labels, ref_logits, None, **options)
    if config.kl_weight == 0:
        kl = torch.full_like(kl.detach(), float("nan"))
    return SeatLoss(loss, ce, kl, int(labels.numel()), int(ref_hidden.shape[0]))
