"""A plain, readable training loop for adapters, and the answer-only language-model loss.

Only the answer tokens are learned (the prompt is context). For a sequence whose answer tokens are
``y_i`` (labels != -100) the loss is the mean next-token cross-entropy over them:

    L = - 1/N * sum_i log p(y_i | tokens before i)

``answer_loss`` runs the output head on the answer positions only: computing logits over the
whole 49k vocabulary at every position costs more than the rest of a small model's step.

``train`` is AdamW with linear warm-up then cosine (or linear, or constant) decay, gradient
clipping, gradient accumulation, bf16 autocast on CUDA, a fixed seed, a ``tqdm`` progress bar
showing the loss, optional periodic validation, and a recorded history.

One rule weights the answer tokens of a step, with or without accumulation or torchrun: the
loss of an optimizer step is the mean over *all* its answer tokens (every micro-batch, every
rank), so each micro-batch's mean loss is weighted by its share of the step's tokens
(``distributed.GradientSync.loss_weights``; under ``torchrun`` the gradients are then summed over
the W ranks, see there). Accumulating two half-batches is thus exactly one full batch, even when
the halves hold different numbers of answer tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import AdapterSet
from .distributed import GradientSync, all_reduce_sum
from .models import autocast_dtype


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train``.

    ``steps`` optimizer steps, each on ``grad_accum`` batches; learning rate ``lr`` reached after
    ``warmup`` (a fraction of ``steps``) then decayed by ``schedule`` ("cosine", "linear" or
    "constant") towards 0; gradients clipped to ``max_grad_norm`` (0: no clipping); validation
    loss every ``eval_every`` steps and after the last (0: never), overall and per task (a run
    shorter than ``eval_every``, such as MoDULA's router stage, still ends with one); ``amp``: bf16
    autocast, ``"auto"`` (the default) where the device has native bf16 (``models.autocast_dtype``).
    The adapters' optimizer groups (``AdapterSet.optimizer_groups``) scale the learning rate,
    e.g. a CGC-LoRA gate's ``gate_lr_scale``.
    """

    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.1
    schedule: str = "cosine"
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    eval_every: int = 0
    seed: int = 0
    amp: bool | str = "auto"

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError("steps and grad_accum must be >= 1")
        autocast_dtype("cpu", self.amp)  # checks the value
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")


def proportional_steps(steps: int, weights: dict[str, float]) -> dict[str, int]:
    """Divide ``steps`` optimizer steps among named parts in proportion to ``weights``.

    The largest-remainder rule: each part gets the floor of its share (at least one step), then
    the steps left go one each to the parts with the largest fractional remainders (ties: in the
    given order). The shares sum to ``steps``. Every budget split of the package uses it (1+N
    clusters in ``experiment``, MoDULA's stages in ``modula``).
    """
    if steps < len(weights):
        raise ValueError(f"{steps} steps cannot give each of the {len(weights)} parts "
                         f"{list(weights)} a step: use at least {len(weights)} steps")
    total = sum(weights.values())
    raw = {name: steps * w / total for name, w in weights.items()}
    shares = {name: max(1, int(r)) for name, r in raw.items()}
    while sum(shares.values()) > steps:  # the one-step minimum took steps from the others
        shares[max(shares, key=shares.get)] -= 1
    by_remainder = sorted(raw, key=lambda name: raw[name] - int(raw[name]), reverse=True)
    for name in by_remainder[: steps - sum(shares.values())]:
        shares[name] += 1
    return shares


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based): warm-up, then decay."""
    warm = int(config.warmup * config.steps)
    if step < warm:
        return (step + 1) / (warm + 1)
    progress = (step - warm) / max(1, config.steps - warm)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return 1 - progress
    return 1.0


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (labels != -100), the head run on those positions only.

    ``batch``: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``labels`` (B, L). Task ids must
    already be routed (``with adapters.route(batch["task_ids"])``). Equal to
    ``model(..., labels=labels).loss`` for models whose head is a plain linear map (Llama family);
    models with a scaled or soft-capped head fall back to that slower call.
    """
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    if not isinstance(head, torch.nn.Linear) or decoder is model:
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # (B, L-1): token i+1 is predicted at position i
    mask = targets != -100  # (B, L-1)
    logits = head(hidden[:, :-1][mask])  # (N, V): answer positions only
    return F.cross_entropy(logits.float(), targets[mask])


def _forever(batches: Iterable[dict]):
    """Iterate ``batches`` again and again (a DataLoader reshuffles each pass)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("no training batches: the training data is empty")


def answer_tokens(batch: dict) -> int:
    """Number of answer tokens of a batch: the targets (labels[:, 1:]) that are not -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def answer_token_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of every answer token, (N,) fp32, and the batch row of each, (N,).

    Like ``answer_loss`` (whose mean this is, up to float rounding), but per token, so losses can
    be summed per task.
    """
    targets = batch["labels"][:, 1:]  # (B, L-1)
    mask = targets != -100  # (B, L-1)
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    if isinstance(head, torch.nn.Linear) and decoder is not model:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][mask])  # (N, V)
    else:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    losses = F.cross_entropy(logits.float(), targets[mask], reduction="none")  # (N,)
    return losses, mask.nonzero()[:, 0]


@torch.no_grad()
def evaluate_loss(adapters: AdapterSet, batches: Iterable[dict], amp: bool | str = False,
                  by_task: bool = False) -> float | tuple[float, dict[str, float]]:
    """Mean answer loss over ``batches``, every answer token weighing the same (teacher-forced).

    With ``by_task``, also ``{task name: mean loss over that task's answer tokens}`` (the tasks
    named by the batches' ``task_ids`` in ``adapters.tasks``). Under ``torchrun`` it is a
    collective: call it on every rank; each returns the means over all ranks' batches.
    """
    model = adapters.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = autocast_dtype(device, amp)
    n_tasks = len(adapters.tasks)
    sums, counts = [0.0] * n_tasks, [0] * n_tasks  # per task id
    for batch in batches:
        batch = _to(batch, device)
        if answer_tokens(batch) == 0:
            continue
        with adapters.route(batch["task_ids"]), \
                torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None):
            losses, rows = answer_token_losses(model, batch)  # (N,), (N,)
        task_of_token = batch["task_ids"][rows]  # (N,)
        sums = [s + float(losses[task_of_token == t].sum()) for t, s in enumerate(sums)]
        counts = [c + int((task_of_token == t).sum()) for t, c in enumerate(counts)]
    model.train(was_training)
    totals = all_reduce_sum(sums + counts, device)  # under torchrun: over all ranks' batches
    sums, counts = totals[:n_tasks], totals[n_tasks:]
    mean = sum(sums) / max(sum(counts), 1)
    if not by_task:
        return mean
    return mean, {task: s / c for task, s, c in zip(adapters.tasks, sums, counts) if c}


def train(
    adapters: AdapterSet,
    batches: Iterable[dict],
    config: TrainConfig = TrainConfig(),
    validation: Iterable[dict] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``adapters`` (and nothing else) on ``batches``; return the history, one dict per step.

    ``batches`` yields dicts with ``input_ids``, ``attention_mask``, ``labels`` and ``task_ids``
    (see ``data.Collator``); it is cycled if it runs out. Each history entry has ``step``,
    ``loss`` (mean over the step's answer tokens), ``lr``, ``grad_norm``, ``seconds`` since the
    start, and on validation steps ``val_loss`` and ``val_loss_by_task`` ({task: loss}).

    Under ``torchrun`` (a process group of W > 1 ranks), ``batches`` are this rank's shards of
    the global batches and the W calls train as one (``distributed.py``): same weights on every
    rank, the loss and gradient of the global batch, the same history on every rank.
    """
    model = adapters.model
    device = next(model.parameters()).device
    dtype = autocast_dtype(device, config.amp)  # bf16 or None
    groups = adapters.optimizer_groups()  # [{"params": [...], "lr_scale": ...}]
    params = [p for group in groups for p in group["params"]]
    sync = GradientSync(params, device)  # one process: does nothing
    torch.manual_seed(config.seed + sync.rank)  # ranks draw different dropout masks
    sync.broadcast_()
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    stream = batches if hasattr(batches, "__next__") else _forever(batches)
    history, start = [], time.perf_counter()
    model.train()
    bar = tqdm(range(config.steps), desc="train", disable=not progress or sync.rank != 0)
    for step in bar:
        lr = config.lr * lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        micro = [_to(next(stream), device) for _ in range(config.grad_accum)]
        weights = sync.loss_weights([answer_tokens(b) for b in micro])  # n_i / N: one token mean
        loss_sum = 0.0
        for batch, weight in zip(micro, weights):
            if weight is None:  # no answer token in this micro-batch: it adds zero gradient
                continue
            with adapters.route(batch["task_ids"]):  # backward inside: checkpointing re-runs forwards
                with torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = answer_loss(model, batch) * weight
                loss.backward()
            loss_sum += loss.item()
        loss_sum = sync.sum_gradients_(loss_sum)  # under torchrun: of the global batch, on every rank
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": loss_sum, "lr": lr,
                  "grad_norm": float(norm), "seconds": time.perf_counter() - start}
        if validation is not None and config.eval_every and ((step + 1) % config.eval_every == 0
                                                            or step + 1 == config.steps):
            record["val_loss"], record["val_loss_by_task"] = evaluate_loss(
                adapters, validation, config.amp, by_task=True)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
    model.eval()
    return history
