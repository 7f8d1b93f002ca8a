"""CGC-LoRA in any model: ``inject`` puts CGC-LoRA layers in, freezes the rest, routes tasks.

    adapters = inject(model, CGCConfig(), tasks=["topic", "sentiment"])
    print(adapters.report)                               # matched modules, trainable parameters
    out = model(input_ids, task_ids=["topic", "sentiment"])   # one task per sample
    ids = model.generate(input_ids, task_ids=[0, 1], max_new_tokens=8)
    with adapters.disabled():                             # the base model
        base_out = model(input_ids)
    adapters.save("folder"); load_adapters(model2, "folder")

``inject`` replaces each target ``nn.Linear`` (by name: ``"all-linear"``, names or suffixes, a
regular expression, with exclusions) by a ``CGCLoRALinear`` wrapping it, and freezes every other
parameter. All adapted layers share one ``TaskRouter``. ``CGCAdapters`` is the handle: an
``adapters.AdapterSet`` (attach/detach, task-id hooks, parameters, state, merge, save/load) plus
what is CGC-LoRA's own: the gate weights of every layer, and adding a task to a trained cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from torch import nn

from .adapters import AdapterSet, attached_adapters, find_targets
from .cgc import CGCConfig, CGCLoRALinear, TaskGate, expert_names
from .checkpoint import CheckpointError
from .lora import adapter_dtype, layer_shape


@dataclass
class GateWeights:
    """Gate weights of every adapted layer: ``weights`` (layer, task, expert), rows sum to 1 (to the
    number of experts a task may use with ``gate_norm="scaled"``).

    ``experts`` lists all experts of a layer (common, then each task's own); an entry is 0 where the
    task may not use that expert.
    """

    weights: torch.Tensor
    layers: list[str]
    tasks: list[str]
    experts: list[str]
    value: str = "gate weight"  # what the numbers are: "gate weight" or "contribution share"
    total: float = 1.0  # what a task's row sums to (K with gate_norm="scaled"; 1 for shares)

    def to_frame(self) -> pd.DataFrame:
        """Long format (layer, task, expert, weight): what seaborn wants."""
        w = self.weights
        index = pd.MultiIndex.from_product([self.layers, self.tasks, self.experts],
                                           names=["layer", "task", "expert"])
        return pd.DataFrame({"weight": w.reshape(-1).numpy()}, index=index).reset_index()


class CGCAdapters(AdapterSet):
    """One set of CGC-LoRA adapters on a model (one cluster of tasks): the handle ``inject`` returns.

    Besides ``AdapterSet``'s attributes: ``shared_gate`` (a ``TaskGate`` when
    ``config.gate_scope == "shared"``, else None; it is ``extras["gate"]``).
    """

    kind, title, config_class = "cgclora", "CGC-LoRA", CGCConfig
    structural = ("n_common", "n_specific", "common_ranks", "specific_ranks", "gate", "gate_scope",
                  "gate_norm", "task_embedding_dim", "alpha")

    def _build_layers(self, targets: list[str]) -> dict[str, CGCLoRALinear]:
        """One ``CGCLoRALinear`` per target (and the shared gate, if the config asks for one)."""
        config, model = self.config, self.model
        first = model.get_submodule(targets[0])
        if config.gate == "task" and config.gate_scope == "shared":
            self.extras["gate"] = TaskGate(
                len(self.tasks), config.n_common + config.n_specific, config.task_embedding_dim,
                device=first.weight.device, dtype=adapter_dtype(config.adapter_dtype, first),
                norm=config.gate_norm,
            )
        return {name: CGCLoRALinear(model.get_submodule(name), self.router, config, self.shared_gate)
                for name in targets}

    @property
    def shared_gate(self) -> TaskGate | None:
        return self.extras.get("gate")

    def optimizer_groups(self) -> list[dict]:
        """The trainable parameters in two groups: the gates' at ``lr_scale =
        config.gate_lr_scale``, every expert's at 1 (``train`` multiplies the run's rate by it)."""
        gates = [layer.gate for layer in self.layers.values() if layer.gate is not None]
        gate_ids = {id(p) for gate in gates + [self.shared_gate] if gate is not None
                    for p in gate.parameters()}
        params = self.parameters()
        groups = [{"params": [p for p in params if id(p) not in gate_ids], "lr_scale": 1.0},
                  {"params": [p for p in params if id(p) in gate_ids], "lr_scale": self.config.gate_lr_scale}]
        return [g for g in groups if g["params"]]

    @property
    def added_tasks(self) -> list[str]:
        """Tasks added after the adapters were built (``add_task``), in order."""
        return list(self.tasks[next(iter(self.layers.values())).n_base_tasks:])

    def add_task(self, name: str, freeze_existing: bool = True) -> list[nn.Parameter]:
        """Add task ``name`` to this cluster without changing what the other tasks compute.

        The new task gets its own K_s specific experts in every layer (B at zero) and its own gate
        row (a task embedding e_new; the gate map G is shared and stays as trained). It uses the
        existing common experts. With ``freeze_existing`` (the default) every existing adapter
        parameter is frozen, so training then learns only the new task's experts and embedding,
        and every existing task's outputs stay bit for bit what they were (tested). Returns the
        new parameters; the new task's id is the last one.
        """
        config = self.config
        if config.n_specific == 0 and config.gate == "none":
            raise ValueError(
                f"a {config.method} cluster has neither task-specific experts nor a gate: a new task "
                "would have nothing of its own to learn. Use a config with n_specific >= 1 or a gate."
            )
        if self.merged_task is not None:
            raise RuntimeError("unmerge() before adding a task")
        if freeze_existing:
            self.requires_grad_(False)
        self.router.add_task(name)
        new = [self.shared_gate.add_task()] if self.shared_gate is not None else []
        for layer in self.layers.values():
            new += layer.add_task()
        return new

    @torch.no_grad()
    def gate_weights(self) -> GateWeights:
        """All layers' gate weights as one (layer, task, expert) tensor on the CPU, plus names."""
        weights = torch.stack([layer.expert_weights() for layer in self.layers.values()])
        visible = self.config.n_common + self.config.n_specific
        return GateWeights(
            weights.float().cpu(), list(self.layers), list(self.tasks),
            expert_names(self.config, self.tasks),
            total=float(visible) if self.config.gate_norm == "scaled" and self.config.gate == "task" else 1.0,
        )

    @torch.no_grad()
    def expert_contributions(self) -> GateWeights:
        """Each expert's share of each task's update, per layer: ``|s w_{t,e}| ||B_e A_e||_F``
        over its sum across the experts task t uses (``CGCLoRALinear.expert_contributions``).

        (layer, task, expert) shares in [0, 1], rows summing to 1 (0 everywhere while every B
        is still zero, before training). Unlike gate weights, shares say which experts a task
        relies on: a gate weight can be traded against the size of an expert's B.
        """
        shares = torch.stack([layer.contribution_shares() for layer in self.layers.values()])  # (L, T, E)
        return GateWeights(shares.cpu(), list(self.layers), list(self.tasks),
                           expert_names(self.config, self.tasks), value="contribution share")

    # --- checkpoints: what a CGC-LoRA folder adds (see AdapterSet.save / load) ----------------
    def _meta(self) -> dict:
        return {"added_tasks": self.added_tasks}  # the last tasks, added later (add_task)

    def _check_meta(self, meta: dict) -> None:
        if list(meta.get("added_tasks", [])) != self.added_tasks:
            raise CheckpointError(
                f"the checkpoint's tasks added later {meta.get('added_tasks', [])} differ from these "
                f"adapters' {self.added_tasks}: call add_task for each, in order, before loading"
            )

    @classmethod
    def _from_meta(cls, model: nn.Module, config: CGCConfig, meta: dict) -> "CGCAdapters":
        tasks, added = list(meta["tasks"]), list(meta.get("added_tasks", []))
        if added and tasks[len(tasks) - len(added):] != added:
            raise CheckpointError(f"added_tasks {added} are not the last of tasks {tasks}")
        adapters = cls.inject(model, config, tasks[: len(tasks) - len(added)])
        try:
            for name in added:  # rebuilt in the same order, so every block has its saved place
                adapters.add_task(name)
        except Exception:
            adapters.detach()
            raise
        return adapters


# --- counting parameters before building anything -----------------------------------------

def target_shapes(model, config: CGCConfig) -> dict[str, tuple[int, int]]:
    """``{module name: (d_out, d_in)}`` of every linear layer ``inject(model, config, ...)`` adapts.

    The model must not have adapters attached (their layers are no longer ``nn.Linear``).
    """
    if attached_adapters(model) is not None:
        raise ValueError("the model has CGC-LoRA adapters attached: detach() them (or call the "
                         "framework's deactivate()) before reading its layer shapes")
    names = find_targets(model, config.target_modules, config.exclude_modules)
    return {n: layer_shape(model.get_submodule(n)) for n in names}  # (d_out, d_in), Linear or Conv1D


def count_parameters(model_or_shapes, config: CGCConfig, n_tasks: int) -> dict[str, int]:
    """Parameter counts of CGC-LoRA adapters with ``config`` for ``n_tasks`` tasks, without building them.

    ``model_or_shapes``: a model (its targets are found as ``inject`` finds them), a dict
    ``{name: (d_out, d_in)}`` (``target_shapes``), or a list of ``(d_out, d_in)``. Per adapted
    layer, an expert of rank r has ``r * (d_in + d_out)`` parameters (A: r x d_in, B: d_out x r)
    and a task gate ``T * D + (K_c + K_s) * D`` (task embeddings T x D, map G (K_c + K_s) x D),
    one per layer or one in all (``gate_scope``). Returns a dict:

    * ``adapted_layers``, ``active_rank`` (r_active: the rank one task sees), ``total_rank`` (R
      per layer, all experts of all tasks);
    * ``common``, ``specific`` (all tasks), ``specific_per_task``, ``gate``: the parts;
    * ``trainable``: their sum, equal to ``inject(...).num_trainable()``;
    * ``per_task``: the expert parameters one task uses, ``common + specific_per_task``: the size
      of the plain LoRA of rank r_active that exports that task (``export_factors``).
    """
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    if isinstance(model_or_shapes, dict):
        shapes = list(model_or_shapes.values())
    elif isinstance(model_or_shapes, (list, tuple)):
        shapes = list(model_or_shapes)
    else:
        shapes = list(target_shapes(model_or_shapes, config).values())
    if not shapes:
        raise ValueError("no layer shapes: nothing would be adapted")
    width = sum(d_out + d_in for d_out, d_in in shapes)  # one rank column in every layer
    common = sum(config.common_ranks) * width
    specific_per_task = sum(config.specific_ranks) * width
    gate = 0
    if config.gate == "task":
        one_gate = (n_tasks + config.n_common + config.n_specific) * config.task_embedding_dim
        gate = one_gate * (len(shapes) if config.gate_scope == "layer" else 1)
    return {
        "adapted_layers": len(shapes),
        "active_rank": config.r_active,
        "total_rank": sum(config.common_ranks) + n_tasks * sum(config.specific_ranks),
        "common": common,
        "specific": n_tasks * specific_per_task,
        "specific_per_task": specific_per_task,
        "gate": gate,
        "trainable": common + n_tasks * specific_per_task + gate,
        "per_task": common + specific_per_task,
    }


def inject(model: nn.Module, config: CGCConfig, tasks: Sequence[str]) -> CGCAdapters:
    """Adapt ``model`` in place for a cluster of ``tasks``; return the adapters' handle.

    Every model parameter is frozen; only the experts and gates train. The first task is id 0.
    """
    return CGCAdapters.inject(model, config, tasks)


def load_adapters(model: nn.Module, path) -> CGCAdapters:
    """Inject the CGC-LoRA adapters saved in folder ``path`` into ``model`` and load their weights.

    The model must be the base model they were trained on (same module names and shapes);
    everything is checked first, and a failed load leaves the model as it was.
    """
    return CGCAdapters.from_folder(model, path)
