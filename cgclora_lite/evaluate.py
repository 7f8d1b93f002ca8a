"""Batched greedy generation per task, and scoring of label answers.

Answers are generated greedily from the chat prompt (left padded, so every prompt ends at the
last position). A label task's answer is parsed by its first word, lowercased and stripped of
punctuation (zero-shot models answer in sentences: "Positive. The tweet..." -> "positive"); an
answer whose first word is not one of the task's labels counts as wrong.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from .data import Collator, Example, Task, encode_prompt
from .inject import attached_adapters


def first_word(text: str) -> str:
    """The first word of ``text``, lowercased, without punctuation ("" if there is none)."""
    match = re.search(r"[a-z0-9]+", text.lower())
    return match.group(0) if match else ""


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    tasks: Sequence[Task],
    requests: Sequence[tuple[int, Example]],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    max_prompt_length: int | None = None,
) -> list[str]:
    """Greedy answers for ``requests`` = (task id, example) pairs, in order.

    ``tasks[task_id]`` gives each request's task; the task ids are routed to the attached adapters
    (if any), so one batch may mix tasks.
    """
    collate = Collator(tokenizer.pad_token_id, padding_side="left")
    device = next(model.parameters()).device
    routed = attached_adapters(model) is not None
    answers = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        items = [{**encode_prompt(tokenizer, tasks[t], ex, max_prompt_length), "task_id": t}
                 for t, ex in chunk]
        batch = collate(items)
        extra = {"task_ids": batch["task_ids"]} if routed else {}
        out = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            **extra,
        )  # (B, prompt + new)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, new)
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return [a.strip() for a in answers]


def label_accuracy(answers: Sequence[str], targets: Sequence[str]) -> float:
    """Share of answers whose first word equals the target label."""
    if len(answers) != len(targets):
        raise ValueError(f"{len(answers)} answers for {len(targets)} targets")
    return sum(first_word(a) == t for a, t in zip(answers, targets)) / max(len(targets), 1)
