"""Task routing: how per-sample task ids reach every adapted layer.

The CGC gate depends on the task only, so each sample of a batch needs its task id at every adapted
layer. Passing it through a transformers model's ``forward`` is not possible (the signature is
fixed), so one ``TaskRouter`` object is shared by all adapted layers of a model: whoever runs the
model sets ``router.task_ids`` for exactly the duration of a call (``with router.route(ids): ...``)
and every layer reads it. ``inject.CGCAdapters`` installs hooks so that
``model(..., task_ids=...)`` and ``model.generate(..., task_ids=...)`` do this for you.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import torch

TaskIds = Union[torch.Tensor, Sequence[int], Sequence[str], str, int]


class TaskRoutingError(ValueError):
    """An unknown task, an id out of range, or task ids that do not fit the batch."""


class TaskRouter:
    """The task names of a cluster and the task ids of the call in progress.

    ``tasks[i]`` is the name of task id ``i``. ``task_ids`` is a LongTensor (batch,) while a call
    runs, else None. ``enabled=False`` makes every adapted layer behave as its base layer.
    """

    def __init__(self, tasks: Sequence[str]):
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("a router needs at least one task name")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        if not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"task names must be non-empty strings, got {list(tasks)}")
        self.tasks: tuple[str, ...] = tasks
        self.task_ids: torch.Tensor | None = None
        self.enabled = True

    def __repr__(self) -> str:
        return f"TaskRouter(tasks={list(self.tasks)})"

    def add_task(self, name: str) -> int:
        """Append a task name (``CGCAdapters.add_task`` does this); return its id."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a task name is a non-empty string, got {name!r}")
        if name in self.tasks:
            raise ValueError(f"task {name!r} exists already (tasks: {list(self.tasks)})")
        self.tasks = self.tasks + (name,)
        return len(self.tasks) - 1

    def task_index(self, task: str | int) -> int:
        """The id of one task given by name or id, checked."""
        if isinstance(task, str):
            if task not in self.tasks:
                raise TaskRoutingError(
                    f"unknown task {task!r}; these adapters know {list(self.tasks)}. "
                    "Check the spelling, or route the request to the cluster that has this task."
                )
            return self.tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, int):
            raise TaskRoutingError(f"a task is a name or an int id, got {task!r}")
        if not 0 <= task < len(self.tasks):
            raise TaskRoutingError(
                f"task id {task} is out of range: ids go from 0 to {len(self.tasks) - 1} "
                f"for tasks {list(self.tasks)}"
            )
        return task

    def to_ids(self, task_ids: TaskIds, device: torch.device | str | None = None) -> torch.Tensor:
        """Turn names, ints or a tensor into a checked LongTensor of shape (batch,).

        A single name or int means one sample. Checking a CUDA tensor's range costs one
        device-to-host copy per call (not per layer).
        """
        if isinstance(task_ids, (str, int)) or not hasattr(task_ids, "__iter__"):
            task_ids = [task_ids]  # one sample (a bool or float then gets task_index's clear error)
        if isinstance(task_ids, torch.Tensor):
            if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
                raise TaskRoutingError(f"task ids must be an integer tensor, got {task_ids.dtype}")
            if task_ids.dim() != 1:
                raise TaskRoutingError(
                    f"task ids must have shape (batch,), got {tuple(task_ids.shape)}"
                )
            ids = task_ids.long()
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.tasks)):
                bad = ids[(ids < 0) | (ids >= len(self.tasks))][0].item()
                self.task_index(int(bad))  # raises the out-of-range error
        else:
            ids = torch.tensor([self.task_index(t) for t in task_ids], dtype=torch.long)
        return ids.to(device) if device is not None else ids

    @contextmanager
    def route(self, task_ids: TaskIds | None, device=None) -> Iterator[torch.Tensor | None]:
        """Set the task ids for the calls inside the ``with`` block; restore the previous ones."""
        previous = self.task_ids
        self.task_ids = None if task_ids is None else self.to_ids(task_ids, device)
        try:
            yield self.task_ids
        finally:
            self.task_ids = previous

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model: every adapted layer returns its base layer's output."""
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous
