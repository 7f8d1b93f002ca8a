"""A plain, readable training loop for adapters, and the answer-only language-model loss.

Only the answer tokens are learned (the prompt is context). For a sequence whose answer tokens are
``y_i`` (labels != -100) the loss is the mean next-token cross-entropy over them:

    L = - 1/N * sum_i log p(y_i | tokens before i)

``answer_loss`` runs the output head on the answer positions only: computing logits over the
whole 49k vocabulary at every position costs more than the rest of a small model's step.

``train`` is AdamW with linear warm-up then cosine (or linear, or constant) decay, gradient
clipping, gradient accumulation, bf16 autocast on CUDA, a fixed seed, a ``tqdm`` progress bar
showing the loss, optional periodic validation, and a recorded history.

**Data parallel.** When a ``torch.distributed`` process group of W > 1 processes is running
(``torchrun --nproc_per_node W``), ``train`` makes the W processes one training run: each rank
r gets its own shard of every global batch (see ``distributed.py``) and

* the adapters start from rank 0's values (broadcast), so every rank holds the same weights;
* the loss is the mean over the answer tokens of the *global* batch, not of each shard. With
  n_r answer tokens on rank r and N = sum_r n_r (one all-reduce of a count per batch), rank r
  back-propagates ``answer_loss * n_r / N`` = (sum of its token losses) / N, and the adapter
  gradients are **summed** over ranks: sum_r grad(S_r) / N = grad of the global token mean,
  whatever the shards' token counts (averaging per-rank means, DDP's default, weights a token
  of a short shard more than one of a long shard);
* the gradients are summed by hand, once per optimizer step, in one flat buffer holding only
  the adapter gradients (the frozen base has none), before clipping, so every rank clips the
  same global gradient and takes the same AdamW step.

Why not ``DistributedDataParallel``: ``answer_loss`` calls the decoder and the head separately
(to run the head on answer positions only), and DDP synchronises gradients only for calls that
go through its own ``forward``; wrapping would silently train each rank on its shard alone. One
all-reduce per optimizer step is also what DDP with ``no_sync`` during accumulation does.
With one process (no process group) nothing of this runs and training is unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .inject import CGCAdapters


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train``.

    ``steps`` optimizer steps, each on ``grad_accum`` batches; learning rate ``lr`` reached after
    ``warmup`` (a fraction of ``steps``) then decayed by ``schedule`` ("cosine", "linear" or
    "constant") towards 0; gradients clipped to ``max_grad_norm`` (0: no clipping); validation
    loss every ``eval_every`` steps (0: never); ``amp``: bf16 autocast (default: on CUDA only).
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
    amp: bool | None = None

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError("steps and grad_accum must be >= 1")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")


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


def world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def answer_tokens(batch: dict) -> int:
    """Number of answer tokens of a batch: the targets (labels[:, 1:]) that are not -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum plain numbers over all ranks (one all-reduce)."""
    buffer = torch.tensor(values, dtype=torch.float64, device=device)  # (n,)
    dist.all_reduce(buffer)
    return buffer.tolist()


def _sum_gradients(params: list[torch.nn.Parameter], extra: float) -> float:
    """Sum the gradients of ``params`` over all ranks in place, and ``extra`` with them.

    One flat fp32 buffer, one all-reduce: (sum_p numel(p) + 1,). A parameter with no gradient
    (its rank skipped backward) counts as zeros. Returns the summed ``extra``.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = grads[0].device
    flat = torch.cat([g.float().flatten() for g in grads]
                     + [torch.tensor([extra], dtype=torch.float32, device=device)])  # (P + 1,)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    return float(flat[-1])


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(adapters: CGCAdapters, batches: Iterable[dict], amp: bool = False) -> float:
    """Mean answer loss over ``batches`` (each batch weighted by its answer tokens).

    Under ``torchrun`` it is a collective: call it on every rank; each returns the mean over the
    answer tokens of all ranks' batches.
    """
    model = adapters.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        batch = _to(batch, device)
        n = answer_tokens(batch)
        if n == 0:
            continue
        with adapters.route(batch["task_ids"]), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            total += answer_loss(model, batch).item() * n
        count += n
    model.train(was_training)
    if world()[1] > 1:  # every rank returns the mean over all ranks' batches
        total, count = _all_reduce_sum([total, count], device)
    return total / max(count, 1)


def train(
    adapters: CGCAdapters,
    batches: Iterable[dict],
    config: TrainConfig = TrainConfig(),
    validation: Iterable[dict] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``adapters`` (and nothing else) on ``batches``; return the history, one dict per step.

    ``batches`` yields dicts with ``input_ids``, ``attention_mask``, ``labels`` and ``task_ids``
    (see ``data.Collator``); it is cycled if it runs out. Each history entry has ``step``,
    ``loss`` (mean over the accumulated batches), ``lr``, ``grad_norm``, ``seconds`` since the
    start, and ``val_loss`` on validation steps.

    Under ``torchrun`` (a process group of W > 1 ranks), ``batches`` are this rank's shards of
    the global batches and the W calls train as one (module docstring): same weights on every
    rank, the loss and gradient of the global batch, the same history on every rank.
    """
    rank, world_size = world()
    torch.manual_seed(config.seed + rank)  # ranks draw different dropout masks
    model = adapters.model
    device = next(model.parameters()).device
    amp = config.amp if config.amp is not None else device.type == "cuda"
    params = adapters.parameters()
    if world_size > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    stream = batches if hasattr(batches, "__next__") else _forever(batches)
    history, start = [], time.perf_counter()
    model.train()
    bar = tqdm(range(config.steps), desc="train", disable=not progress or rank != 0)
    for step in bar:
        lr = config.lr * lr_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(config.grad_accum):
            batch = _to(next(stream), device)
            if world_size > 1:  # n_r answer tokens here, N in the global batch
                n_local = answer_tokens(batch)
                (n_global,) = _all_reduce_sum([n_local], device)
                if n_local == 0:  # nothing to learn from this shard: it adds zero gradient
                    continue
            with adapters.route(batch["task_ids"]):  # backward inside: checkpointing re-runs forwards
                with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                    loss = answer_loss(model, batch)
                    if world_size > 1:
                        loss = loss * (n_local / n_global)  # (sum of this rank's token losses) / N
                (loss / config.grad_accum).backward()
            loss_sum += loss.item()
        if world_size > 1:  # gradients and loss of the global batch, on every rank
            loss_sum = _sum_gradients(params, loss_sum)
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "loss": loss_sum / config.grad_accum, "lr": lr,
                  "grad_norm": float(norm), "seconds": time.perf_counter() - start}
        if validation is not None and config.eval_every and (step + 1) % config.eval_every == 0:
            record["val_loss"] = evaluate_loss(adapters, validation, amp)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
    model.eval()
    return history
