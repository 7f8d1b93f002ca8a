"""Gradient synchronisation for data-parallel training: W processes train as one.

When a ``torch.distributed`` process group of W > 1 processes is running (``torchrun
--nproc_per_node W``, see ``launch.py``), every rank r trains on its own shard of each global
batch (``data.shard``), and ``GradientSync`` makes the W calls of ``train.train`` one run:

* the adapters start from rank 0's values (``broadcast_``), so every rank holds the same weights;
* the loss is the mean over the answer tokens of the *global* batch, not of each shard. With
  n_r answer tokens on rank r and N = sum_r n_r (one all-reduce of a count per optimizer step,
  ``loss_weights``), rank r back-propagates ``answer_loss * n_r / N`` = (sum of its token
  losses) / N, and the adapter gradients are **summed** over ranks:

      sum_r grad(S_r) / N = grad of the global token mean,    S_r = sum of rank r's token losses

  whatever the shards' token counts (averaging per-rank means, DDP's default, weights a token
  of a short shard more than one of a long shard). **Gradient accumulation follows the same
  rule**: the ``grad_accum`` micro-batches of a step are more shards of one batch, so each is
  weighted by its answer tokens over N, the tokens of all micro-batches on all ranks. One
  process with ``grad_accum=W`` and W ranks with ``grad_accum=1`` on the same shards compute the
  same step (``tests/test_train.py``, ``tests/test_distributed.py``);
* the gradients are summed by hand, once per optimizer step, in one flat buffer holding only
  the adapter gradients (the frozen base has none), before clipping (``sum_gradients_``), so
  every rank clips the same global gradient and takes the same AdamW step.

Why not ``DistributedDataParallel``: ``train.answer_loss`` calls the decoder and the head
separately (to run the head on answer positions only), and DDP synchronises gradients only for
calls that go through its own ``forward``; wrapping would silently train each rank on its shard
alone. One all-reduce per optimizer step is also what DDP with ``no_sync`` during accumulation
does. With one process (no process group) every method here does nothing and training is the
plain single-process loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum plain numbers over all ranks (one all-reduce); ``values`` as they are in one process."""
    if world()[1] == 1:
        return list(values)
    buffer = torch.tensor(values, dtype=torch.float64, device=device)  # (n,)
    dist.all_reduce(buffer)
    return buffer.tolist()


class GradientSync:
    """Keeps the adapters of W ranks in step (module docstring); does nothing in one process.

    ``params``: the trained parameters (the adapters'), ``device``: where this rank computes.
    In ``train``: ``broadcast_()`` once, ``loss_weights(counts)`` for every step's micro-batches, ``sum_gradients_``
    before each optimizer step's clipping.
    """

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device):
        self.params, self.device = list(params), device
        self.rank, self.world_size = world()

    def broadcast_(self) -> None:
        """Copy rank 0's parameter values to every rank, in place."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=0)

    def loss_weights(self, n_tokens: list[int]) -> list[float | None]:
        """The factor of each micro-batch's mean loss, given their answer-token counts on this rank.

        n_i / N, N the answer tokens of every micro-batch of the step on every rank (under
        torchrun a collective: every rank calls it once per step); None for a micro-batch with
        no answer token (skip it: it adds zero gradient). The weighted means sum to the token
        mean of the whole step.
        """
        (total,) = all_reduce_sum([sum(n_tokens)], self.device)
        return [None if n == 0 else n / total for n in n_tokens]

    def sum_gradients_(self, loss_sum: float) -> float:
        """Sum the gradients of ``params`` over all ranks in place, and ``loss_sum`` with them.

        One flat fp32 buffer, one all-reduce: (sum_p numel(p) + 1,). A parameter with no gradient
        (its rank skipped backward) counts as zeros. Returns the summed ``loss_sum`` (in one
        process: ``loss_sum``, gradients untouched).
        """
        if self.world_size == 1:
            return loss_sum
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        device = grads[0].device
        flat = torch.cat([g.float().flatten() for g in grads]
                         + [torch.tensor([loss_sum], dtype=torch.float32, device=device)])  # (P + 1,)
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
        return float(flat[-1])
