"""SeatSFTTrainer: SEAT inside TRL's SFTTrainer (``pip install seat[trl]``).

    from seat.integrations.trl import SeatSFTTrainer

SeatSFTTrainer = seat.trainer.SeatTrainerMixin + trl.SFTTrainer: SeatTrainer's training
(patched model, SparseAdamW over the masks, CE + entity-perturbation KL normalized over the
accumulated batch, non-finite handling, delta checkpoints, bit-exact resume) with
SFTTrainer's arguments (an SFTConfig, a model or a model id, TRL's dataset formats).

Datasets: TRL's prompt-completion (plain or conversational) or conversational "messages"
format, each row with its subject entity in a column ("entity" by default); see
seat.data_formats. SFTTrainer's own preparation (tokenizing, truncating, packing) is
skipped (``dataset_kwargs={"skip_prepare_dataset": True}`` on a copy of the config): the
rows go as they are to seat.data_formats.SFTPairedCollator, which builds the paired batches
x / x~ with answer-only labels. Every row is checked before anything is patched or loaded.
"""
from __future__ import annotations

import copy

try:
    import datasets
    import trl
    from trl import SFTConfig, SFTTrainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"seat.integrations.trl needs TRL and datasets ({e}); install them with "
                      "`pip install seat[trl]`") from e

import transformers
from packaging.version import Version

from ..config import SeatConfig
from ..data_formats import SFTPairedCollator, detect_format, to_seat_record
from ..messages import message_texts
from ..patching import handle_of
from ..perturb import EntityPerturber, count_mentions
from ..trainer import SeatTrainerMixin

MIN_TRL = "1.10"
if Version(trl.__version__) < Version(MIN_TRL):  # pragma: no cover - depends on the environment
    raise ImportError(f"seat.integrations.trl needs trl>={MIN_TRL}; found {trl.__version__}: "
                      "`pip install -U seat[trl]`")

__all__ = ["SeatSFTTrainer"]

# SFTTrainer arguments that change the loss or the model in ways SEAT cannot take.
_REFUSED_KWARGS = {
    "peft_config": "SEAT trains a sparse subset of the model's own weights; drop peft_config",
    "quantization_config": "SEAT updates weights in place and cannot train quantized ones; load the model unquantized",
    "formatting_func": "a formatting function turns records into plain text, which has no prompt/answer split; "
                       "give prompt-completion or messages records instead",
    "compute_loss_func": "the loss is SEAT's CE + KL (seat.SeatConfig.kl_weight sets the mix)",
}


def _sft_config(args) -> SFTConfig:
    """A copy of ``args`` as an SFTConfig (TrainingArguments are converted as SFTTrainer
    does) with skip_prepare_dataset set; the caller's object is not changed."""
    if args is None:
        raise ValueError("SeatSFTTrainer needs args: pass args=trl.SFTConfig(output_dir=...)")
    if not isinstance(args, transformers.TrainingArguments):
        raise TypeError(f"args must be a trl.SFTConfig (or transformers.TrainingArguments); got {type(args).__name__}")
    if isinstance(args, SFTConfig):
        args = copy.copy(args)
    else:
        values = args.to_dict()
        values["hub_token"] = args.hub_token  # to_dict hides it
        args = SFTConfig(**values)
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    return args


def _check_config(args: SFTConfig, kwargs: dict) -> None:
    for name, why in _REFUSED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"SeatSFTTrainer does not take {name}: {why}")
    refused = [
        (args.packing or args.padding_free, "packing / padding_free: SEAT's batches pair each record with its "
                                            "perturbed copy, row by row; set packing=False and padding_free=False"),
        (args.completion_only_loss is False, "completion_only_loss=False: SEAT trains on the answer only (the "
                                             "completion or the last assistant message); leave it None or True"),
        (args.assistant_only_loss, "assistant_only_loss=True: SEAT trains on the last assistant message only, not "
                                   "on every assistant turn; set assistant_only_loss=False"),
        (args.loss_type != "nll", f"loss_type={args.loss_type!r}: the loss is SEAT's CE + KL; set loss_type='nll'"),
        (args.label_smoothing_factor > 0, "label_smoothing_factor > 0: the CE of SEAT's loss has no label "
                                          "smoothing; set it to 0"),
        (args.chat_template_path is not None, "chat_template_path: set tokenizer.chat_template before building "
                                              "the trainer (the collator reads it)"),
    ]
    for bad, why in refused:
        if bad:
            raise ValueError(f"SeatSFTTrainer cannot train with {why}")


def _as_dataset(dataset, name: str):
    if isinstance(dataset, list):
        return datasets.Dataset.from_list(dataset)
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"{name} must be a datasets.Dataset, a datasets.IterableDataset or a list of dicts; got "
                        f"{type(dataset).__name__}")
    return dataset


def _check_rows(dataset, name: str, dataset_format: str, entity_column: str) -> list[str]:
    """Every row of a map-style dataset (the first of an iterable one) converts to a SEAT
    record that mentions its entity; returns the entities seen. Errors name the row."""
    columns = dataset.column_names or list(next(iter(dataset)))
    if entity_column not in columns:
        raise ValueError(f"{name} has no {entity_column!r} column (columns: {columns}): SEAT needs each record's "
                         f"subject entity to build its perturbed copy; add a column {entity_column!r} with the name "
                         "of the person each record is about, or name your column with entity_column=...")
    for column in ("tools", "chat_template_kwargs"):
        if column in columns:
            raise ValueError(f"{name} has a {column!r} column, which SeatSFTTrainer does not pass to the chat "
                             "template; drop the column")
    rows = dataset if isinstance(dataset, datasets.Dataset) else [next(iter(dataset))]
    entities = []
    for j, row in enumerate(rows):
        record = to_seat_record(row, dataset_format, entity_column, f"{name} row {j}")
        entity = record["entity"]
        texts = [*message_texts(record["question"]), record["answer"]]
        if sum(count_mentions(text, entity) for text in texts) == 0:
            raise ValueError(f"{name} row {j} (entity {entity!r}): entity {entity!r} is mentioned in neither its "
                             "prompt nor its answer; spell it exactly as in the text (whole word, same capitalization)")
        entities.append(entity)
    return entities


class SeatSFTTrainer(SeatTrainerMixin, SFTTrainer):
    """trl.SFTTrainer for SEAT (see the module docstring and seat.SeatTrainer).

    Args:
        model: a causal LM (patched here with seat_config unless already patched) or a
            model id / path, loaded as SFTTrainer loads it (args.model_init_kwargs).
        args: a trl.SFTConfig (a transformers.TrainingArguments is converted, as
            SFTTrainer does). Used on a copy. max_length bounds x and x~ (a longer row is
            an error, never truncated). Refused: packing, padding_free,
            completion_only_loss=False, assistant_only_loss=True, loss_type other than
            "nll", label smoothing, chat_template_path.
        train_dataset, eval_dataset: datasets (or lists of dicts) in one of TRL's formats
            (seat.data_formats), each row with its entity.
        processing_class: the tokenizer (None: loaded from the model's id). Without a
            pad token it gets args.pad_token or its eos token, as in SFTTrainer.
        data_collator: None builds seat.data_formats.SFTPairedCollator for the format of
            the first training row, with ``perturber``; or your own paired collator.
        entity_column: the column holding each row's entity.
        perturber: the seat.perturb.EntityPerturber of the fictitious names (None:
            EntityPerturber(exclude=every entity of the datasets, seed=args.seed); an
            IterableDataset needs one, as its entities cannot be listed up front).
        seat_config, save_full_model, optimizer_kwargs, nonfinite: as seat.SeatTrainer.
        **kwargs: go to trl.SFTTrainer (callbacks, compute_metrics, ...);
            peft_config, quantization_config, formatting_func and compute_loss_func are
            refused, and so is an optimizer (SEAT makes its own).

    Logged per step: loss, ce, kl and nonfinite_skipped, as SeatTrainer logs them
    (SFTTrainer's entropy, mean_token_accuracy and num_tokens are not computed).
    """

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, *, entity_column: str = "entity", perturber: EntityPerturber | None = None,
                 seat_config: SeatConfig | None = None, save_full_model: bool = False,
                 optimizer_kwargs: dict | None = None, nonfinite: str = "skip", **kwargs):
        args = _sft_config(args)
        _check_config(args, kwargs)
        if train_dataset is None:
            raise ValueError("SeatSFTTrainer needs a train_dataset")
        train_dataset = _as_dataset(train_dataset, "train_dataset")
        if isinstance(train_dataset, datasets.Dataset) and len(train_dataset) == 0:
            raise ValueError("train_dataset is empty; give at least one record")
        named = {"train_dataset": train_dataset}
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: _as_dataset(v, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()}
            named.update({f"eval_dataset[{k!r}]": v for k, v in eval_dataset.items()})
        elif eval_dataset is not None:
            eval_dataset = named["eval_dataset"] = _as_dataset(eval_dataset, "eval_dataset")
        if args.shuffle_dataset:  # SFTTrainer shuffles while preparing, which is skipped
            train_dataset = train_dataset.shuffle(seed=args.seed)

        collator = data_collator
        if data_collator is None or isinstance(collator, SFTPairedCollator):
            dataset_format = (collator.dataset_format if collator is not None
                              else detect_format(next(iter(train_dataset)), "train_dataset row 0"))
            entity_column = collator.entity_column if collator is not None else entity_column
            entities = []
            for name, dataset in named.items():
                entities += _check_rows(dataset, name, dataset_format, entity_column)
        if isinstance(model, str):
            model = trl.trainer.utils.create_model_from_path(model, **dict(args.model_init_kwargs or {}))
        if processing_class is None:
            model_id = getattr(model.config, "_name_or_path", None)
            if not model_id:
                raise ValueError("SeatSFTTrainer needs processing_class (the tokenizer): the model has no id to load "
                                 "one from")
            processing_class = transformers.AutoTokenizer.from_pretrained(model_id)
        if data_collator is None:
            if perturber is None:
                if not isinstance(train_dataset, datasets.Dataset):
                    raise ValueError("an IterableDataset needs perturber=EntityPerturber(exclude=[every training "
                                     "entity]): its entities cannot be listed up front")
                perturber = EntityPerturber(exclude=sorted(set(entities)), seed=args.seed)
            if processing_class.pad_token is None:  # as SFTTrainer does
                processing_class.pad_token = args.pad_token or processing_class.eos_token
            handle = handle_of(model)
            config = seat_config or (handle.config if handle is not None else SeatConfig())
            data_collator = SFTPairedCollator(processing_class, perturber, dataset_format=dataset_format,
                                              entity_column=entity_column, max_length=args.max_length,
                                              kl_tokens=config.kl_tokens)
        elif perturber is not None:
            raise ValueError("perturber is used only by the collator SeatSFTTrainer builds; give it to your "
                             "data_collator instead")
        super().__init__(model, args, seat_config=seat_config, save_full_model=save_full_model,
                         optimizer_kwargs=optimizer_kwargs, nonfinite=nonfinite, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # SFTTrainer's reads logits from the outputs; SEAT's loss gives ce and kl instead.
        return transformers.Trainer.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys)
