"""The seesaw toy of notebook 02: two regression tasks that share part of a linear map, adapted in a
second or less with the package's own ``CGCLoRALinear``.

A frozen layer ``W0`` (D x D, no bias) must be adapted for two tasks, A and B. Task t maps an input
x (D,) to ``(W0 + dW_t) x`` (plus noise in the training data), with target updates

    dW_A = sqrt(1 - c) C + sqrt(c) S_A,        dW_B = sqrt(1 - c) C + sqrt(c) S_B,

``C`` (the shared part), ``S_A`` and ``S_B`` (each task's own part) independent random D x D
matrices of rank ``target_rank`` and Frobenius norm ``target_norm``, and ``c = conflict`` in [0, 1]:
at 0 both tasks want the same map, at 1 two unrelated maps (the cosine between ``dW_A`` and ``dW_B``
is about 1 - c). Training on A alone then moves B by ``dW_A`` instead of ``dW_B``: B's loss becomes
about ``||dW_A - dW_B||^2 / ||dW_B||^2 = 2c`` times the frozen layer's, worse than no adapter for
c > 1/2. That is the seesaw.

Every method is one ``CGCLoRALinear`` with the same active rank ``r_active = (K_c + K_s) * rank``
and the same scale ``s = alpha / r_active = scaling`` (the experiment's budget rule; here
``method_config``): ``lora`` (one rank-r_active LoRA for both tasks), ``per-task-lora`` (one
each), ``moelora`` (K_c + K_s shared experts of rank ``rank`` behind the task gate), ``cgc-lora``
(K_c common and K_s specific experts per task behind the task gate) and ``cgc-frozen-gate`` (the
same, its gate frozen at its start: uniform weights). Losses are held-out mean squared errors divided by the frozen layer's
(1: no better than no adapter, 0: the exact map).

Shapes: inputs x (T, n, D) and targets y (T, n, D) per task; a batch is flattened to (T * batch, D)
with task ids (T * batch,). ``train`` returns a ``ToyRun``: loss curves, final losses (T,), gate
weights and expert contribution shares (``GateWeights`` of one layer: (1, T, E)).

Speed: one ``train`` at the default ``ToyConfig`` (200 steps of 64 examples per task, 11
evaluations) took 0.46-0.56 s (lora, per-task-lora), 0.6-0.75 s (cgc-frozen-gate) and 0.75-0.9 s
(moelora, cgc-lora) on one CPU thread (torch 2.13 CPU build, 2026-12-02), on a 2-core machine that a
training job kept busy; up to 1.7 s at its busiest moments. The cost is per-step overhead, not
arithmetic: the tensors are tiny.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .cgc import CGCConfig, CGCLoRALinear
from .inject import GateWeights

TASKS = ("A", "B")
"""The toy's two tasks; task id 0 is A."""
METHODS = ("lora", "per-task-lora", "moelora", "cgc-lora", "cgc-frozen-gate")
"""What ``train`` can train: the experiment's four methods and CGC-LoRA with its gate frozen."""


@dataclass(frozen=True)
class ToyConfig:
    """One toy experiment: the two tasks, the adapter configuration and its training.

    Attributes:
        dim: D, the size of the layer (D x D).
        conflict: c in [0, 1], how much the two tasks' target maps disagree: 0 the same map,
            1 two unrelated maps (see the module docstring).
        target_rank, target_norm: rank and Frobenius norm of the shared part C and of each task's
            own part S_t.
        n_train, n_test, noise: examples per task for training and held-out scoring; the standard
            deviation of the noise added to the training targets.
        n_common, n_specific, rank: K_c common and K_s specific experts per task, each of rank
            ``rank``; the other methods get the same active rank (K_c + K_s) * rank.
        scaling: s = alpha / r_active, the same for every configuration.
        gate_norm: ``"softmax"`` (weights sum to 1) or ``"scaled"`` (K times that: 1 each at the start).
        gate_lr_scale: the gate's learning rate is ``lr`` times this.
        task_embedding_dim: size of the gate's task embedding e_t.
        steps, batch, lr: Adam steps, examples per task in each step, learning rate.
        eval_every: held-out losses are recorded after step 1 and every ``eval_every`` steps.
        seed: draws the tasks, the data, the initial adapters and the batches.
    """

    dim: int = 32
    conflict: float = 0.75
    target_rank: int = 2
    target_norm: float = 3.0
    n_train: int = 256
    n_test: int = 256
    noise: float = 0.05
    n_common: int = 1
    n_specific: int = 1
    rank: int = 2
    scaling: float = 1.0
    gate_norm: str = "softmax"
    gate_lr_scale: float = 1.0
    task_embedding_dim: int = 8
    steps: int = 200
    batch: int = 64
    lr: float = 2e-2
    eval_every: int = 20
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.conflict <= 1.0:
            raise ValueError(f"conflict must be in [0, 1], got {self.conflict}")
        if self.n_common < 0 or self.n_specific < 0 or self.n_common + self.n_specific == 0:
            raise ValueError("the toy needs n_common, n_specific >= 0 and at least one expert")
        if min(self.rank, self.steps, self.batch, self.target_rank, self.eval_every) < 1:
            raise ValueError("rank, steps, batch, target_rank and eval_every must be >= 1")

    @property
    def r_active(self) -> int:
        """The rank one task sees, the same for every method."""
        return (self.n_common + self.n_specific) * self.rank


@dataclass
class ToyTasks:
    """The two tasks: the frozen layer, the target updates and the data.

    ``shared`` is sqrt(1 - c) C and ``own[t]`` sqrt(c) S_t, so ``targets[t] = shared + own[t]``
    (each D x D); ``train_x``, ``train_y``, ``test_x``, ``test_y`` are (T, n, D); ``base_loss`` (T,)
    is the frozen layer's held-out loss per task.
    """

    base: nn.Linear
    shared: torch.Tensor
    own: torch.Tensor
    targets: torch.Tensor
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    base_loss: torch.Tensor


@dataclass
class ToyRun:
    """One trained toy adapter.

    ``curves``: long table (step, task, loss) of held-out relative losses; ``losses``: the final
    ones, {task: loss}; ``gates``: the gate weights (1 for every usable expert without a gate) and
    ``contributions``: each expert's share of each task's update, ``|s w_{t,e}| ||B_e A_e||_F`` over
    its row sum (``CGCLoRALinear.expert_contributions``), both ``GateWeights`` of one layer;
    ``trainable``: adapter parameters; ``seconds``: the training time, evaluations included.
    """

    method: str
    config: ToyConfig
    layer: CGCLoRALinear
    curves: pd.DataFrame
    losses: dict[str, float]
    gates: GateWeights
    contributions: GateWeights
    trainable: int
    seconds: float


def _low_rank(dim: int, rank: int, norm: float, generator: torch.Generator) -> torch.Tensor:
    """A random (dim, dim) matrix of rank ``rank`` and Frobenius norm ``norm``."""
    m = torch.randn(dim, rank, generator=generator) @ torch.randn(rank, dim, generator=generator)
    return m * norm / m.norm()


def make_tasks(config: ToyConfig = ToyConfig()) -> ToyTasks:
    """Draw the frozen layer, the two target updates and their data (from ``config.seed``)."""
    g = torch.Generator().manual_seed(config.seed)
    d, c = config.dim, config.conflict
    base = nn.utils.skip_init(nn.Linear, d, d, bias=False)  # no draw from the global random state
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
    base.requires_grad_(False)
    shared = math.sqrt(1 - c) * _low_rank(d, config.target_rank, config.target_norm, g)
    own = torch.stack([math.sqrt(c) * _low_rank(d, config.target_rank, config.target_norm, g)
                       for _ in TASKS])  # (T, D, D)
    targets = shared + own  # (T, D, D)

    def data(n: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(len(TASKS), n, d, generator=g)  # (T, n, D)
        y = x @ (base.weight + targets).transpose(1, 2)  # (T, n, D): y = (W0 + dW_t) x
        return x, y + noise * torch.randn(y.shape, generator=g)

    train_x, train_y = data(config.n_train, config.noise)
    test_x, test_y = data(config.n_test, 0.0)
    base_loss = ((test_x @ base.weight.T - test_y) ** 2).mean(dim=(1, 2))  # (T,)
    return ToyTasks(base, shared, own, targets, train_x, train_y, test_x, test_y, base_loss)


def method_config(config: ToyConfig, method: str) -> CGCConfig:
    """The ``CGCConfig`` of ``method`` at the toy's active rank and scale (the budget rule)."""
    r, k = config.r_active, config.n_common + config.n_specific
    alpha = config.scaling * r  # s = alpha / r_active = scaling for every method
    gate = {"gate_norm": config.gate_norm, "gate_lr_scale": config.gate_lr_scale,
            "task_embedding_dim": config.task_embedding_dim}
    if method == "lora":
        return CGCConfig.lora(rank=r, alpha=alpha)
    if method == "per-task-lora":
        return CGCConfig.per_task_lora(rank=r, alpha=alpha)
    if method == "moelora":
        return CGCConfig.moelora(n_experts=k, rank=config.rank, alpha=alpha, **gate)
    if method in ("cgc-lora", "cgc-frozen-gate"):
        return CGCConfig(n_common=config.n_common, n_specific=config.n_specific, rank_common=config.rank,
                         rank_specific=config.rank, alpha=alpha, **gate)
    raise ValueError(f"unknown toy method {method!r}; choose from {METHODS}")


def relative_losses(layer: CGCLoRALinear, tasks: ToyTasks) -> torch.Tensor:
    """Held-out loss of each task over the frozen layer's: (T,)."""
    t, n, d = tasks.test_x.shape
    ids = torch.arange(t).repeat_interleave(n)  # (T * n,)
    with torch.no_grad():
        out = layer(tasks.test_x.reshape(t * n, d), task_ids=ids).view(t, n, d)
        return ((out - tasks.test_y) ** 2).mean(dim=(1, 2)) / tasks.base_loss


def train(config: ToyConfig = ToyConfig(), method: str = "cgc-lora", tasks: ToyTasks | None = None,
          mix: Sequence[float] | None = None) -> ToyRun:
    """Train one fresh adapter of ``method`` on the toy tasks and score it.

    ``mix``: the weight of each task's loss in the training loss (default equal weights); for
    example ``(1, 0)`` trains on task A only. ``tasks``: reuse tasks drawn by ``make_tasks(config)``.
    The global random state is left as it was.
    """
    tasks = make_tasks(config) if tasks is None else tasks
    cgc_config = method_config(config, method)
    weights = torch.tensor([0.5, 0.5] if mix is None else [float(m) for m in mix])  # (T,)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        layer = CGCLoRALinear(tasks.base, list(TASKS), cgc_config)
        gate = [] if layer.gate is None else list(layer.gate.parameters())
        if method == "cgc-frozen-gate":
            for p in gate:
                p.requires_grad_(False)
            gate = []
        groups = [{"params": [layer.lora_A, layer.lora_B], "lr": config.lr}]
        if gate:
            groups.append({"params": gate, "lr": config.lr * config.gate_lr_scale})
        optimizer = torch.optim.Adam(groups, foreach=True)
        t, n, d = tasks.train_x.shape
        ids = torch.arange(t).repeat_interleave(config.batch)  # (T * batch,)
        rows = torch.arange(t)[:, None]  # (T, 1)
        curves = []
        for step in range(1, config.steps + 1):
            pick = torch.randint(n, (t, config.batch))  # (T, batch): a balanced batch
            x, y = tasks.train_x[rows, pick], tasks.train_y[rows, pick]  # (T, batch, D)
            out = layer(x.reshape(-1, d), task_ids=ids).view(t, config.batch, d)
            per_task = F.mse_loss(out, y, reduction="none").mean(dim=(1, 2))  # (T,)
            loss = (weights * per_task).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 1 or step % config.eval_every == 0 or step == config.steps:
                curves += [{"step": step, "task": task, "loss": v}
                           for task, v in zip(TASKS, relative_losses(layer, tasks).tolist())]
    seconds = time.perf_counter() - start
    with torch.no_grad():
        softmax = cgc_config.gate == "task" and cgc_config.gate_norm == "softmax"
        total = 1.0 if softmax else float(layer.visible_experts.shape[1])  # what a task's row sums to
        gates = GateWeights(layer.expert_weights()[None].float(), ["toy layer"], list(TASKS),
                            layer.expert_names, total=total)
        contributions = GateWeights(layer.contribution_shares()[None], ["toy layer"], list(TASKS),
                                    layer.expert_names, value="contribution share")
    curves = pd.DataFrame(curves)
    final = curves[curves["step"] == curves["step"].max()]
    trainable = sum(p.numel() for name, p in layer.named_parameters() if not name.startswith("base."))
    return ToyRun(method, config, layer, curves, dict(zip(final["task"], final["loss"])), gates,
                  contributions, trainable, seconds)


def train_all(config: ToyConfig = ToyConfig(), methods: Sequence[str] = METHODS) -> dict[str, ToyRun]:
    """``train`` every method on the same tasks: {method: run}."""
    tasks = make_tasks(config)
    return {method: train(config, method, tasks) for method in methods}


def seesaw_front(config: ToyConfig = ToyConfig(), mixes: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                 tasks: ToyTasks | None = None) -> pd.DataFrame:
    """Train one shared LoRA per mix m, with training loss m * loss_A + (1 - m) * loss_B; return one
    row per mix: ``mix`` (A's weight), ``loss A``, ``loss B`` (held-out, relative)."""
    tasks = make_tasks(config) if tasks is None else tasks
    rows = []
    for m in mixes:
        run = train(config, "lora", tasks, mix=(m, 1 - m))
        rows.append({"mix": m, "loss A": run.losses["A"], "loss B": run.losses["B"]})
    return pd.DataFrame(rows)


def usable_experts(layer: CGCLoRALinear) -> torch.Tensor:
    """(T, E) bool: which experts each task may use (its gate weight can still be 0, or underflow)."""
    usable = torch.zeros(len(layer.tasks), len(layer.expert_slices), dtype=torch.bool)
    return usable.scatter(1, layer.visible_experts.cpu(), True)


def expert_updates(layer: CGCLoRALinear) -> torch.Tensor:
    """What each expert adds to each task's update, ``s w_{t,e} B_e A_e``: (T, E, D_out, D_in)."""
    with torch.no_grad():
        A, B = layer.factors()
        w = layer.expert_weights()  # (T, E)
        per_expert = torch.stack([B[:, sl] @ A[sl] for sl in layer.expert_slices])  # (E, D_out, D_in)
        return layer.scaling * w[:, :, None, None] * per_expert


def expert_alignment(run: ToyRun, tasks: ToyTasks) -> pd.DataFrame:
    """Which part of the targets each expert holds: for every (task, expert it uses), the cosine
    (Frobenius) of the expert's update for that task with the shared part and with each task's own
    part, and its norm over the norm of the task's whole target update."""
    updates = expert_updates(run.layer)  # (T, E, D, D)
    usable = usable_experts(run.layer)  # (T, E)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))

    rows = []
    for t, task in enumerate(TASKS):
        for e, expert in enumerate(run.gates.experts):
            if usable[t, e]:
                u = updates[t, e]
                rows.append({"task": task, "expert": expert, "cos with shared part": cos(u, tasks.shared),
                             **{f"cos with {other}'s own part": cos(u, tasks.own[o])
                                for o, other in enumerate(TASKS)},
                             "norm / target norm": float(u.norm() / tasks.targets[t].norm())})
    return pd.DataFrame(rows).set_index(["task", "expert"])
