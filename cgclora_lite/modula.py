"""MoDULA: universal and domain-specific LoRA experts, trained in stages, mixed by a token router.

MoDULA (Ma et al., EMNLP 2024, arXiv 2412.07405) is a sibling of CGC-LoRA that needs **no task id
at inference**. Each adapted linear layer ``W0`` (d_out, d_in) gets

* a **universal expert** ``(A_u, B_u)`` of rank r_u, learned on all tasks;
* one **domain expert** ``(A_d, B_d)`` of rank r_d per domain (here: per task cluster);
* a **token-level router** ``g(x) = softmax(W_r x)``, ``W_r`` (E, d_in), zero at the start.

Two variants:

    MoDULA-Flan:  h = W0 x + s * sum_{e in {u, 1..D}} g_e(x) B_e A_e x          (E = D + 1)
    MoDULA-Res:   h = W0 x + s * ( B_u A_u x + sum_{d=1..D} g_d(x) B_d A_d x )   (E = D)

with ``s = alpha / (r_u + r_d)``: a token that the router sends to one domain sees rank r_u + r_d.
Training runs in three stages, each with only its own parameters trainable:

1. **universal**: ``h = W0 x + s B_u A_u x`` on batches of all tasks;
2. **domain d**, for each domain: ``h = W0 x + s (B_u A_u x + B_d A_d x)`` on that domain's tasks,
   the universal expert frozen;
3. **router**: the full mixture above on all tasks, every expert frozen.

A new domain is plugged in later (``add_domain``) by training its expert (stage 2, everything
else frozen) and then the router again (stage 3): no existing expert is retrained.

What comes from the paper's abstract and public summaries: universal experts, domain experts and
routers trained separately in that order; the Flan variant mixes all experts through the router;
the Res variant keeps the universal expert on a residual path; new domains are added without
retraining existing experts. **This project's choices** (the full paper's details may differ): one
universal expert and one expert per domain of ranks 4 and 2 (with two domains a token computes
rank 4 + 2 x 2 = 8, the experiment's equal active rank); a dense softmax router per layer on the
layer input (no top-k, no load-balancing loss); the stage-2 output adds the frozen universal
expert; ``s = alpha / (r_u + r_d)``; the training budget split 40% / 40% / 20% across the stages
(the domains share stage 2 in proportion to their number of tasks).

A MoDULA layer cannot be merged into one weight (the router depends on the token), unlike
CGC-LoRA, whose gate sees only the task: that is the price of not needing task ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from .adapters import AdapterSet
from .checkpoint import CheckpointError, JSONConfig
from .data import Collator, MultiTaskDataset, task_balanced_loader
from .lora import AdaptedLinear, MergeError, TargetSpec, adapter_dtype, init_lora_A
from .tasks import Task
from .train import TrainConfig, proportional_steps, train

VARIANTS = ("flan", "res")


@dataclass
class MoDULAConfig(JSONConfig):
    """A MoDULA adapter set. ``stage_fractions``: shares of the training steps of the universal,
    domain and router stages (they must sum to 1). ``router_lr_scale``: the router stage's
    learning rate is the run's times this (the router starts at zero and its gradient is small:
    at the run's rate it barely leaves uniform weights in a short budget)."""

    variant: str = "res"
    rank_universal: int = 4
    rank_domain: int = 2
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "kaiming"
    adapter_dtype: str = "float32"
    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec | None = None
    stage_fractions: tuple[float, float, float] = (0.4, 0.4, 0.2)
    router_lr_scale: float = 10.0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.rank_universal < 1 or self.rank_domain < 1:
            raise ValueError("rank_universal and rank_domain must be >= 1")
        self.stage_fractions = tuple(float(f) for f in self.stage_fractions)
        if len(self.stage_fractions) != 3 or abs(sum(self.stage_fractions) - 1) > 1e-6 or min(self.stage_fractions) <= 0:
            raise ValueError(f"stage_fractions must be three positive shares summing to 1, got {self.stage_fractions}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        if self.router_lr_scale <= 0:
            raise ValueError(f"router_lr_scale must be > 0, got {self.router_lr_scale}")

    @property
    def scaling(self) -> float:
        """``s = alpha / (r_u + r_d)``."""
        return self.alpha / (self.rank_universal + self.rank_domain)

    @property
    def method(self) -> str:
        return f"modula-{self.variant}"


class MoDULALinear(AdaptedLinear):
    """A frozen ``nn.Linear`` with a universal expert, one expert per domain and a token router.

    Parameters: ``universal_A`` (r_u, d_in), ``universal_B`` (d_out, r_u); ``domain_A[d]``
    (r_d, d_in), ``domain_B[d]`` (d_out, r_d); ``router`` (E, d_in), E = D + 1 (flan: the universal
    expert first) or D (res). Every B and the router start at zero (the layer starts as the base
    layer; the router starts uniform). ``stage`` selects the computation (see the module doc):
    ``"universal"``, an int d (domain d's stage) or ``"routed"``.
    """

    def __init__(self, base: nn.Linear, n_domains: int, config: MoDULAConfig):
        super().__init__(base)
        self.config, self.scaling = config, config.scaling
        self._kw = dict(device=base.weight.device, dtype=adapter_dtype(config.adapter_dtype, base))
        self.universal_A = nn.Parameter(torch.empty(config.rank_universal, self.in_features, **self._kw))
        self.universal_B = nn.Parameter(torch.zeros(self.out_features, config.rank_universal, **self._kw))
        init_lora_A(self.universal_A.data, config.init)
        self.domain_A, self.domain_B = nn.ParameterList(), nn.ParameterList()
        self.router = nn.Parameter(torch.zeros(int(config.variant == "flan"), self.in_features, **self._kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.stage: str | int = "routed"
        for _ in range(n_domains):
            self.add_domain()

    @property
    def n_domains(self) -> int:
        return len(self.domain_A)

    def add_domain(self) -> list[nn.Parameter]:
        """A new domain expert (B at zero) and a router row for it (all router rows are zeroed:
        the router is retrained after a domain is added). Returns the new expert's parameters."""
        A = nn.Parameter(torch.empty(self.config.rank_domain, self.in_features, **self._kw))  # (r_d, d_in)
        init_lora_A(A.data, self.config.init)
        B = nn.Parameter(torch.zeros(self.out_features, self.config.rank_domain, **self._kw))  # (d_out, r_d)
        self.domain_A.append(A)
        self.domain_B.append(B)
        rows = self.router.shape[0] + 1
        self.router = nn.Parameter(torch.zeros(rows, self.in_features, **self._kw))  # (E, d_in)
        return [A, B]

    def router_weights(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) = softmax(W_r x): (..., E) in fp32, for x (..., d_in)."""
        return (x.to(self.router.dtype) @ self.router.T).float().softmax(dim=-1)  # (..., E)

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        """x (..., d_in) -> (..., d_out). ``task_ids`` is accepted and ignored: no task routing."""
        h = self.base(x)  # (..., d_out)
        if self.merged:
            return h
        xd = self.dropout(x).to(self.universal_A.dtype)  # (..., d_in)
        r_u, r_d = self.config.rank_universal, self.config.rank_domain
        if self.stage == "universal":
            A, B, coef = self.universal_A, self.universal_B, None
        elif isinstance(self.stage, int):
            d = self.stage
            A = torch.cat([self.universal_A, self.domain_A[d]])  # (r_u + r_d, d_in)
            B = torch.cat([self.universal_B, self.domain_B[d]], dim=1)  # (d_out, r_u + r_d)
            coef = None
        else:
            A = torch.cat([self.universal_A, *self.domain_A])  # (R, d_in), R = r_u + D r_d
            B = torch.cat([self.universal_B, *self.domain_B], dim=1)  # (d_out, R)
            g = self.router_weights(xd)  # (..., E)
            if self.config.variant == "flan":  # g_u on the universal columns, g_d on domain d's
                universal = g[..., :1].expand(*g.shape[:-1], r_u)  # (..., r_u)
                domains = g[..., 1:]  # (..., D)
            else:  # res: the universal expert is always on, weight 1
                universal, domains = g.new_ones(*g.shape[:-1], r_u), g  # (..., r_u), (..., D)
            coef = torch.cat([universal, domains.repeat_interleave(r_d, dim=-1)], dim=-1)  # (..., R)
        u = xd @ A.T  # (..., rank)
        if coef is not None:
            u = u * coef.to(u.dtype)
        return h + (self.scaling * (u @ B.T)).to(h.dtype)  # (..., d_out)

    def delta_weight(self, *key) -> torch.Tensor:
        if self.stage == "routed":
            raise MergeError("a MoDULA layer with its token router has no single update matrix to "
                             "merge: the router's weights change from token to token")
        x = torch.eye(self.in_features, device=self.base.weight.device)  # (d_in, d_in)
        with torch.no_grad():
            return (self(x) - self.base(x)).float().T  # (d_out, d_in)

    def extra_repr(self) -> str:
        c = self.config
        return (f"{super().extra_repr()}, variant={c.variant}, universal={c.rank_universal}, "
                f"domains={self.n_domains}x{c.rank_domain}, stage={self.stage}")


class MoDULAAdapters(AdapterSet):
    """MoDULA adapters on a model: an ``adapters.AdapterSet`` (attach/detach, the ``task_ids``
    keyword accepted and ignored by the layers, ``disabled()``, ``parameters()``, save/load),
    plus training stages, adding a domain and the routing table.

    ``domains``: ``{domain name: [task names]}``. ``tasks`` lists every task (ids are accepted so
    the same batches and evaluation code serve every method; the layers never read them).
    """

    kind, title, config_class = "modula", "MoDULA", MoDULAConfig
    structural = ("variant", "rank_universal", "rank_domain", "alpha")

    def __init__(self, model: nn.Module, config: MoDULAConfig, domains: dict[str, Sequence[str]],
                 targets: list[str]):
        self.domains = {name: list(tasks) for name, tasks in domains.items()}
        if not self.domains or not all(self.domains.values()):
            raise ValueError(f"MoDULA needs at least one domain, each with tasks: got {domains}")
        tasks = [t for members in self.domains.values() for t in members]
        super().__init__(model, config, tasks, targets)

    def _build_layers(self, targets: list[str]) -> dict[str, MoDULALinear]:
        return {name: MoDULALinear(self.model.get_submodule(name), len(self.domains), self.config)
                for name in targets}

    def __repr__(self) -> str:
        return f"MoDULAAdapters({self.config.method}, domains={self.domains}, {len(self.layers)} layers)"

    # --- stages -----------------------------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        """``"universal"``, a domain name, or ``"router"``: which parameters train and what every
        layer computes (``"router"`` and inference use the full routed mixture)."""
        if stage != "universal" and stage != "router" and stage not in self.domains:
            raise ValueError(f"stage must be 'universal', 'router' or a domain of {list(self.domains)}")
        layer_stage = ("routed" if stage == "router" else stage if stage == "universal"
                       else list(self.domains).index(stage))
        self.requires_grad_(False)
        for layer in self.layers.values():
            layer.stage = layer_stage
            if stage == "universal":
                trainable = [layer.universal_A, layer.universal_B]
            elif stage == "router":
                trainable = [layer.router]
            else:
                trainable = [layer.domain_A[layer_stage], layer.domain_B[layer_stage]]
            for p in trainable:
                p.requires_grad_(True)

    def add_domain(self, name: str, tasks: Sequence[str]) -> list[nn.Parameter]:
        """Plug in a new domain: a new expert per layer, the router reset for retraining.

        Existing experts are not touched. Train ``set_stage(name)`` on the new domain's tasks,
        then ``set_stage("router")`` on all tasks (``train_modula(..., only=[name])`` does both).
        """
        if name in self.domains:
            raise ValueError(f"domain {name!r} exists already: {list(self.domains)}")
        for task in tasks:
            self.router.add_task(task)
        self.domains[name] = list(tasks)
        new = []
        for layer in self.layers.values():
            new += layer.add_domain()
        return new

    @torch.no_grad()
    def routing_table(self, batches) -> pd.DataFrame:
        """Mean router weight per task and expert, averaged over layers and tokens of ``batches``
        (dicts with ``input_ids``, ``attention_mask``, ``task_ids`` and optionally ``labels``):
        over the answer positions when the batch has labels (the prompt template is the same for
        every task and would flatten the table), else over every attended token."""
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        captured = []
        hooks = [layer.register_forward_pre_hook(lambda m, a: captured.append((m, a[0])))
                 for layer in self.layers.values()]
        device = self._device()
        try:
            for batch in batches:
                captured.clear()
                self.model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                mask = batch["attention_mask"].to(device).bool()  # (B, L)
                if "labels" in batch:  # the positions that predict an answer token
                    answer = torch.zeros_like(mask)
                    answer[:, :-1] = batch["labels"][:, 1:].to(device) != -100
                    mask = mask & answer
                for layer, x in captured:
                    g = layer.router_weights(x)[mask]  # (tokens, E)
                    ids = batch["task_ids"].to(device)[:, None].expand_as(mask)[mask]  # (tokens,)
                    for t in ids.unique().tolist():
                        sums[t] = sums.get(t, 0) + g[ids == t].sum(0)
                        counts[t] = counts.get(t, 0) + int((ids == t).sum())
        finally:
            for hook in hooks:
                hook.remove()
        experts = ["universal"] * (self.config.variant == "flan") + list(self.domains)
        rows = {self.tasks[t]: (sums[t] / counts[t]).cpu().numpy() for t in sorted(sums)}
        return pd.DataFrame(rows, index=experts).T

    # --- checkpoints: what a MoDULA folder adds (see AdapterSet.save / load) -------------------
    def _meta(self) -> dict:
        return {"domains": self.domains}

    def _check_meta(self, meta: dict) -> None:
        if meta["domains"] != self.domains:
            raise CheckpointError(f"the checkpoint's domains {meta['domains']} differ from these "
                                  f"adapters' {self.domains}")

    @classmethod
    def _from_meta(cls, model: nn.Module, config: MoDULAConfig, meta: dict) -> "MoDULAAdapters":
        return cls.inject(model, config, meta["domains"])


def inject_modula(model: nn.Module, config: MoDULAConfig, domains: dict[str, Sequence[str]]) -> MoDULAAdapters:
    """Adapt ``model`` in place with MoDULA layers for ``domains`` (``{name: [task names]}``)."""
    return MoDULAAdapters.inject(model, config, domains)


def load_modula(model: nn.Module, path) -> MoDULAAdapters:
    """Inject the MoDULA adapters saved in folder ``path`` into ``model`` and load their weights
    (everything checked first; a failed load leaves the model as it was)."""
    return MoDULAAdapters.from_folder(model, path)


def stage_steps(steps: int, config: MoDULAConfig, domains: dict[str, Sequence[Task]],
                only: Sequence[str] | None = None) -> dict[str, int]:
    """Steps per stage: universal, each domain (in proportion to its tasks), router, by
    ``train.proportional_steps`` (>= 1 each, summing to ``steps``, which must be at least the
    number of stages). With ``only`` (domains added later) there is no universal stage and those
    domains and the router share ``steps``."""
    f_u, f_d, f_r = config.stage_fractions
    if only is not None:
        domains = {d: domains[d] for d in only}
    total = sum(len(t) for t in domains.values())
    weights = {"universal": f_u} if only is None else {}
    weights.update({d: f_d * len(t) / total for d, t in domains.items()})
    weights["router"] = f_r
    if steps < len(weights):
        raise ValueError(f"MoDULA needs at least {len(weights)} steps (one per stage), got {steps}")
    return proportional_steps(steps, weights)


def train_modula(adapters: MoDULAAdapters, tasks: Sequence[Task], tokenizer, config: TrainConfig,
                 batch_size: int = 8, max_length: int = 256, progress: bool = True,
                 only: Sequence[str] | None = None, on_stage=None) -> dict[str, list[dict]]:
    """The three MoDULA stages, each a ``train.train`` run on task-balanced batches.

    ``config.steps`` is the total over all stages (split by ``stage_steps``). With ``only`` (domain
    names, e.g. a domain just added) the universal stage is skipped, only those domains' experts
    train in stage 2, and the router retrains on all tasks (at ``router_lr_scale`` times the rate).
    ``on_stage(stage, adapters)``, if given, runs after each stage (e.g. to snapshot the weights).
    Returns ``{stage: history}``; leaves the layers in the routed (inference) stage.
    """
    by_name = {t.name: t for t in tasks}
    missing = [t for t in adapters.tasks if t not in by_name]
    if missing:
        raise ValueError(f"no data for tasks {missing}: pass every task of the adapters' domains")
    ordered = [by_name[t] for t in adapters.tasks]  # dataset ids = the adapters' task ids
    domains = {d: [by_name[t] for t in members] for d, members in adapters.domains.items()}
    if only is not None and (not only or set(only) - set(domains)):
        raise ValueError(f"only={list(only)} must name some of the domains {list(domains)}")
    steps = stage_steps(config.steps, adapters.config, domains, only)
    stages = ["universal", *adapters.domains, "router"] if only is None else [*only, "router"]
    data = MultiTaskDataset(ordered, tokenizer, "train", max_length)
    validation = None  # per-task validation loss during every stage, as the other methods record
    if config.eval_every and all(t.validation for t in ordered):
        val_data = MultiTaskDataset(ordered, tokenizer, "validation", max_length)
        validation = list(DataLoader(val_data, batch_size=batch_size, collate_fn=Collator(tokenizer.pad_token_id)))
    histories = {}
    for stage in stages:
        members = adapters.domains[stage] if stage in adapters.domains else None
        loader = task_balanced_loader(data, tokenizer.pad_token_id, batch_size,
                                      steps[stage] * config.grad_accum, config.seed, members)
        adapters.set_stage(stage)
        lr = config.lr * (adapters.config.router_lr_scale if stage == "router" else 1.0)
        histories[stage] = train(adapters, loader, dataclasses.replace(config, steps=steps[stage], lr=lr),
                                 validation, progress=progress)
        if on_stage is not None:
            on_stage(stage, adapters)
    adapters.set_stage("router")
    adapters.requires_grad_(True)
    return histories
