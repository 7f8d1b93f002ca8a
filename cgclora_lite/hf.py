"""Training adapters with ``transformers.Trainer``: task ids as a dataset column.

The recipe, in full::

    adapters = inject(model, CGCConfig(), tasks=["topic", "sentiment"])
    data = MultiTaskDataset(cluster_tasks, tokenizer, "train", max_length=96)
    args = TrainingArguments(output_dir="out", remove_unused_columns=False, report_to=[], ...)
    trainer = make_trainer(adapters, data, args, pad_token_id=tokenizer.pad_token_id)
    trainer.train()

How the task ids travel. Each row carries its ``task_id`` (``MultiTaskDataset`` items, or the
``task_id`` column of ``to_hf_dataset``); ``data.Collator`` turns a list of rows into a batch
with ``input_ids``, ``attention_mask``, ``labels`` (B, L) and ``task_ids`` (B,). Trainer calls
``model(**batch)``: the forward pre-hook that ``inject`` installed pops ``task_ids`` and routes
them to every adapted layer for that call (a ``DistributedDataParallel`` wrapper calls the
same module, so the hook runs under ``torchrun`` too). ``CGCTrainer.training_step`` goes one
step further and holds the route for the whole forward *and backward* pass, so that activation
checkpointing, which re-runs forwards during backward, sees the task ids as well.

What Trainer needs told:

* ``remove_unused_columns=False``. Trainer keeps only the columns named in ``model.forward``'s
  signature, and ``task_id`` is not one of them (it is popped by a hook, not a forward
  argument): with the default ``True`` the task ids are silently dropped before collation.
  ``make_trainer`` refuses such arguments.
* the collator (``data.Collator``), which pads and builds ``task_ids``.
* nothing about ``label_names``: Trainer reads ``["labels"]`` from the forward signature of
  a causal LM, and ``task_ids`` stays an input, not a label.
* nothing about trainable parameters: ``inject`` froze every base parameter, and Trainer's
  optimizer takes only parameters with ``requires_grad`` (the experts and the gates);
  ``make_trainer`` checks that these are exactly ``adapters.parameters()``.

The loss Trainer optimises is the model's own ``labels`` loss, on the answer-only labels of
``data.encode``: with ``num_items_in_batch`` = N answer tokens of the whole accumulated batch
(all ranks together, ``average_tokens_across_devices=True``),

    L = - 1/N * sum over answer tokens i of log p(y_i | tokens before i)

which for one batch on one process is the value of our ``train.answer_loss``. Two differences
from our ``train.train``: the head runs over every position (the full vocabulary at every
token, slower), and with gradient accumulation Trainer weights micro-batches by their answer
tokens, where ``train`` averages their means.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from .adapters import AdapterSet
from .data import Collator, MultiTaskDataset


def to_hf_dataset(data: MultiTaskDataset):
    """The rows of ``data`` as a ``datasets.Dataset``: ``input_ids``, ``labels``,
    ``prompt_length``, ``task_id`` (int) and ``task`` (its name), one row per example.

    For pipelines that want an Arrow table (``map``, ``shuffle``, ``save_to_disk``); Trainer
    also takes ``data`` itself.
    """
    import datasets  # slow to import; only this helper needs it

    return datasets.Dataset.from_list(list(data.items))


class CGCTrainer(Trainer):
    """``transformers.Trainer`` that routes each batch's ``task_ids`` for the whole step.

    ``training_step`` pops ``task_ids`` (B,) from the batch and runs the forward and the backward
    pass inside ``adapters.route(task_ids)``; evaluation and prediction pass ``task_ids`` on to
    ``model(...)``, where the injection hook routes them. Build it with ``make_trainer``.
    """

    def __init__(self, *args, adapters: AdapterSet, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapters = adapters

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None):
        if "task_ids" not in inputs:
            raise KeyError(
                "the batch has no 'task_ids': use data.Collator as data_collator and "
                "remove_unused_columns=False, so that each row's task_id reaches the collator"
            )
        inputs = dict(inputs)
        task_ids = inputs.pop("task_ids")  # (B,)
        with self.adapters.route(task_ids):
            return super().training_step(model, inputs, num_items_in_batch)


def make_trainer(adapters: AdapterSet, train_dataset, args, eval_dataset=None, *,
                 pad_token_id: int, **trainer_kwargs):
    """A ``CGCTrainer`` (a ``transformers.Trainer``) that trains ``adapters`` and nothing else.

    ``train_dataset`` / ``eval_dataset``: rows with ``input_ids``, ``labels`` and ``task_id``
    (a ``MultiTaskDataset`` or ``to_hf_dataset(...)``). ``args``: ``TrainingArguments`` with
    ``remove_unused_columns=False``. ``pad_token_id``: the tokenizer's pad id for
    ``data.Collator``. Other keyword arguments go to ``Trainer`` (callbacks, optimizers, ...).
    """
    if args.remove_unused_columns:
        raise ValueError(
            "TrainingArguments(remove_unused_columns=False) is required: Trainer drops every "
            "column that model.forward does not name, which includes task_id, so the task ids "
            "would never reach the adapters"
        )
    if not adapters.is_attached:
        raise RuntimeError("these adapters are detached from their model: call attach() first")
    trainable = {id(p) for p in adapters.model.parameters() if p.requires_grad}
    ours = {id(p) for p in adapters.parameters()}
    if trainable != ours:
        extra = [n for n, p in adapters.model.named_parameters() if p.requires_grad and id(p) not in ours]
        raise ValueError(
            f"the model has trainable parameters besides the adapters ({extra[:3]}...) or frozen "
            "adapter parameters; Trainer would train exactly the parameters with requires_grad"
        )
    trainer_kwargs.setdefault("data_collator", Collator(pad_token_id))
    return CGCTrainer(model=adapters.model, args=args, train_dataset=train_dataset,
                      eval_dataset=eval_dataset, adapters=adapters, **trainer_kwargs)
