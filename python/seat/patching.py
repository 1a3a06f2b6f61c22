"""seat.patch(model): make a Hugging Face causal LM ready for memory-efficient SEAT.

Nothing in the model's code is rewritten and no second model is made. Patching

  * finds the decoder whose hidden states, through lm_head, give the model's logits (a
    probe forward, seat.loss.check_logits_from_hidden) and refuses the model with the
    reason when there is none;
  * freezes every parameter but the target weights (the decoder's linear layers and
    fused mixture-of-experts tensors by default, see seat.targeting; GPT-2's Conv1D
    counts as linear), remembering each requires_grad flag, and logs (logger "seat",
    INFO) one line of what it targets and what it skips, and why
    (handle.targeting_report() has the details);
  * builds a mask per target weight (seat.masks) and stores the weight's original values
    at the masked entries (the only base values SEAT ever changes); a bitsandbytes 4-bit
    target (Linear4bit) instead keeps its packed weight untouched and trains a delta
    beside it, one value per mask entry (QSEAT: seat.quant);
  * returns a SeatHandle that gives the optimizer (seat.optim.SparseAdamW, whose hooks
    compact each dense gradient as it is produced), the base model on demand
    (`with handle.reference():` swaps the original values in and back), the SEAT loss of
    a paired batch, delta checkpoints, and the way back (unpatch keeps the trained
    weights, revert restores the original ones bit-exactly).

(The module is seat.patching, not seat.patch: a submodule named like the function
`seat.patch` would replace it as an attribute of the package once imported.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator, Mapping

import torch
from torch import Tensor

from . import ops
from ._modes import eval_mode
from .config import SeatConfig
from .masks import Mask, as_mask, build_mask, encode_chosen, mask_indices, mask_nnz, mask_swap_
from .targeting import TargetingReport, select_targets

_HANDLE_ATTR = "_seat_handle"
_log = logging.getLogger("seat")


@dataclasses.dataclass
class Target:
    """One trained weight: its module, the mask and the base values at the mask."""

    name: str  # parameter name in the model, e.g. "model.layers.0.self_attn.q_proj.weight"
    module: torch.nn.Module  # the module holding it (a linear layer, or a block of fused experts)
    param: torch.nn.Parameter
    idx: Tensor | Mask  # (nnz,) int32 sorted flat positions in param.view(-1), or a mask in another encoding
    original: Tensor  # (nnz,) param.dtype: the base values there
    # under FSDP2 (seat.distributed.shard): param is the DTensor, idx and original cover
    # the rank's rows only, and shard says where they sit in the whole weight
    shard: object = None


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, across transformers versions."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or attr in getattr(model, "__dict__", {}):
            return bool(getattr(model, attr))
    return False


def patch(model: torch.nn.Module, config: SeatConfig | None = None, *, masks: Mapping[str, Tensor] | None = None,
          **kwargs) -> "SeatHandle":
    """Patch `model` for SEAT and return its SeatHandle.

    config: a SeatConfig, or its fields as keywords (`seat.patch(model, density=0.05)`).
    masks: optional {parameter name: int32 indices} overriding the configured mask kind
        (e.g. importance masks from seat.masks.ImportanceScores).
    """
    if config is None:
        config = SeatConfig(**kwargs)
    elif kwargs:
        raise TypeError(f"pass either a SeatConfig or its fields as keywords, not both (got {sorted(kwargs)})")
    if not isinstance(config, SeatConfig):
        raise TypeError(f"config must be a seat.SeatConfig; got {type(config).__name__}")
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise RuntimeError("this model is already patched by seat: call handle.unpatch() (or handle.revert()) "
                           "before patching it again")
    from .distributed._local import is_dtensor

    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} is sharded (FSDP2's fully_shard made its parameters DTensors): "
                         "seat.patch takes the unsharded model. Patch it first, then call "
                         "seat.distributed.shard(handle), which applies fully_shard itself")
    return SeatHandle(model, config, masks)


class SeatHandle:
    """The patched state of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, config: SeatConfig, masks: Mapping[str, Tensor] | None):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"{type(model).__name__} has no linear output head (get_output_embeddings()): "
                             "seat.patch takes a causal LM, e.g. AutoModelForCausalLM, not a bare decoder")
        from .loss import check_logits_from_hidden, params_reached

        from . import quant

        self._repacking = quant.disable_cpu_repacking(model)  # before any probe forward (seat.quant)
        try:
            self._setup(model, config, masks, check_logits_from_hidden, params_reached)
        except BaseException:
            quant.restore_cpu_repacking(model, self._repacking)
            raise
        setattr(model, _HANDLE_ATTR, self)
        self._patched = True
        _log.info(self._report.summary())

    def _setup(self, model, config, masks, check_logits_from_hidden, params_reached) -> None:
        """Everything __init__ does, checked before the model is changed (its flags, then
        the 4-bit targets' forwards, are changed last)."""
        from .quant import QuantTarget, is_4bit_linear, settings_of
        from .quant._target import Switch

        decoder = check_logits_from_hidden(model)
        chosen, report = select_targets(model, config.targets, decoder, params_reached(model, decoder))
        self.model = model
        self.config = config
        self.decoder = decoder  # the module whose hidden states SEAT's loss reads (the probe checked it)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._optimizer = None
        self._sharding = None  # FSDP2 (seat.distributed.shard)
        self._in_reference = False
        self._deltas_on = Switch()  # the 4-bit targets' deltas, off inside reference()
        self.targets: dict[str, Target | QuantTarget] = {}
        for name, module, weight in chosen:
            if is_4bit_linear(module):  # QSEAT: a delta beside the packed weight (seat.quant)
                settings = settings_of(name, module)
                idx = self._build_mask(name, self._mask_source(module, settings, name, masks), masks,
                                       device=weight.device)
                self.targets[name] = QuantTarget.create(name, module, idx, settings, self._deltas_on)
                continue
            if not weight.is_contiguous():
                raise ValueError(f"{name} is not contiguous; seat masks index a weight's flat storage")
            idx = self._build_mask(name, weight, masks)
            original = weight.detach().view(-1)[mask_indices(idx).long()].clone()
            self.targets[name] = Target(name, module, weight, idx, original)
        report.trained_entries = {name: mask_nnz(t.idx) for name, t in self.targets.items()}
        self._report = report
        if masks is not None:
            unknown = sorted(set(masks) - set(self.targets))
            if unknown:
                raise ValueError(f"masks given for parameters that are not targets: {unknown[:5]}")
        for p in model.parameters():
            p.requires_grad_(False)
        for target in self.targets.values():
            target.param.requires_grad_(True)
        installed = []
        try:
            for target in self._quant_targets():
                target.install()
                installed.append(target)
        except BaseException:
            for target in installed:
                target.uninstall()
            for name, p in model.named_parameters():
                p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
            raise
        if _checkpointing(model) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input

    def _mask_source(self, module, settings, name: str, masks):
        """What a 4-bit weight's mask is drawn from: its dequantized values for a magnitude
        mask, else only its shape (a meta tensor: nothing is allocated)."""
        from .quant._target import dequantized

        if self.config.mask == "magnitude" and not (masks is not None and name in masks):
            return dequantized(module, torch.float32)
        return torch.empty(settings.shape, device="meta")

    def _quant_targets(self) -> list:
        from .quant import QuantTarget

        return [t for t in self.targets.values() if isinstance(t, QuantTarget)]

    def _build_mask(self, name: str, weight: Tensor, masks, device=None):
        """The target's mask: the one given in `masks` (int32 indices, stored in the config's
        mask_encoding when that is an explicit one, or a Mask), else drawn by the config,
        on `device` (default: the weight's)."""
        c = self.config
        device = weight.device if device is None else device
        if masks is not None and name in masks:
            mask = as_mask(masks[name], weight.numel(), f"masks[{name!r}]")
            if isinstance(masks[name], Tensor):  # given entries, stored as the config says
                return encode_chosen(mask.indices().to(device), weight.numel(), c.mask_encoding)
            return mask if mask.device == device else mask.to(device)
        return build_mask(name, weight.detach(), c.density, kind=c.mask, seed=c.seed, encoding=c.mask_encoding,
                          device=device)

    # ------------------------------------------------------------------ queries
    def _check_patched(self) -> None:
        if not self._patched:
            raise RuntimeError("this SeatHandle was unpatched; patch the model again to use it")

    def targeting_report(self) -> TargetingReport:
        """What seat.patch targets and what it does not, with the reason for each
        parameter left untrained (str() of it is a table; .summary() the logged line)."""
        return self._report

    @property
    def num_trainable(self) -> int:
        """Entries that train (the sum of the masks' sizes; of the whole weights on a
        sharded model)."""
        return sum(t.shard.nnz if getattr(t, "shard", None) else mask_nnz(t.idx) for t in self.targets.values())

    @property
    def trainable_fraction(self) -> float:
        """num_trainable over the model's parameters, a 4-bit weight counted by its
        elements (not its packed bytes) and the deltas not counted."""
        total = sum(p.numel() for p in self.model.parameters())
        total += sum(t.weight_numel - t.module.weight.numel() - t.delta.numel() for t in self._quant_targets())
        return self.num_trainable / total

    # ------------------------------------------------------------------ training pieces
    def optimizer(self, lr: float = 1e-4, **kwargs):
        """seat.optim.SparseAdamW over the target weights with their masks (one per handle).
        kwargs go to SparseAdamW; master_weights / stochastic_rounding / seed default to
        the config's."""
        from .optim import SparseAdamW

        self._check_patched()
        if self._optimizer is not None:
            raise RuntimeError("this handle already made its optimizer; reuse it (handle.optimizer is created once "
                               "so its gradient hooks are installed once)")
        kwargs.setdefault("master_weights", self.config.master_weights)
        kwargs.setdefault("stochastic_rounding", self.config.stochastic_rounding)
        kwargs.setdefault("seed", self.config.seed)
        params = [(name, t.param) for name, t in self.targets.items()]  # named: errors name the layer
        self._optimizer = SparseAdamW(params, {t.param: t.idx for t in self.targets.values()}, lr=lr, **kwargs)
        if self._sharding is not None:  # where each param's shard sits (whole_state_dict)
            self._optimizer._shards = {t.param: t.shard for t in self.targets.values()}
        return self._optimizer

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside the block the model is the frozen base model: the original values sit in
        the masked entries (bit-exact) and every module is in eval mode (dropout off, no
        router jitter), so the base distribution is deterministic and KL is 0 before the
        first update. On exit, even by an exception, the trained values and each module's
        own train/eval flag are back. Runs under torch.no_grad().

        While it is active nothing may write the trained state: the handle's optimizer
        refuses step() and in-backward updates, and revert(), unpatch() and save_delta()
        refuse (each would otherwise take the base values for the trained ones)."""
        self._check_patched()
        if self._in_reference:
            raise RuntimeError("handle.reference() is already active (it does not nest)")
        self._in_reference = True
        try:
            with torch.no_grad(), self._updates_forbidden():
                self._swap_all()
                self._deltas_on.on = False
                try:
                    with eval_mode(self.model):
                        yield
                finally:
                    self._deltas_on.on = True
                    self._swap_all(leaving=True)
        finally:
            self._in_reference = False

    def _updates_forbidden(self):
        """The optimizer's guard against updates while the base values are swapped in."""
        guard = getattr(self._optimizer, "updates_forbidden", None)
        if guard is None:
            return contextlib.nullcontext()
        return guard("the model holds its base values inside handle.reference(): step the optimizer (and run "
                     "backward with update_in_backward=True) outside the `with handle.reference():` block")

    def _refuse_in_reference(self, what: str) -> None:
        if self._in_reference:
            raise RuntimeError(f"cannot {what} inside `with handle.reference():` (the model holds its base values "
                               f"there, not the trained ones); call it after the block")

    def _swap_all(self, leaving: bool = False) -> None:
        """Exchange the trained and the base values of the float targets (a 4-bit target's
        base is its packed weight, never written: its delta is switched off instead).
        `leaving`: the exit of reference(), which must swap back whatever happened inside."""
        from .distributed._local import local

        if self._sharding is not None and not leaving:
            self._check_resharded()
        for t in self.targets.values():
            if isinstance(t, Target):
                mask_swap_(local(t.param).data, t.idx, t.original)
        if self._sharding is not None and leaving:  # after the swap: the trained values are back whatever it raises
            self._reshard_targets()

    def _reshard_targets(self) -> None:
        """Under FSDP2, reshard the units if a forward that raised inside reference() left a
        layer all-gathered: its all-gathered weights hold the base values, and FSDP2 would
        use them again in the next forward instead of all-gathering the trained shards."""
        if any(self._unsharded()):
            for unit in self._sharding.units:
                unit.reshard()

    def _unsharded(self) -> list[str]:
        """The targets whose module holds the all-gathered weight now (FSDP2)."""
        return [name for name, t in self.targets.items() if getattr(t.module, name.rsplit(".", 1)[-1]) is not t.param]

    def _check_resharded(self) -> None:
        """Under FSDP2 a swap reaches the next all-gather only: a layer whose weights are
        all-gathered now (between a forward and its backward without resharding) would
        keep the values it holds."""
        unsharded = self._unsharded()
        if unsharded:
            raise RuntimeError(f"{unsharded[0]} is unsharded (all-gathered) now, so handle.reference() cannot swap "
                               "the base values into it: enter reference() before a forward, or after the backward "
                               "of the previous one")

    def loss(self, batch: Mapping[str, Tensor], *, num_items_in_batch=None, kl_num_items=None):
        """The SEAT loss of a batch from seat.PairedCollator: a SeatLoss(loss, ce, kl)."""
        from .loss import seat_loss

        self._check_patched()
        return seat_loss(self, batch, num_items_in_batch=num_items_in_batch, kl_num_items=kl_num_items)

    # ------------------------------------------------------------------ deltas
    def save_delta(self, directory) -> None:
        """Write the trained values at the masks (safetensors) and seat_config.json,
        atomically. See seat.delta."""
        from .delta import save_delta

        self._check_patched()
        self._refuse_in_reference("save a delta")
        save_delta(self, directory)

    # ------------------------------------------------------------------ the way back
    def unpatch(self) -> None:
        """Remove every hook, mask and stored value; keep the trained weights (like PEFT's
        merge_and_unload) and restore each parameter's requires_grad flag.

        Refused for a model with 4-bit targets (QSEAT): their trained values are deltas
        beside the packed weights, which could take them only by being quantized again
        (losing most of the update). Keep the handle patched to use the trained model
        (its forward includes the deltas), save_delta() and load it (seat.load_delta) onto
        the 4-bit base or merged into a bf16 one, or revert()."""
        self._check_patched()
        self._refuse_in_reference("unpatch")
        quant = self._quant_targets()
        if quant:
            raise RuntimeError(f"unpatch() would lose the trained deltas of {len(quant)} 4-bit weights (e.g. "
                               f"{quant[0].name}): a 4-bit weight cannot take them without being quantized again. "
                               "Keep the model patched to use it, save_delta() and seat.load_delta() it onto a "
                               "4-bit or a bf16 base, or revert() to drop the deltas")
        self._teardown()

    def _teardown(self) -> None:
        """Remove hooks, 4-bit forwards and deltas; restore flags; forget the targets."""
        from . import quant

        if self._optimizer is not None:
            self._optimizer.remove_hooks()
        for t in self._quant_targets():
            t.uninstall()
        quant.restore_cpu_repacking(self.model, self._repacking)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        delattr(self.model, _HANDLE_ATTR)
        self.targets = {}
        self._patched = False

    def revert(self) -> None:
        """Put the original weights back (bit-exact), then unpatch. The 4-bit targets lose
        their deltas and get their own forward back (their packed weights never changed)."""
        self._check_patched()
        self._refuse_in_reference("revert")
        from .distributed._local import local

        with torch.no_grad():
            for t in self.targets.values():
                if isinstance(t, Target):
                    local(t.param).data.view(-1)[mask_indices(t.idx).long()] = t.original
        self._teardown()

    def __repr__(self) -> str:
        state = "patched" if self._patched else "unpatched"
        return (f"SeatHandle({type(self.model).__name__}, {state}, {len(self.targets)} target weights, "
                f"{self.num_trainable if self._patched else 0} trainable entries)")


def handle_of(model: torch.nn.Module) -> SeatHandle | None:
    """The SeatHandle of a patched model, else None."""
    return getattr(model, _HANDLE_ATTR, None)
