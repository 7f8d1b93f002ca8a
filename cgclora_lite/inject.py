"""Injection: put CGC-LoRA layers into any model, freeze the rest, and route tasks through it.

    adapters = inject(model, CGCConfig(), tasks=["topic", "sentiment"])
    print(adapters.report)                               # matched modules, trainable parameters
    out = model(input_ids, task_ids=["topic", "sentiment"])   # one task per sample
    ids = model.generate(input_ids, task_ids=[0, 1], max_new_tokens=8)
    with adapters.disabled():                             # the base model
        base_out = model(input_ids)

``inject`` replaces each target ``nn.Linear`` (by name: ``"all-linear"``, names or suffixes, a
regular expression, with exclusions) by a ``CGCLoRALinear`` wrapping it, and freezes every other
parameter. All adapted layers share one ``TaskRouter``; hooks on the model take the ``task_ids``
keyword of a forward or ``generate`` call and hold it on the router for exactly that call.

A model holds at most one attached set of adapters. ``detach()`` puts the original linear layers
back (the adapters keep their weights) and ``attach()`` puts the adapters in again: this is how
the 1+N framework switches one central model between its N clusters without copying it.
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import pandas as pd
import torch
from torch import nn

from .lora import adapter_dtype
from .cgc import CGCConfig, CGCLoRALinear, TargetSpec, TaskGate, expert_names
from .routing import TaskIds, TaskRouter

_ATTACHED = "_cgclora_adapters"  # attribute on the model naming the attached adapter set


def matches(name: str, spec: TargetSpec | None) -> bool:
    """Whether module ``name`` matches a spec: a regex (str, full match) or names/suffixes (list)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def find_targets(model: nn.Module, target_modules: TargetSpec, exclude_modules=None) -> list[str]:
    """Names of the modules to adapt, in model order. Raises if none match or one is not Linear.

    ``"all-linear"`` takes every ``nn.Linear`` except the output head (``get_output_embeddings``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if target_modules == "all-linear":
        names = list(linear)
    else:
        names = [n for n, _ in model.named_modules() if n and matches(n, target_modules)]
        not_linear = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
        if not_linear:
            kind = type(model.get_submodule(not_linear[0])).__name__
            raise TypeError(
                f"target_modules={target_modules!r} matches {not_linear[0]!r}, a {kind}; only "
                "nn.Linear layers can be adapted. Narrow the spec (e.g. list the projection names)."
            )
    names = [n for n in names if not matches(n, exclude_modules)]
    if not names:
        sample = sorted({n.rsplit(".", 1)[-1] for n in linear})[:12]
        raise ValueError(
            f"no module matches target_modules={target_modules!r} (exclude={exclude_modules!r}). "
            f"Linear layer names in this model end with: {sample}"
        )
    return names


@dataclass
class InjectionReport:
    """What ``inject`` did: the adapted modules and the parameter counts."""

    targets: list[str]
    trainable: int
    total: int

    def __str__(self) -> str:
        suffixes = sorted({t.rsplit(".", 1)[-1] for t in self.targets})
        return (
            f"adapted {len(self.targets)} linear layers ({', '.join(suffixes)}); trainable "
            f"parameters: {self.trainable:,} of {self.total:,} ({100 * self.trainable / self.total:.3f}%)"
        )


@dataclass
class GateWeights:
    """Gate weights of every adapted layer: ``weights`` (layer, task, expert), rows sum to 1.

    ``experts`` lists all experts of a layer (common, then each task's own); an entry is 0 where the
    task may not use that expert.
    """

    weights: torch.Tensor
    layers: list[str]
    tasks: list[str]
    experts: list[str]

    def to_frame(self) -> pd.DataFrame:
        """Long format (layer, task, expert, weight): what seaborn wants."""
        w = self.weights
        index = pd.MultiIndex.from_product([self.layers, self.tasks, self.experts],
                                           names=["layer", "task", "expert"])
        return pd.DataFrame({"weight": w.reshape(-1).numpy()}, index=index).reset_index()


class CGCAdapters:
    """One set of CGC-LoRA adapters on a model (one cluster of tasks): the handle ``inject`` returns.

    Attributes: ``model``, ``config``, ``tasks``, ``router``, ``layers`` (name -> CGCLoRALinear),
    ``shared_gate`` (a ``TaskGate`` when ``config.gate_scope == "shared"``, else None),
    ``report`` (an ``InjectionReport``).
    """

    def __init__(self, model: nn.Module, config, tasks: Sequence[str], targets: list[str]):
        self.model, self.config = model, config
        self.router = TaskRouter(tasks)
        self.shared_gate: TaskGate | None = None
        self.layers = self._build_layers(targets)
        for layer in self.layers.values():  # new modules start in training mode: follow the model
            layer.train(model.training)
        if self.shared_gate is not None:
            self.shared_gate.train(model.training)
        self._hooks: list = []
        self._routes: list = []  # one entry per forward call in progress (nested calls stack)
        self.attach()
        total = sum(p.numel() for p in model.parameters())
        self.report = InjectionReport(list(targets), self.num_trainable(), total)

    def _build_layers(self, targets: list[str]) -> dict[str, nn.Module]:
        """One ``CGCLoRALinear`` per target (and the shared gate, if the config asks for one)."""
        config, model = self.config, self.model
        first = model.get_submodule(targets[0])
        if config.gate == "task" and config.gate_scope == "shared":
            self.shared_gate = TaskGate(
                len(self.tasks), config.n_common + config.n_specific, config.task_embedding_dim,
                device=first.weight.device, dtype=adapter_dtype(config.adapter_dtype, first),
            )
        return {name: CGCLoRALinear(model.get_submodule(name), self.router, config, self.shared_gate)
                for name in targets}

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.router.tasks

    def __repr__(self) -> str:
        state = "attached" if self.is_attached else "detached"
        return f"CGCAdapters({self.config.method}, tasks={list(self.tasks)}, {len(self.layers)} layers, {state})"

    # --- attach / detach ----------------------------------------------------------------------
    @property
    def is_attached(self) -> bool:
        return getattr(self.model, _ATTACHED, None) is self

    def attach(self) -> "CGCAdapters":
        """Put the adapted layers into the model and install the task-routing hooks."""
        if self.is_attached:
            return self
        if getattr(self.model, _ATTACHED, None) is not None:
            raise RuntimeError(
                "this model already has another set of adapters attached; call its detach() first"
            )
        for name, layer in self.layers.items():
            self.model.set_submodule(name, layer)
        if self.shared_gate is not None:
            self.model.add_module("cgclora_gate", self.shared_gate)
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            self.model.register_forward_hook(self._post_forward, always_call=True),
        ]
        if hasattr(self.model, "generate"):
            self.model.generate = functools.partial(self._generate, self.model.generate)
        setattr(self.model, _ATTACHED, self)
        return self

    def detach(self) -> "CGCAdapters":
        """Restore the model's original linear layers (adapters keep their weights)."""
        if not self.is_attached:
            return self
        if any(layer.merged for layer in self.layers.values()):
            raise RuntimeError("unmerge() before detaching, or the base weights stay changed")
        for name, layer in self.layers.items():
            self.model.set_submodule(name, layer.base)
        if self.shared_gate is not None:
            delattr(self.model, "cgclora_gate")
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if "generate" in vars(self.model):
            del self.model.generate
        delattr(self.model, _ATTACHED)
        return self

    # --- routing ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        layer = next(iter(self.layers.values()))
        return next(p.device for n, p in layer.named_parameters() if not n.startswith("base."))

    def route(self, task_ids: TaskIds | None):
        """``with adapters.route(ids):`` every call inside sees these per-sample task ids."""
        return self.router.route(task_ids, self._device())

    def disabled(self):
        """``with adapters.disabled():`` the model behaves as the base model."""
        return self.router.disabled()

    def _pre_forward(self, module, args, kwargs):
        task_ids = kwargs.pop("task_ids", None)
        context = self.route(task_ids) if task_ids is not None else None
        if context is not None:
            context.__enter__()
        self._routes.append(context)
        return args, kwargs

    def _post_forward(self, module, args, output):
        context = self._routes.pop() if self._routes else None
        if context is not None:
            context.__exit__(None, None, None)
        return output

    def _generate(self, generate, *args, task_ids: TaskIds | None = None, **kwargs):
        """``model.generate`` with ``task_ids``: held for the whole call, repeated per beam."""
        if task_ids is None:
            return generate(*args, **kwargs)
        ids = self.router.to_ids(task_ids)
        config = kwargs.get("generation_config") or self.model.generation_config
        beams = kwargs.get("num_beams", config.num_beams) or 1
        returns = kwargs.get("num_return_sequences", config.num_return_sequences) or 1
        ids = ids.repeat_interleave(beams if beams > 1 else returns)  # HF expands the batch so
        with self.route(ids):
            return generate(*args, **kwargs)

    # --- parameters, gates, merging -----------------------------------------------------------
    def parameters(self, trainable_only: bool = True) -> list[nn.Parameter]:
        """The adapter parameters (every expert's A and B and the gates) that train, or all of
        them with ``trainable_only=False`` (they differ after ``add_task`` froze the old ones)."""
        seen, params = set(), []
        for layer in self.layers.values():
            for name, p in layer.named_parameters():
                if not name.startswith("base.") and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if self.shared_gate is not None:
            params += list(self.shared_gate.parameters())
        return [p for p in params if p.requires_grad or not trainable_only]

    def num_trainable(self) -> int:
        """Parameters that train now."""
        return sum(p.numel() for p in self.parameters())

    def num_parameters(self) -> int:
        """All adapter parameters, trainable or frozen."""
        return sum(p.numel() for p in self.parameters(trainable_only=False))

    def requires_grad_(self, flag: bool = True) -> "CGCAdapters":
        """Make every adapter parameter trainable (or frozen); the base model stays frozen."""
        for p in self.parameters(trainable_only=False):
            p.requires_grad_(flag)
        return self

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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors only, keyed ``<module name>.<parameter>`` (and ``gate.*`` if shared)."""
        state = {}
        for name, layer in self.layers.items():
            for key, p in layer.named_parameters():
                if not key.startswith("base."):
                    state[f"{name}.{key}"] = p.detach()
        if self.shared_gate is not None:
            state.update({f"gate.{k}": v.detach() for k, v in self.shared_gate.state_dict().items()})
        return state

    @torch.no_grad()
    def gate_weights(self) -> GateWeights:
        """All layers' gate weights as one (layer, task, expert) tensor on the CPU, plus names."""
        weights = torch.stack([layer.expert_weights() for layer in self.layers.values()])
        return GateWeights(
            weights.float().cpu(), list(self.layers), list(self.tasks),
            expert_names(self.config, self.tasks),
        )

    def merge(self, task: str | int | None = None) -> None:
        """Fold one task's update into every adapted layer (zero-overhead single-task inference)."""
        done = []
        try:
            for layer in self.layers.values():
                layer.merge(task)
                done.append(layer)
        except Exception:
            for layer in done:  # leave the model as it was
                layer.unmerge()
            raise

    def unmerge(self) -> None:
        """Restore every base weight bit for bit."""
        for layer in self.layers.values():
            if layer.merged:
                layer.unmerge()

    @property
    def merged_task(self) -> str | None:
        layer = next(iter(self.layers.values()))
        if not layer.merged:
            return None
        (t,) = layer.merged_key
        return None if t is None else self.tasks[t]

    # --- persistence (see checkpoint.py) ------------------------------------------------------
    def save(self, path) -> None:
        """Write ``cgclora_config.json`` and ``cgclora_adapters.safetensors`` into folder ``path``."""
        from .checkpoint import save_adapters

        save_adapters(self, path)

    def load(self, path) -> "CGCAdapters":
        """Load saved adapter weights into these adapters, after checking that they fit."""
        from .checkpoint import load_into

        load_into(self, path)
        return self


def inject(model: nn.Module, config: CGCConfig, tasks: Sequence[str]) -> CGCAdapters:
    """Adapt ``model`` in place for a cluster of ``tasks``; return the adapters' handle.

    Every model parameter is frozen; only the experts and gates train. The first task is id 0.
    """
    if getattr(model, _ATTACHED, None) is not None:
        raise RuntimeError(
            "this model already has CGC-LoRA adapters attached; detach() them before injecting "
            "another set (or use the 1+N framework, which switches clusters for you)"
        )
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    model.requires_grad_(False)
    return CGCAdapters(model, config, tasks, targets)


@contextmanager
def no_adapters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model, whatever adapters are attached (none is fine too)."""
    adapters = getattr(model, _ATTACHED, None)
    if adapters is None:
        yield
    else:
        with adapters.disabled():
            yield


def attached_adapters(model: nn.Module) -> CGCAdapters | None:
    """The adapters attached to ``model``, if any."""
    return getattr(model, _ATTACHED, None)
