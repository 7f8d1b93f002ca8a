"""The CGC-LoRA layer: task-common and task-specific LoRA experts mixed by a task-motivated gate.

CGC-LoRA (Song et al. 2024, arXiv 2402.01684) adapts a frozen ``W0`` (d_out, d_in) for a cluster
of T tasks with

* K_c **task-common experts** shared by all tasks: LoRA pairs ``A_k`` (r_k, d_in), ``B_k``
  (d_out, r_k);
* K_s **task-specific experts for each task** t, used by t only: ``A_{t,j}``, ``B_{t,j}``;
* a **task-motivated gate** that sees the task id and never the tokens. Task t gets a softmax over
  the K_c + K_s experts it may use: ``w_t = softmax(G e_t)``, ``e_t`` a learned task embedding
  (dim D) and ``G`` a (K_c + K_s, D) linear map without bias (the MOELoRA / PLE form).

For a token x of task t:

    h = W0 x + s * ( sum_k w_{t,k} B_k A_k x  +  sum_j w_{t,Kc+j} B_{t,j} A_{t,j} x )
    s = alpha / r_active,    r_active = sum of common ranks + sum of one task's specific ranks

``B`` starts at zero and the gate logits at zero (``G = 0``: uniform weights), so the adapted layer
starts exactly equal to the base layer. With ``gate="none"`` every allowed expert gets weight 1,
which makes the other methods special cases of this one layer:

    ======================  ====  ====  ======
    method                  K_c   K_s   gate
    ======================  ====  ====  ======
    LoRA (one model)        1     0     none
    per-task LoRA           0     1     none
    MOELoRA                 K     0     task
    CGC-LoRA                >=1   >=1   task
    ======================  ====  ====  ======

**Fused computation.** All experts' ``A`` are stored as one matrix ``A_cat`` (R, d_in) and all
``B`` as ``B_cat`` (d_out, R), R the summed rank of every expert of every task. The gate becomes a
coefficient per rank column, ``c_t[col] = s * w_{t, expert(col)}`` (zero on the columns of other
tasks' specific experts), so a whole mixed-task batch takes two matrix products:

    u = x A_cat^T  (B, L, R);   u <- u * c_{task(b)}  (rank space);   delta = u B_cat^T  (B, L, d_out)

No loop over experts and no per-expert outputs. ``reference_forward`` keeps the readable
per-expert loop for tests and teaching. The two products and the base product run as one autograd
node, ``fused.FusedCGCLoRA`` (see that module for its equations and backward).

**Many tasks.** R grows with the number of tasks T (each brings its own specific experts) while a
sample only ever uses ``r_active`` columns. When R > ``GATHER_ABOVE * r_active`` the layer switches
to the *gathered* form: each sample gets its own task's ``r_active`` rows of ``A_cat`` and columns
of ``B_cat`` (batched products, no host synchronisation, cost independent of T).

**Adding a task later.** ``add_task`` gives a new task its own specific experts in a block of
their own (``added_A[k]``, ``added_B[k]``, after ``lora_A`` / ``lora_B`` in storage order) and a gate
row. The stored block keeps its shape and is computed as before, with zero coefficients on the new
task's rows for the columns it may not use; the new block adds ``u_k B_k^T`` with coefficients that
are exactly zero for every other task. So the existing tasks' outputs do not change by a single bit.

**Per-task merging and export.** The gate ignores tokens, so task t's update is one matrix,
``dW_t = B_cat diag(c_t) A_cat``: ``merge(t)`` folds it into ``W0`` for zero-overhead inference,
and ``export_factors(t)`` returns a plain LoRA pair (A'_t, B'_t) with ``B'_t A'_t = dW_t``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import JSONConfig
from .fused import FusedCGCLoRA
from .lora import AdaptedLinear, TargetSpec, adapter_dtype, init_lora_A
from .routing import TaskIds, TaskRouter, TaskRoutingError

Ranks = Union[int, Sequence[int]]
GATE_NORMS = ("softmax", "scaled")
GATHER_ABOVE = 2
"""A layer uses the gathered form when its total rank R exceeds this many times ``r_active``.
Measured on one CPU core (d=576, 8 x 64 tokens, r_active 16, training steps): at R = 1.5 x r_active
the dense form is 1% faster, at 2.5 x 5% slower, at 4.5 x 14% slower; the gathered form stays within
4% of a plain LoRA of rank r_active (docs/benchmarks.md). Set ``layer.gathered`` to choose by hand."""


def _ranks(value: Ranks, count: int, what: str) -> tuple[int, ...]:
    """One rank per expert: an int is repeated ``count`` times; a sequence must have ``count``."""
    ranks = (value,) * count if isinstance(value, int) else tuple(int(r) for r in value)
    if len(ranks) != count:
        raise ValueError(f"{what} has {len(ranks)} entries for {count} experts: {ranks}")
    if any(r < 1 for r in ranks):
        raise ValueError(f"every rank in {what} must be >= 1, got {ranks}")
    return ranks


@dataclass
class CGCConfig(JSONConfig):
    """Everything that defines a set of CGC-LoRA adapters (saved with them as JSON).

    Attributes:
        n_common: K_c, task-common experts (shared by every task of the cluster).
        n_specific: K_s, task-specific experts per task.
        rank_common: rank of each common expert (an int, or one int per expert).
        rank_specific: rank of each specific expert of a task (an int, or one int per expert).
        alpha: scale numerator; the update is scaled by ``s = alpha / r_active``.
        dropout: dropout on the adapter input (the base path never sees it).
        gate: ``"task"`` (the task-motivated gate) or ``"none"`` (every allowed expert weight 1).
        gate_scope: ``"layer"`` (each adapted layer has its own gate: the default, so each layer
            can choose its own mix of experts, which the gate explorer makes visible) or
            ``"shared"`` (one gate function for all layers, as the MOELoRA paper describes it).
        task_embedding_dim: D, the size of the learned task embedding ``e_t``.
        gate_norm: how the gate's logits become weights over the K = K_c + K_s experts a task may
            use: ``"softmax"`` (the paper and MOELoRA: weights sum to 1, each 1/K at the start) or
            ``"scaled"`` (K times that softmax: weights sum to K, each 1 at the start, so a fresh
            layer is exactly the ungated sum, i.e. a plain LoRA of rank r_active at scale s).
        gate_lr_scale: the gate parameters' learning rate is the run's times this (a gate has few
            parameters and starts at zero: at the adapters' rate its logits barely move in a
            short budget). Used by ``train`` through ``CGCAdapters.optimizer_groups``.
        init: how ``A`` starts: ``"kaiming"`` (like nn.Linear) or ``"gaussian"``. B starts at 0.
        adapter_dtype: ``"float32"`` (fp32 master weights whatever the base dtype), ``"bfloat16"``,
            ``"float16"`` or ``"base"`` (the base weight's dtype).
        target_modules: which linear layers to adapt: ``"all-linear"`` (every nn.Linear except the
            output head), a list of exact module names or name suffixes (``["q_proj", "v_proj"]``),
            or any other string, used as a regular expression that must match a full module name.
        exclude_modules: the same kinds of spec, removed from the targets.
    """

    n_common: int = 2
    n_specific: int = 1
    rank_common: Ranks = 4
    rank_specific: Ranks = 4
    alpha: float = 16.0
    dropout: float = 0.0
    gate: str = "task"
    gate_scope: str = "layer"
    task_embedding_dim: int = 64
    gate_norm: str = "softmax"
    gate_lr_scale: float = 1.0
    init: str = "kaiming"
    adapter_dtype: str = "float32"
    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec | None = None
    common_ranks: tuple[int, ...] = field(init=False, repr=False)
    specific_ranks: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self):
        if self.n_common < 0 or self.n_specific < 0:
            raise ValueError("n_common and n_specific must be >= 0")
        if self.n_common + self.n_specific == 0:
            raise ValueError("a CGC-LoRA layer needs at least one expert (n_common + n_specific >= 1)")
        if self.gate not in ("task", "none"):
            raise ValueError(f"gate must be 'task' or 'none', got {self.gate!r}")
        if self.gate_scope not in ("layer", "shared"):
            raise ValueError(f"gate_scope must be 'layer' or 'shared', got {self.gate_scope!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.task_embedding_dim < 1:
            raise ValueError("task_embedding_dim must be >= 1")
        if self.gate_norm not in GATE_NORMS:
            raise ValueError(f"gate_norm must be one of {GATE_NORMS}, got {self.gate_norm!r}")
        if not self.gate_lr_scale > 0:
            raise ValueError(f"gate_lr_scale must be > 0, got {self.gate_lr_scale}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = list(self.exclude_modules)
        self.common_ranks = _ranks(self.rank_common, self.n_common, "rank_common")
        self.specific_ranks = _ranks(self.rank_specific, self.n_specific, "rank_specific")
        if not isinstance(self.rank_common, int):
            self.rank_common = list(self.common_ranks)
        if not isinstance(self.rank_specific, int):
            self.rank_specific = list(self.specific_ranks)

    # --- derived quantities -------------------------------------------------------------------
    @property
    def r_active(self) -> int:
        """The rank one task sees: all common experts plus its own specific experts."""
        return sum(self.common_ranks) + sum(self.specific_ranks)

    @property
    def scaling(self) -> float:
        """``s = alpha / r_active``."""
        return self.alpha / self.r_active

    @property
    def needs_task_ids(self) -> bool:
        """Whether a forward pass must know each sample's task."""
        return self.gate == "task" or self.n_specific > 0

    @property
    def method(self) -> str:
        """The name of the method this configuration stands for."""
        if self.gate == "none":
            if self.n_specific == 0:
                return "lora" if self.n_common == 1 else "lora (sum of experts)"
            return "per-task lora" if self.n_common == 0 else "cgc-lora (ungated)"
        if self.n_specific == 0:
            return "moelora"
        return "cgc-lora"

    # --- the methods as configurations of one layer -------------------------------------------
    @classmethod
    def lora(cls, rank: int = 8, alpha: float = 16.0, **kw) -> "CGCConfig":
        """One LoRA shared by all tasks (the integrated model): K_c=1, K_s=0, no gate."""
        return cls(n_common=1, n_specific=0, rank_common=rank, gate="none", alpha=alpha, **kw)

    @classmethod
    def per_task_lora(cls, rank: int = 8, alpha: float = 16.0, **kw) -> "CGCConfig":
        """One independent LoRA per task: K_c=0, K_s=1, no gate."""
        return cls(n_common=0, n_specific=1, rank_specific=rank, gate="none", alpha=alpha, **kw)

    @classmethod
    def moelora(cls, n_experts: int = 8, rank: int = 2, alpha: float = 32.0, **kw) -> "CGCConfig":
        """MOELoRA: K shared experts mixed by the task gate (defaults from its public code)."""
        return cls(n_common=n_experts, n_specific=0, rank_common=rank, alpha=alpha, **kw)


class TaskGate(nn.Module):
    """The task-motivated gate: ``w_t = softmax(G e_t)`` for every task t at once.

    ``task_embedding``: (T, D), normal init. ``proj`` = G: (K, D), K = K_c + K_s, zero init, so
    every task starts with uniform weights over the experts it may use. ``forward()`` -> (T, K).
    With ``norm="scaled"`` the weights are ``K * softmax(G e_t)``: 1 each at the start, so the
    layer starts as the ungated sum of its experts (``CGCConfig.gate_norm``).
    """

    def __init__(self, n_tasks: int, n_experts: int, dim: int = 64, device=None, dtype=None,
                 norm: str = "softmax"):
        super().__init__()
        if norm not in GATE_NORMS:
            raise ValueError(f"norm must be one of {GATE_NORMS}, got {norm!r}")
        self.norm = norm
        self.task_embedding = nn.Embedding(n_tasks, dim, device=device, dtype=dtype)  # (T, D)
        self.proj = nn.Linear(dim, n_experts, bias=False, device=device, dtype=dtype)  # G
        nn.init.zeros_(self.proj.weight)
        self.added = nn.ParameterList()  # one (1, D) embedding per task added later (add_task)

    @property
    def num_tasks(self) -> int:
        return self.task_embedding.num_embeddings + len(self.added)

    def add_task(self) -> nn.Parameter:
        """A new task's embedding e_new (1, D), drawn like nn.Embedding's rows (N(0, 1)).

        It is kept apart from ``task_embedding`` so the rows of the existing tasks are computed
        exactly as before (bit for bit): the added rows go through G one by one.
        """
        w = self.task_embedding.weight
        embedding = nn.Parameter(torch.randn(1, w.shape[1], device=w.device).to(w.dtype))  # (1, D)
        self.added.append(embedding)
        return embedding

    def forward(self) -> torch.Tensor:
        logits = self.proj(self.task_embedding.weight)  # (T, K_c + K_s)
        if len(self.added):
            logits = torch.cat([logits] + [self.proj(e) for e in self.added])  # (T + added, K)
        weights = logits.float().softmax(dim=-1)  # (T, K), rows sum to 1
        return weights * weights.shape[-1] if self.norm == "scaled" else weights


def expert_names(config: CGCConfig, tasks: Sequence[str]) -> list[str]:
    """Names of all experts of a layer, in storage order: common ones, then each task's own."""
    names = [f"common{k + 1}" for k in range(config.n_common)]
    names += [f"{t}/specific{j + 1}" for t in tasks for j in range(config.n_specific)]
    return names


class CGCLoRALinear(AdaptedLinear):
    """A frozen ``nn.Linear`` adapted by a CGC-LoRA mixture for a cluster of tasks.

    Args:
        base: the layer to adapt (frozen here).
        tasks: the cluster's task names (or a ``TaskRouter`` shared by all layers of a model, or an
            int T for tasks named ``task0..``). Task id i is ``tasks[i]``.
        config: the ``CGCConfig`` (``target_modules`` is ignored here; it is for ``inject``).
        gate: a ``TaskGate`` shared with other layers (``gate_scope="shared"``); it is then *not*
            registered as a submodule of this layer. By default, the layer owns its gate.

    Parameters: ``lora_A`` (R, d_in) and ``lora_B`` (d_out, R), R = sum(common ranks) +
    T * sum(specific ranks); rows/columns are grouped by expert in ``expert_names`` order. Tasks
    added later (``add_task``) bring ``added_A[k]`` (K_s ranks, d_in) and ``added_B[k]``
    (d_out, K_s ranks); ``factors()`` concatenates everything in storage order.
    ``gathered``: whether ``forward`` uses the gathered rank layout (default: when
    R > ``GATHER_ABOVE`` * r_active); both layouts compute the same function.
    """

    def __init__(
        self,
        base: nn.Linear,
        tasks: Sequence[str] | TaskRouter | int,
        config: CGCConfig,
        gate: TaskGate | None = None,
    ):
        super().__init__(base)
        if isinstance(tasks, int):
            tasks = [f"task{i}" for i in range(tasks)]
        self.router = tasks if isinstance(tasks, TaskRouter) else TaskRouter(tasks)
        self.config = config
        n_tasks, n_visible = len(self.router.tasks), config.n_common + config.n_specific
        self.scaling = config.scaling
        self.n_base_tasks = n_tasks  # tasks stored in lora_A / lora_B; later ones: add_task
        self.n_added = 0  # tasks added later (each with a block of its own if K_s > 0)
        self._build_index(base.weight.device)
        total_rank = self.expert_slices[-1].stop
        self.gathered = total_rank > GATHER_ABOVE * config.r_active

        kw = dict(device=base.weight.device, dtype=adapter_dtype(config.adapter_dtype, base))
        self.lora_A = nn.Parameter(torch.empty(total_rank, self.in_features, **kw))  # (R, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, total_rank, **kw))  # (d_out, R)
        for sl in self.expert_slices:  # per expert, so "gaussian" uses each expert's own rank
            init_lora_A(self.lora_A.data[sl], config.init)
        self.added_A = nn.ParameterList()  # per task added later: (K_s ranks, d_in)
        self.added_B = nn.ParameterList()  # per task added later: (d_out, K_s ranks)

        self.gate: TaskGate | None = None  # registered only when this layer owns its gate
        if config.gate == "task" and gate is None:
            self.gate = TaskGate(n_tasks, n_visible, config.task_embedding_dim, **kw, norm=config.gate_norm)
        elif gate is not None:
            if config.gate != "task":
                raise ValueError("a shared gate was given but config.gate is 'none'")
            if gate.proj.out_features != n_visible or gate.task_embedding.num_embeddings != n_tasks:
                raise ValueError(
                    f"the shared gate has {gate.task_embedding.num_embeddings} tasks and "
                    f"{gate.proj.out_features} experts; this layer needs {n_tasks} and {n_visible}"
                )
        object.__setattr__(self, "_shared_gate", gate if self.gate is None else None)

    def _build_index(self, device) -> None:
        """Where every expert lives, for the router's current tasks (run again by ``add_task``).

        Storage order: common experts, then each task's specific experts in task order (tasks
        added later last, so nothing moves). Expert e occupies rank columns ``expert_slices[e]``
        of ``factors()``. Three index buffers follow from it:

        * ``visible_experts`` (T, K_c + K_s): the storage index of each expert task t may use,
          its common experts first, then its own;
        * ``expert_of_column`` (R_all,): the expert that owns each rank column;
        * ``task_columns`` (T, r_active): the rank columns task t uses (the gathered form).
        """
        config, n_tasks = self.config, len(self.router.tasks)
        ranks = list(config.common_ranks) + list(config.specific_ranks) * n_tasks  # one per expert
        bounds = [0] + torch.tensor(ranks).cumsum(0).tolist()
        self.expert_slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        common = torch.arange(config.n_common).expand(n_tasks, -1)  # (T, K_c)
        first_own = config.n_common + config.n_specific * torch.arange(n_tasks)[:, None]  # (T, 1)
        own = first_own + torch.arange(config.n_specific)  # (T, K_s)
        visible = torch.cat([common, own], dim=1)  # (T, K_c + K_s)
        columns = torch.stack([torch.cat([torch.arange(bounds[e], bounds[e + 1]) for e in row])
                               for row in visible.tolist()])  # (T, r_active)
        index = {
            "visible_experts": visible,
            "expert_of_column": torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)),
            "task_columns": columns,
        }
        for name, value in index.items():
            self.register_buffer(name, value.to(device), persistent=False)

    # --- gate weights -------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        return self.router.tasks

    @property
    def expert_names(self) -> list[str]:
        return expert_names(self.config, self.tasks)

    def visible_weights(self) -> torch.Tensor:
        """Gate weights over the experts each task may use: (T, K_c + K_s), rows sum to 1
        (to K_c + K_s with ``gate_norm="scaled"``).

        Without a gate every allowed expert has weight 1.
        """
        gate = self.gate if self.gate is not None else self._shared_gate
        if gate is None:
            return torch.ones(self.visible_experts.shape, device=self.lora_A.device)
        return gate()  # (T, K_c + K_s)

    def expert_weights(self) -> torch.Tensor:
        """Gate weights over *all* experts of the layer: (T, E), zero where a task has no access."""
        w = self.visible_weights()  # (T, K_c + K_s)
        full = w.new_zeros(w.shape[0], len(self.expert_slices))  # (T, E)
        return full.scatter(1, self.visible_experts, w)

    @torch.no_grad()
    def expert_contributions(self) -> torch.Tensor:
        """How much each expert adds to each task's update: ``|s w_{t,e}| * ||B_e A_e||_F``, (T, E),
        fp32, 0 where task t may not use expert e.

        Gate weights alone cannot say which experts a task relies on (doubling ``w`` or doubling
        ``B`` is the same function); this can. ``||B A||_F^2 = trace((B^T B)(A A^T))``, computed
        on (r, r) matrices, never the (d_out, d_in) product.
        """
        A, B = self.factors()  # (R_all, d_in), (d_out, R_all)
        norms = torch.stack([
            ((B[:, sl].float().T @ B[:, sl].float()) * (A[sl].float() @ A[sl].float().T)).sum()
            for sl in self.expert_slices
        ]).clamp_min(0).sqrt()  # (E,)
        return self.scaling * self.expert_weights().abs() * norms  # (T, E)

    @torch.no_grad()
    def contribution_shares(self) -> torch.Tensor:
        """``expert_contributions`` as each task's shares: (T, E), rows summing to 1 (0 everywhere
        while every B is still zero, before training)."""
        norms = self.expert_contributions()  # (T, E)
        totals = norms.sum(-1, keepdim=True)  # (T, 1)
        return torch.where(totals > 0, norms / totals.clamp_min(1e-30), torch.zeros_like(norms))

    def rank_coefficients(self) -> torch.Tensor:
        """``c[t, col] = s * w_{t, expert(col)}``: the gate moved to rank space, (T, R), fp32."""
        return self.scaling * self.expert_weights()[:, self.expert_of_column]  # (T, R)

    # --- forward ------------------------------------------------------------------------------
    def _task_ids(self, task_ids: TaskIds | None, x: torch.Tensor) -> torch.Tensor:
        """The (B,) task ids for input x (B, ..., d_in): given explicitly, else the router's."""
        if x.dim() < 2:
            raise TaskRoutingError(
                f"input of shape {tuple(x.shape)} has no batch dimension: task routing needs "
                "x of shape (batch, ..., d_in), one task id per sample"
            )
        batch = x.shape[0]
        if task_ids is not None:
            ids = self.router.to_ids(task_ids, self.lora_A.device)
        elif self.router.task_ids is not None:
            ids = self.router.task_ids
        else:
            raise TaskRoutingError(
                f"this {self.config.method} layer needs each sample's task ({list(self.tasks)}) "
                "but none was given. Pass task_ids=... to the model call or to generate(), or run "
                "inside `with adapters.route(task_ids):`."
            )
        if ids.shape[0] != batch:
            raise TaskRoutingError(
                f"got {ids.shape[0]} task ids for a batch of {batch} samples; give exactly one "
                "task per sample (in the batch's order)."
            )
        return ids

    def _sample_coefficients(self, ids: torch.Tensor | None) -> torch.Tensor:
        """Each sample's rank coefficients ``c[task(b)]`` for task ids (B,): (B, R_all), zero on
        the columns its task may not use; (1, R_all) without ids (a layer that needs none)."""
        if ids is None:
            return self.lora_A.new_full((1, self.lora_A.shape[0]), self.scaling)
        return self.rank_coefficients()[ids]  # (B, R_all)

    def forward(self, x: torch.Tensor, task_ids: TaskIds | None = None) -> torch.Tensor:
        """x (B, ..., d_in) -> (B, ..., d_out) through ``FusedCGCLoRA``: the base product and the
        two adapter products in one autograd node, the gate applied in rank space.

        All products run in the dtype the base product runs in (autocast's if it is on, else x's):
        the small adapter tensors are cast to it, never the input. In training, dropout draws a
        bool keep-mask here (the distribution of ``F.dropout``, which ``reference_forward`` uses).
        """
        if not self.router.enabled:
            return self.base(x)
        if self.merged:
            self._check_merged_task(task_ids)
            return self.base(x)
        ids = self._task_ids(task_ids, x) if self.config.needs_task_ids else None  # (B,)
        coef = self._sample_coefficients(ids)  # (B or 1, R_all)
        stored = self.lora_A.shape[0]  # R: the columns of lora_A; added tasks' blocks follow
        added = [coef[:, stored + k * self._block: stored + (k + 1) * self._block]
                 for k in range(len(self.added_A))]  # (B, K_s ranks) per added task
        if self.gathered and ids is not None:
            cols = self.task_columns[ids]  # (B, r_active): the columns each sample uses
            inside = cols < stored  # an added task's own columns live in its block, not here
            coef, cols = torch.where(inside, coef.gather(1, cols), 0.0), cols * inside  # (B, r)
        else:
            coef, cols = coef[:, :stored], None  # (B or 1, R)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        rows = coef.shape[0]  # B, or 1 when all samples are alike
        tokens = x.shape[:-1].numel() // max(rows, 1)  # L: all positions of a sample
        x3 = x.reshape(rows, tokens, self.in_features).to(dtype)  # (B, L, d_in)
        p = self.config.dropout if self.training else 0.0
        # keep-mask, P(keep) = 1 - p; on a CPU, uniform-and-compare is 3x faster than bernoulli_
        mask = torch.rand(x3.shape, device=x3.device) >= p if p > 0 else None  # (B, L, d_in) bool
        bias = None if self.base.bias is None else self.base.bias.to(dtype)
        out = FusedCGCLoRA.apply(
            x3, self.base_weight.to(dtype), bias, self.lora_A.to(dtype), self.lora_B.to(dtype),
            coef.to(dtype), cols, mask, p,
        )  # (B, L, d_out)
        if added:  # tasks added later: one small LoRA product per task, zero for other samples
            xa = x3 if mask is None else x3 * mask / (1 - p)  # (B, L, d_in)
            for A, B, c in zip(self.added_A, self.added_B, added):
                u = (xa @ A.to(dtype).T) * c.to(dtype).unsqueeze(1)  # (B, L, K_s ranks)
                out = out + u @ B.to(dtype).T  # (B, L, d_out)
        return out.view(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor, task_ids: TaskIds | None = None) -> torch.Tensor:
        """The same function as ``forward``, written as the per-expert loop of the equation.

        Slow (one pair of matmuls and one (B, ..., d_out) output per expert): for tests and teaching.
        """
        h = self.base(x)  # (B, ..., d_out)
        xd = F.dropout(x, self.config.dropout, self.training).to(self.lora_A.dtype)  # (B, ..., d_in)
        if self.config.needs_task_ids:
            per_sample = self.expert_weights()[self._task_ids(task_ids, x)]  # (B, E)
        else:
            per_sample = torch.ones(x.shape[0], len(self.expert_slices), device=x.device)
        delta = 0
        A, B = self.factors()  # (R_all, d_in), (d_out, R_all)
        for e, sl in enumerate(self.expert_slices):
            y_e = xd @ A[sl].T @ B[:, sl].T  # (B, ..., d_out): expert e alone
            w_e = self.scaling * per_sample[:, e].to(y_e.dtype)  # (B,)
            delta = delta + w_e.view(-1, *([1] * (y_e.dim() - 1))) * y_e
        return h + delta.to(h.dtype)

    # --- per-task update, merge, export --------------------------------------------------------
    def _key(self, task: str | int | None) -> int | None:
        if task is None:
            if self.config.needs_task_ids:
                raise TaskRoutingError(
                    f"this {self.config.method} layer has a different update per task: name one of "
                    f"{list(self.tasks)}"
                )
            return None
        return self.router.task_index(task)

    def delta_weight(self, task: str | int | None = None) -> torch.Tensor:
        """``dW_t = B_cat diag(c_t) A_cat`` in fp32, shape (d_out, d_in), computed over the task's
        own r_active columns only (``export_factors``), so it does not change when tasks are added."""
        A, B = self.export_factors(task)  # (r_active, d_in), (d_out, r_active)
        return B @ A  # (d_out, d_in)

    def merge(self, task: str | int | None = None) -> None:
        """Fold task ``task``'s update into ``W0`` (see ``AdaptedLinear.merge``)."""
        super().merge(self._key(task))

    def _check_merged_task(self, task_ids: TaskIds | None) -> None:
        """Refuse a batch with other tasks than the merged one. In a compiled graph the check is a
        device-side assert: no host synchronisation, no graph break."""
        (merged,) = self.merged_key
        if merged is None:
            return
        ids = self.router.to_ids(task_ids) if task_ids is not None else self.router.task_ids  # checked
        if ids is None:
            return
        message = (
            f"this layer is merged for task {self.tasks[merged]!r} but the batch has other tasks; "
            "unmerge() to serve a mixed batch, or send only that task's samples."
        )
        if torch.compiler.is_compiling():
            torch._assert_async((ids == merged).all(), message)
        elif bool((ids != merged).any()):
            raise TaskRoutingError(message)

    @torch.no_grad()
    def export_factors(self, task: str | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A plain LoRA pair for one task: ``A'`` (r_active, d_in), ``B'`` (d_out, r_active).

        ``B' A' = delta_weight(task)``: ``A'`` stacks the rows of the experts the task uses and
        ``B'`` their columns times ``s * w``. Any tool that loads a LoRA can serve this task.
        """
        t = self._key(task)
        t = 0 if t is None else t
        coef = self.rank_coefficients()[t]  # (R_all,)
        cols = torch.cat([
            torch.arange(self.expert_slices[e].start, self.expert_slices[e].stop)
            for e in self.visible_experts[t].tolist()
        ]).to(self.lora_A.device)  # (r_active,)
        A, B = self.factors()  # (R_all, d_in), (d_out, R_all)
        return A.float()[cols].clone(), B.float()[:, cols] * coef[cols]

    # --- adding a task later ------------------------------------------------------------------
    @property
    def _block(self) -> int:
        """Rank columns one added task brings: the sum of the specific ranks."""
        return sum(self.config.specific_ranks)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' factors in storage order: A (R_all, d_in), B (d_out, R_all), with the
        blocks of tasks added later after ``lora_A`` / ``lora_B`` (a copy only if there are any)."""
        if not len(self.added_A):
            return self.lora_A, self.lora_B
        return (torch.cat([self.lora_A, *self.added_A]),  # (R_all, d_in)
                torch.cat([self.lora_B, *self.added_B], dim=1))  # (d_out, R_all)

    def add_task(self) -> list[nn.Parameter]:
        """Give the router's newest task (already added to ``self.router``) its own experts.

        The new task uses the existing common experts and gets K_s new specific experts, stored
        in a block of their own (``added_A[k]`` (K_s ranks, d_in), ``added_B[k]`` (d_out, K_s
        ranks), B at zero: the new task starts with the common experts only), plus a row of the
        gate (``TaskGate.add_task``) when this layer owns its gate. Nothing existing moves or
        changes shape, and for samples of other tasks the new block's coefficients are exactly
        zero: their outputs stay bit for bit what they were. Returns the new parameters.
        """
        if self.merged:
            raise RuntimeError("unmerge() before adding a task")
        n_tasks = len(self.router.tasks)
        known = self.n_base_tasks + self.n_added
        if n_tasks != known + 1:
            raise RuntimeError(f"the router has {n_tasks} tasks and this layer {known}: add one "
                               "task to the router, then call add_task once (CGCAdapters.add_task does)")
        new: list[nn.Parameter] = []
        if self.config.n_specific:
            kw = dict(device=self.lora_A.device, dtype=self.lora_A.dtype)
            A = nn.Parameter(torch.empty(self._block, self.in_features, **kw))  # (K_s ranks, d_in)
            B = nn.Parameter(torch.zeros(self.out_features, self._block, **kw))  # (d_out, K_s ranks)
            start = 0
            for r in self.config.specific_ranks:  # each expert initialised at its own rank
                init_lora_A(A.data[start:start + r], self.config.init)
                start += r
            self.added_A.append(A)
            self.added_B.append(B)
            new += [A, B]
        self.n_added += 1  # without specific experts (MOELoRA) the task has only a gate row
        if self.gate is not None:
            new.append(self.gate.add_task())
        self._build_index(self.lora_A.device)
        return new

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{super().extra_repr()}, tasks={len(self.tasks)}, common={list(c.common_ranks)}, "
            f"specific={list(c.specific_ranks)}, gate={c.gate}"
        )
