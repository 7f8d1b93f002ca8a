"""Inter-task affinity on the central model, and clustering tasks into the N of "1+N".

CGC-LoRA forms its clusters "by prior knowledge or inter-task affinity". This module measures the
affinity: how much learning task i helps (or hurts) task j, through a fresh LoRA adapter on the
frozen central model, before any cluster is trained.

    affinity = task_affinity(model, tokenizer, tasks, method="gradient")
    print(affinity.matrix)                         # T x T, rows: source task i, columns: target j
    clusters = cluster_tasks(affinity, n_clusters=2)   # {"cluster1": [...], "cluster2": [...]}

Two measures, both on the same fixed batches of each task's train split (B examples per batch):

* ``"lookahead"`` (TAG, Fifty et al. 2021, "Efficiently Identifying Task Groupings for Multi-Task
  Learning"): take one SGD step on task i's batch and see how task j's loss on its own batch moves,

      Z[i, j] = 1 - L_j(theta - lr * grad L_i(theta)) / L_j(theta)

  averaged over the batches. Z[i, j] > 0: a step for i lowered j's loss (i helps j); < 0: it hurt
  j (the seesaw). Z is not symmetric. Cost per batch: T backward passes and T x (T + 1) forwards.
* ``"gradient"``: the cosine between the tasks' adapter gradients,

      C[i, j] = <g_i, g_j> / (|g_i| |g_j|),     g_t = grad of task t's mean loss over its batches

  the first-order version of the lookahead (for a small step, L_j(theta - lr g_i) is about
  L_j(theta) - lr <g_j, g_i>). Symmetric, in [-1, 1], one backward pass per task and batch and
  no extra forward: the cheap default.

**The fresh adapter and why B stays zero.** The adapter is a plain LoRA (``CGCConfig.lora(rank=8)``:
one expert every task shares, no gate) with A random and B = 0, as initialised for training. With
B = 0 the gradient of A is zero (dL/dA = s B^T (dL/dh) x^T), but the gradient of B is not:

    dL/dB = s (dL/dh) (A x)^T = s G A^T,     G = dL/dW0  (d_out, d_in), the full-weight gradient

so g_B is a random projection of the full-weight gradient onto the r random directions in A, and
the lookahead step ``B <- -lr g_B`` changes the weight by ``s B A = -lr s^2 G A^T A``, a projected
full fine-tuning step (``A^T A`` is proportional to the identity in expectation). Both measures are
thus taken exactly at the central model, sketched through A. A small random B instead would move
the measuring point away from the central model by a random update unrelated to any task, and
add that noise to every number; so B stays zero, as in peft. A larger rank gives a finer sketch.

``cluster_tasks`` groups tasks by agglomerative clustering (scipy) on the distance
``1 - S / max|S|``, S the symmetric affinity ``(M + M^T) / 2`` with its diagonal ignored.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .adapters import attached_adapters
from .cgc import CGCConfig
from .data import Collator, MultiTaskDataset
from .inject import inject
from .tasks import Task
from .train import answer_loss

METHODS = ("gradient", "lookahead")
LINKAGES = ("average", "complete", "single", "weighted")  # valid on any distance (no Ward)


@dataclass
class Affinity:
    """A task affinity matrix: ``matrix`` (T, T) DataFrame, rows = source task i, columns =
    target task j; ``method`` ("gradient" or "lookahead"); ``tasks`` in matrix order;
    ``settings``: how it was measured (batch size, batches, lr, rank, max_length, seed)."""

    matrix: pd.DataFrame
    method: str
    tasks: list[str]
    settings: dict = field(default_factory=dict)

    def symmetric(self) -> pd.DataFrame:
        """``(M + M^T) / 2``: the mutual affinity of each pair (the gradient cosine already is)."""
        values = self.matrix.to_numpy()
        return pd.DataFrame((values + values.T) / 2, index=self.tasks, columns=self.tasks)

    def to_frame(self) -> pd.DataFrame:
        """Long format (source, target, affinity), one row per ordered pair: what seaborn wants."""
        return self.matrix.rename_axis(index="source", columns="target").stack().rename(
            "affinity").reset_index()

    def to_dict(self) -> dict:
        """JSON-friendly: method, tasks, settings and the matrix as a list of rows."""
        return {"method": self.method, "tasks": list(self.tasks), "settings": dict(self.settings),
                "matrix": self.matrix.to_numpy().tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "Affinity":
        tasks = list(data["tasks"])
        return cls(_matrix(np.asarray(data["matrix"], dtype=float), tasks), data["method"], tasks,
                   dict(data.get("settings", {})))


def _matrix(values: np.ndarray, tasks: list[str]) -> pd.DataFrame:
    return pd.DataFrame(values, index=pd.Index(tasks, name="source"),
                        columns=pd.Index(tasks, name="target"))


def _fixed_batches(tasks: Sequence[Task], tokenizer, batch_size: int, batches: int,
                   max_length: int, seed: int, split: str) -> list[list[dict]]:
    """For each task, ``batches`` one-task batches of ``batch_size`` examples of ``split``.

    Each task's examples are shuffled with ``seed`` and cycled if there are too few.
    """
    data = MultiTaskDataset(tasks, tokenizer, split, max_length)
    collate = Collator(tokenizer.pad_token_id)
    rng = random.Random(seed)
    per_task = []
    for task, indices in zip(tasks, data.indices_by_task):
        if not indices:
            raise ValueError(f"task {task.name!r} has no {split!r} examples to measure affinity on")
        order = list(indices)
        rng.shuffle(order)
        stream = itertools.cycle(order)
        per_task.append([collate([data[next(stream)] for _ in range(batch_size)])
                         for _ in range(batches)])
    return per_task


def task_affinity(model, tokenizer, tasks: Sequence[Task], method: str = "gradient",
                  batch_size: int = 8, batches: int = 2, lr: float = 3e-3,
                  config: CGCConfig | None = None, max_length: int = 128, seed: int = 0,
                  split: str = "train") -> Affinity:
    """Measure how the ``tasks`` affect each other through a fresh LoRA on ``model`` (see module doc).

    Args:
        model, tokenizer: the central model (no adapters attached) and its tokenizer.
        tasks: at least two tasks with distinct names and ``split`` examples.
        method: ``"gradient"`` (cosine of adapter gradients) or ``"lookahead"`` (TAG).
        batch_size, batches: each task is measured on ``batches`` fixed batches of ``batch_size``
            examples (the gradient method averages the gradient over them; the lookahead method
            averages Z over them, step on batch b of i, loss on batch b of j).
        lr: the lookahead's SGD step size on B (unused by the gradient method). The step changes
            W by ``-lr s^2 G A^T A`` (module doc). Tune it per model so that a task's affinity with
            itself stays a few percent: then Z follows the first-order ``lr <g_i, g_j> / L_j``.
            Measured on the embedded SmolLM2 with the default adapter (one batch of 8 x 128
            tokens, adapter gradient norms 2.8 to 9.7): lr 3e-3 lowers a task's own loss by 0.5%
            (headline) to 10% (topic), within 7% of the first-order value; 0.03 already lowers it
            by 50% where first order says 107%, and 0.3 overshoots. The random tiny test model
            has far smaller gradients and needs lr near 1.
        config: the fresh adapter; default ``CGCConfig.lora(rank=8)`` on all linear layers. It
            must have no task-specific experts (affinity is about parameters all tasks share).
        max_length: tokens per example (inputs cut by words to fit).
        seed: fixes A's random init and the choice of batches (the global RNG is left untouched).

    Returns an ``Affinity``. The model is left as it was: adapter removed, base weights untouched
    (never merged), ``requires_grad`` flags and train/eval mode restored.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    names = [t.name for t in tasks]
    if len(names) < 2:
        raise ValueError(f"affinity needs at least two tasks, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {names}")
    if batch_size < 1 or batches < 1:
        raise ValueError(f"batch_size and batches must be >= 1, got {batch_size} and {batches}")
    config = config if config is not None else CGCConfig.lora(rank=8)
    if config.n_specific:
        raise ValueError(
            f"affinity is measured on parameters every task shares, but this config has "
            f"{config.n_specific} task-specific expert(s) per task; use CGCConfig.lora(...) or "
            "any config with n_specific=0")
    if attached_adapters(model) is not None:
        raise RuntimeError(
            "measure affinity on the central model alone: detach() its adapters first "
            "(OnePlusN.add_clusters does this for you)")

    data = _fixed_batches(tasks, tokenizer, batch_size, batches, max_length, seed, split)
    device = next(model.parameters()).device
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        adapters = inject(model, config, names)  # A random, B = 0: the model is still the base
    try:
        model.eval()
        values = (_gradient_cosine(adapters, data, device) if method == "gradient"
                  else _lookahead(adapters, data, device, lr))  # (T, T)
    finally:
        adapters.detach()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    settings = {"batch_size": batch_size, "batches": batches, "max_length": max_length,
                "seed": seed, "split": split, "adapter": config.method, "rank": config.r_active,
                "target_modules": config.target_modules}
    if method == "lookahead":
        settings["lr"] = lr
    return Affinity(_matrix(values, names), method, names, settings)


def _loss(adapters, batch: dict, device, amp: bool) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in batch.items()}
    with adapters.route(batch["task_ids"]), torch.autocast(device.type, torch.bfloat16, enabled=amp):
        return answer_loss(adapters.model, batch)


def _gradient(adapters, params, batches: list[dict], device, amp: bool) -> torch.Tensor:
    """The adapter gradient of the mean loss over ``batches``, flattened: (P,)."""
    for p in params:
        p.grad = None
    for batch in batches:
        (_loss(adapters, batch, device, amp) / len(batches)).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in params])  # (P,)


def _gradient_cosine(adapters, data: list[list[dict]], device) -> np.ndarray:
    """C[i, j] = cos(g_i, g_j): one gradient per task, then all pairwise cosines."""
    params, amp = adapters.parameters(), device.type == "cuda"
    grads = torch.stack([_gradient(adapters, params, batches, device, amp) for batches in data])  # (T, P)
    for p in params:
        p.grad = None
    norms = grads.norm(dim=1)  # (T,)
    if (norms == 0).any():
        task = adapters.tasks[int((norms == 0).nonzero()[0])]
        raise ValueError(f"task {task!r} gives a zero adapter gradient (no answer tokens left "
                         "after truncation? raise max_length)")
    unit = grads / norms[:, None]  # (T, P)
    return (unit @ unit.T).clamp(-1, 1).cpu().numpy()  # (T, T)


def _lookahead(adapters, data: list[list[dict]], device, lr: float) -> np.ndarray:
    """Z[i, j] = 1 - L_j(theta - lr g_i) / L_j(theta), averaged over the batches."""
    params, amp = adapters.parameters(), device.type == "cuda"
    start = [p.detach().clone() for p in params]  # theta: A random, B = 0
    n_tasks, n_batches = len(data), len(data[0])
    Z = np.zeros((n_tasks, n_tasks))
    for b in range(n_batches):
        with torch.no_grad():
            before = [_loss(adapters, batches[b], device, amp).item() for batches in data]  # L_j(theta)
        for i in range(n_tasks):
            grad = _gradient(adapters, params, [data[i][b]], device, amp)  # (P,)
            with torch.no_grad():
                offset = 0
                for p in params:  # theta - lr g_i (SGD); only B moves, A's gradient is 0 at B = 0
                    p.sub_(lr * grad[offset:offset + p.numel()].view_as(p).to(p.dtype))
                    offset += p.numel()
                    p.grad = None
                after = [_loss(adapters, batches[b], device, amp).item() for batches in data]
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            Z[i] += [1 - a / l for a, l in zip(after, before)]
    return Z / n_batches


def affinity_linkage(affinity: Affinity, linkage: str = "average") -> np.ndarray:
    """The scipy linkage matrix (T - 1, 4) of ``cluster_tasks`` (the clustermap's dendrogram).

    Distance ``d[i, j] = 1 - S[i, j] / max|S|`` (0 on the diagonal), S the symmetric affinity with
    its diagonal ignored; d lies in [0, 2]. The scale does not change the tree: rescaling S is an
    increasing affine map of d, which none of the linkages offered here can tell apart.
    """
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import squareform

    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r} (Ward, centroid "
                         "and median need Euclidean points, not an affinity)")
    S = affinity.symmetric().to_numpy().copy()  # (T, T)
    if not np.isfinite(S).all():
        raise ValueError("the affinity matrix has non-finite values: measure it again "
                         "(for the lookahead, with a smaller lr)")
    if len(S) < 2:
        raise ValueError(f"clustering needs at least two tasks, got {affinity.tasks}")
    np.fill_diagonal(S, 0.0)
    scale = np.abs(S).max() or 1.0
    distance = 1.0 - S / scale  # (T, T)
    np.fill_diagonal(distance, 0.0)
    return hierarchy.linkage(squareform(distance, checks=False), method=linkage)


def cluster_tasks(affinity: Affinity, n_clusters: int, linkage: str = "average") -> dict[str, list[str]]:
    """Group the tasks into exactly ``n_clusters`` clusters by agglomerative clustering.

    Returns ``{"cluster1": [...], "cluster2": [...], ...}``: clusters numbered in the order their
    first task appears in ``affinity.tasks``, tasks in that order too. See ``affinity_linkage``.
    """
    from scipy.cluster import hierarchy

    n_tasks = len(affinity.tasks)
    if not isinstance(n_clusters, (int, np.integer)) or not 1 <= n_clusters <= n_tasks:
        raise ValueError(f"n_clusters must be an integer from 1 to the number of tasks "
                         f"({n_tasks}: {affinity.tasks}), got {n_clusters!r}")
    if n_tasks == 1:
        return {"cluster1": list(affinity.tasks)}
    tree = affinity_linkage(affinity, linkage)
    labels = hierarchy.cut_tree(tree, n_clusters=int(n_clusters)).ravel()  # (T,)
    clusters: dict[int, list[str]] = {}
    for task, label in zip(affinity.tasks, labels):
        clusters.setdefault(int(label), []).append(task)
    return {f"cluster{k + 1}": members for k, members in enumerate(clusters.values())}
