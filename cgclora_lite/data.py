"""From tasks to batches: chat-template encoding with answer-only labels, collation, sampling.

Pipeline, from text to a batch:

1. ``tasks.py`` gives ``Task`` objects (the default offline tasks or your own).
2. ``encode`` turns one example into token ids with the model's chat template::

       input_ids = [prompt tokens ........][answer tokens][<|im_end|>]
       labels    = [-100  -100 ...   -100 ][answer tokens][<|im_end|>]

   The loss mask comes from the prompt length. It cannot come from "is this padding?": the pad
   token of SmolLM2 *is* ``<|im_end|>``, and the model must learn to emit it to stop.
3. ``MultiTaskDataset`` encodes the examples of several tasks and tags each with its task id;
   ``TaskBalancedSampler`` gives every task an equal share of each batch; ``Collator`` pads a
   batch and returns ``task_ids`` of shape (batch,). ``task_balanced_loader`` strings the three
   together.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .tasks import Example, Task, truncate_words

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips
ANSWER_ROOM = 8
"""Tokens of ``max_length`` kept free for the answer when a prompt is cut for generation: an
evaluation prompt gets ``max_length - ANSWER_ROOM`` tokens (``prompt_budget``), so evaluation sees
about the inputs training saw."""

# SmolLM2's chat template inserts "You are a helpful AI assistant named SmolLM, trained by Hugging
# Face" when a conversation has no system message. Measured with its tokenizer, the system turn
# costs 21 tokens with that default, 11 with this short message and 5 when empty. The short message
# keeps a real system turn (the template never renders a chat without one) for 10 tokens less than
# the default: under a 96-token CPU budget those tokens go to the input. None restores the default.
SYSTEM_PROMPT = "You are a helpful assistant."


def prompt_budget(max_length: int) -> int:
    """Tokens an evaluation prompt may take when training used ``max_length``."""
    return max_length - ANSWER_ROOM


# --- tokenisation ----------------------------------------------------------------------------

def _messages(user: str, system_prompt: str | None) -> list[dict[str, str]]:
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return system + [{"role": "user", "content": user}]


def _prompt_ids(tokenizer, user: str, system_prompt: str | None) -> list[int]:
    """Token ids of the chat up to the opened assistant turn (``<|im_start|>assistant\\n``)."""
    text = tokenizer.apply_chat_template(_messages(user, system_prompt), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _answer_ids(tokenizer, task: Task, example: Example, system_prompt: str | None) -> list[int]:
    """Token ids of the assistant turn: the target and the template's end-of-turn token.

    Read off the chat template (the text a full conversation adds after the generation prompt,
    trailing newline dropped), so any chat model works; for SmolLM2 it is ``target<|im_end|>``.
    """
    messages = _messages(task.prompt(example), system_prompt)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": example.target}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the assistant turn in a way encode does not "
                         "support (the conversation does not extend the generation prompt)")
    return tokenizer(full[len(prompt):].rstrip(), add_special_tokens=False)["input_ids"]


def _fit_prompt(tokenizer, task: Task, example: Example, budget: int,
                system_prompt: str | None) -> list[int]:
    """Prompt ids of at most ``budget`` tokens, dropping words from the end of the input.

    Binary search over the number of input words kept (tokens grow with words; a word is at
    least one token, so at most ``budget`` words can fit).
    """
    ids = _prompt_ids(tokenizer, task.prompt(example), system_prompt)
    if len(ids) <= budget:
        return ids

    def ids_keeping(words: int) -> list[int]:
        shorter = replace(example, input=truncate_words(example.input, words))
        return _prompt_ids(tokenizer, task.prompt(shorter), system_prompt)

    best = ids_keeping(0)
    if len(best) > budget:
        raise ValueError(f"task {task.name!r}: even with an empty input the prompt needs "
                         f"{len(best)} tokens, over the {budget} left by max_length for the "
                         "answer; raise max_length or shorten the instruction")
    low, high = 1, min(len(example.input.split()) - 1, budget)
    while low <= high:
        middle = (low + high) // 2
        ids = ids_keeping(middle)
        if len(ids) <= budget:
            best, low = ids, middle + 1
        else:
            high = middle - 1
    return best


def encode(tokenizer, task: Task, example: Example, max_length: int = 256,
           system_prompt: str | None = SYSTEM_PROMPT) -> dict[str, Any]:
    """Token ids and loss labels of one training example, at most ``max_length`` tokens.

    Returns ``input_ids`` (prompt + answer + end-of-turn), ``labels`` (``-100`` on the
    ``prompt_length`` prompt tokens, then the answer and end-of-turn ids, so the model learns to
    stop) and ``prompt_length``. When too long, the input is cut by whole words until it fits;
    the answer is never cut. ``system_prompt=None`` uses the template's own default.
    """
    answer = _answer_ids(tokenizer, task, example, system_prompt)
    budget = max_length - len(answer)
    if budget <= 0:
        raise ValueError(f"task {task.name!r}: the answer alone is {len(answer)} tokens, "
                         f"max_length={max_length} leaves no room for the prompt")
    prompt = _fit_prompt(tokenizer, task, example, budget, system_prompt)
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
            "prompt_length": len(prompt)}


def encode_prompt(tokenizer, task: Task, example: Example, max_length: int | None = None,
                  system_prompt: str | None = SYSTEM_PROMPT) -> dict[str, Any]:
    """Token ids of the prompt for generation, ending with the opened assistant turn.

    With ``max_length``, the input is cut by whole words until the prompt has at most that many
    tokens (pass the training ``max_length`` minus the answer room, so evaluation sees the
    inputs as training did).
    """
    if max_length is None:
        ids = _prompt_ids(tokenizer, task.prompt(example), system_prompt)
    else:
        ids = _fit_prompt(tokenizer, task, example, max_length, system_prompt)
    return {"input_ids": ids, "prompt_length": len(ids)}


# --- datasets, batches and sampling ----------------------------------------------------------

class MultiTaskDataset(Dataset):
    """Encoded examples of one split of several tasks, each tagged with its task id.

    The task id of a task is its index in ``tasks``: pass a cluster's tasks in the cluster's
    order (``group_by_cluster(tasks)[cluster]``) so ids match that cluster's gate. Items are
    dicts with ``input_ids``, ``labels``, ``prompt_length``, ``task_id`` and ``task`` (its
    name). Everything is encoded once, here: the 1,360 default train examples take about 1.5 s
    at ``max_length=256`` and 2.2 s at 96 (inputs cut to fit cost a few tokenisations each).
    """

    def __init__(self, tasks: Sequence[Task], tokenizer, split: str = "train",
                 max_length: int = 256, system_prompt: str | None = SYSTEM_PROMPT) -> None:
        self.task_names = [task.name for task in tasks]
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"task names must be distinct, got {self.task_names}")
        self.items = [{**encode(tokenizer, task, example, max_length, system_prompt),
                       "task_id": task_id, "task": task.name}
                      for task_id, task in enumerate(tasks) for example in task.split(split)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    @property
    def indices_by_task(self) -> list[list[int]]:
        """For each task id, the indices of its items."""
        indices: list[list[int]] = [[] for _ in self.task_names]
        for index, item in enumerate(self.items):
            indices[item["task_id"]].append(index)
        return indices


@dataclass
class Collator:
    """Pads a list of encoded items (dicts with ``input_ids``, ``task_id`` and, for training,
    ``labels``) into a batch of tensors.

    Returns ``input_ids`` and ``attention_mask`` (batch, seq), ``labels`` (batch, seq; padded
    with -100, present when the items have labels) and ``task_ids`` (batch,). Right padding for
    training; left padding for batched generation, so every prompt ends at the last position.
    """

    pad_token_id: int
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {self.padding_side!r}")

    def _pad(self, sequence: list[int], width: int, value: int) -> list[int]:
        padding = [value] * (width - len(sequence))
        return padding + sequence if self.padding_side == "left" else sequence + padding

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        batch = {
            "input_ids": torch.tensor([self._pad(item["input_ids"], width, self.pad_token_id)
                                       for item in items]),  # (batch, seq)
            "attention_mask": torch.tensor([self._pad([1] * len(item["input_ids"]), width, 0)
                                            for item in items]),  # (batch, seq)
            "task_ids": torch.tensor([item["task_id"] for item in items]),  # (batch,)
        }
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([self._pad(item["labels"], width, IGNORE_INDEX)
                                            for item in items])  # (batch, seq)
        return batch


class TaskBalancedSampler(Sampler[list[int]]):
    """Batch sampler giving every task an equal share of each batch.

    Batch slots go to tasks round-robin, continuing from batch to batch, so when ``batch_size``
    is not a multiple of the number of tasks the extra slots rotate. Each task draws from its
    own shuffled order and reshuffles when exhausted, so small tasks are cycled. The default
    ``num_batches`` shows every example of the largest task once. Iterating twice gives the same
    batches: the order depends only on ``seed``.
    """

    def __init__(self, dataset: MultiTaskDataset, batch_size: int, seed: int = 0,
                 num_batches: int | None = None, tasks: Sequence[str] | None = None) -> None:
        names = list(dataset.task_names)
        if tasks is not None:  # sample these tasks only (their ids stay the dataset's)
            unknown = [t for t in tasks if t not in names]
            if unknown or not tasks:
                raise ValueError(f"tasks {list(tasks)} must be a non-empty subset of {names}")
            names = [t for t in names if t in tasks]
        by_name = dict(zip(dataset.task_names, dataset.indices_by_task))
        self.indices_by_task = [by_name[name] for name in names]
        empty = [name for name, indices in zip(names, self.indices_by_task)
                 if not indices]
        if empty:
            raise ValueError(f"tasks {empty} have no examples in this split")
        self.batch_size, self.seed = batch_size, seed
        largest = max(len(indices) for indices in self.indices_by_task)
        self.num_batches = (num_batches if num_batches is not None
                            else math.ceil(largest * len(self.indices_by_task) / batch_size))

    def __len__(self) -> int:
        return self.num_batches

    @staticmethod
    def _cycle(indices: list[int], rng: random.Random) -> Iterator[int]:
        while True:
            order = list(indices)
            rng.shuffle(order)
            yield from order

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed)
        streams = [self._cycle(indices, rng) for indices in self.indices_by_task]
        slot = 0
        for _ in range(self.num_batches):
            batch = []
            for _ in range(self.batch_size):
                batch.append(next(streams[slot % len(streams)]))
                slot += 1
            yield batch


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of one global batch of indices (``numpy.array_split``).

    The first ``len(batch) % world_size`` ranks get one row more than the others.
    """
    if len(batch) < world_size:
        raise ValueError(f"a global batch of {len(batch)} rows cannot feed {world_size} ranks: "
                         "raise the batch size to at least the number of processes")
    size, extra = divmod(len(batch), world_size)
    start = rank * size + min(rank, extra)
    return list(batch[start:start + size + (rank < extra)])


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this rank's shard of every global batch of ``batch_sampler``.

    All ranks iterate the same ``batch_sampler`` (same seed, same global batches) and keep
    different rows, so together they see each global batch exactly once.
    """

    def __init__(self, batch_sampler: Sampler[list[int]], rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            yield shard(batch, self.rank, self.world_size)


def task_balanced_loader(dataset: MultiTaskDataset, pad_token_id: int, batch_size: int,
                         num_batches: int, seed: int = 0, tasks: Sequence[str] | None = None,
                         shard: tuple[int, int] | None = None) -> DataLoader:
    """``num_batches`` padded, task-balanced batches of ``dataset`` (of ``tasks`` only, if given).

    With ``shard=(rank, world_size)`` each batch is this rank's contiguous slice of the global
    batch (``ShardedBatchSampler``): every rank sees the same global batches.
    """
    sampler = TaskBalancedSampler(dataset, batch_size, seed=seed, num_batches=num_batches, tasks=tasks)
    if shard is not None:
        sampler = ShardedBatchSampler(sampler, *shard)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(pad_token_id))
