"""A set of adapters in a model: what every kind of adapter set shares.

An adapter set replaces some ``nn.Linear`` layers of a frozen model by adapted layers
(``lora.AdaptedLinear`` subclasses) and keeps a handle on them. ``AdapterSet`` does everything that
does not depend on what the layers compute:

* **targets**: ``find_targets`` picks the layers to adapt (``"all-linear"``, names or suffixes, a
  regular expression, with exclusions);
* **attach / detach**: a model holds at most one attached set. ``detach()`` puts the original
  layers back (the adapters keep their weights) and ``attach()`` puts the adapters in again: this
  is how the 1+N framework switches one central model between its N clusters without copying it;
* **task routing**: hooks take the ``task_ids`` keyword of a forward or ``generate`` call and hold
  it on the set's ``TaskRouter`` for exactly that call (``route(ids)`` does it for a block);
* **parameters and state**: the adapter parameters (never the base model's), their state dict;
* **merging** one task into the base weights, and **save / load** through ``checkpoint`` (plain
  tensors and JSON, checked against the model before any weight is touched).

A kind of adapter set is a subclass that says what its layers are and what its files hold::

    class CGCAdapters(AdapterSet):
        kind, config_class = "cgclora", CGCConfig         # files cgclora_config.json, ...
        def _build_layers(self, targets): ...             # {module name: adapted layer}
        def _meta(self): ...                              # what its checkpoint adds to the common part
        @classmethod
        def _from_meta(cls, model, config, meta): ...     # rebuild the (untrained) set from it

``inject.CGCAdapters`` (CGC-LoRA and the methods that are special cases of it) and
``modula.MoDULAAdapters`` (token-routed experts) are the two kinds in this package.
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import checkpoint
from .lora import SUPPORTED_LAYERS, AdaptedLinear, TargetSpec, is_adaptable
from .routing import TaskIds, TaskRouter

_ATTACHED = "_cgclora_adapters"  # attribute on the model holding the attached adapter set


def matches(name: str, spec: TargetSpec | None) -> bool:
    """Whether module ``name`` matches a spec: a regex (str, full match) or names/suffixes (list)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def find_targets(model: nn.Module, target_modules: TargetSpec, exclude_modules=None) -> list[str]:
    """Names of the modules to adapt, in model order. Raises if none match or one is not linear.

    ``"all-linear"`` takes every linear layer (``nn.Linear``, or transformers' ``Conv1D`` in
    GPT-2-style models) except the output head (``get_output_embeddings``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [n for n, m in model.named_modules() if is_adaptable(m) and m is not head]
    if target_modules == "all-linear":
        names = list(linear)
    else:
        names = [n for n, _ in model.named_modules() if n and matches(n, target_modules)]
        not_linear = [n for n in names if not is_adaptable(model.get_submodule(n))]
        if not_linear:
            kind = type(model.get_submodule(not_linear[0]))
            raise TypeError(
                f"target_modules={target_modules!r} matches {not_linear[0]!r}, a "
                f"{kind.__module__}.{kind.__name__}; only {SUPPORTED_LAYERS} layers can be "
                "adapted. Narrow the spec (e.g. list the projection names)."
            )
    names = [n for n in names if not matches(n, exclude_modules)]
    if not names:
        sample = sorted({n.rsplit(".", 1)[-1] for n in linear})[:12]
        raise ValueError(
            f"no module matches target_modules={target_modules!r} (exclude={exclude_modules!r}). "
            f"Linear layer names in this model end with: {sample}"
            + ("" if linear else f" (none: only {SUPPORTED_LAYERS} layers can be adapted)")
        )
    return names


def attached_adapters(model: nn.Module) -> "AdapterSet | None":
    """The adapter set attached to ``model``, if any."""
    return getattr(model, _ATTACHED, None)


@contextmanager
def no_adapters(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model, whatever adapters are attached (none is fine too)."""
    adapters = attached_adapters(model)
    if adapters is None:
        yield
    else:
        with adapters.disabled():
            yield


@contextmanager
def set_aside(model: nn.Module) -> Iterator[None]:
    """Take the adapters attached to ``model`` (if any) out for the block, and put them back after:
    code inside can attach adapters of its own to the same model (e.g. a notebook panel that
    trains on the central model of a ``OnePlusN`` whose cluster stays active)."""
    previous = attached_adapters(model)
    if previous is not None:
        previous.detach()  # raises if a task is merged: unmerge() first
    try:
        yield
    finally:
        if previous is not None:
            previous.attach()


@dataclass
class InjectionReport:
    """What an injection did: the adapted modules and the parameter counts."""

    targets: list[str]
    trainable: int
    total: int

    def __str__(self) -> str:
        suffixes = sorted({t.rsplit(".", 1)[-1] for t in self.targets})
        return (
            f"adapted {len(self.targets)} linear layers ({', '.join(suffixes)}); trainable "
            f"parameters: {self.trainable:,} of {self.total:,} ({100 * self.trainable / self.total:.3f}%)"
        )


class AdapterSet:
    """One set of adapters on a model. Subclasses set ``kind`` and ``config_class`` and implement
    ``_build_layers``, ``_meta`` and ``_from_meta`` (see the module docstring).

    Attributes: ``model``, ``config``, ``router`` (its ``tasks`` name the task ids), ``layers``
    (module name -> adapted layer), ``extras`` (adapter modules outside the layers, e.g. a gate
    shared by all layers: state-dict prefix -> module), ``report`` (an ``InjectionReport``).
    """

    kind: str = ""  # the checkpoint's file names: <kind>_config.json, <kind>_adapters.safetensors
    title: str = ""  # the method's name in messages
    structural: tuple[str, ...] = ()  # config fields that change the function: a checkpoint must match
    config_class: Any = None  # a dataclass with to_dict / from_dict

    def __init__(self, model: nn.Module, config, tasks: Sequence[str], targets: list[str]):
        self.model, self.config = model, config
        self.router = TaskRouter(tasks)
        self.extras: dict[str, nn.Module] = {}
        self.layers = self._build_layers(targets)
        for module in [*self.layers.values(), *self.extras.values()]:
            module.train(model.training)  # new modules start in training mode: follow the model
        self._hooks: list = []
        self._routes: list = []  # one entry per forward call in progress (nested calls stack)
        self.attach()
        total = sum(p.numel() for p in model.parameters())
        self.report = InjectionReport(list(targets), self.num_trainable(), total)

    @classmethod
    def inject(cls, model: nn.Module, config, *args) -> "AdapterSet":
        """Adapt ``model`` in place (``cls(model, config, *args, targets)``); freeze the model."""
        attached = attached_adapters(model)
        if attached is not None:
            raise RuntimeError(
                f"this model already has {attached.title} adapters attached; detach() them before "
                "injecting another set (or use the 1+N framework, which switches clusters for you)"
            )
        targets = find_targets(model, config.target_modules, config.exclude_modules)
        model.requires_grad_(False)
        return cls(model, config, *args, targets)

    def _build_layers(self, targets: list[str]) -> dict[str, AdaptedLinear]:  # pragma: no cover
        raise NotImplementedError

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.router.tasks

    def __repr__(self) -> str:
        state = "attached" if self.is_attached else "detached"
        return (f"{type(self).__name__}({self.config.method}, tasks={list(self.tasks)}, "
                f"{len(self.layers)} layers, {state})")

    # --- attach / detach ----------------------------------------------------------------------
    @property
    def is_attached(self) -> bool:
        return attached_adapters(self.model) is self

    def _put_layers(self, adapted: bool) -> None:
        """Put the adapted layers and extras into the model, or its original layers back."""
        for name, layer in self.layers.items():
            self.model.set_submodule(name, layer if adapted else layer.base)
        for prefix, module in self.extras.items():
            if adapted:
                self.model.add_module(f"cgclora_{prefix}", module)
            else:
                delattr(self.model, f"cgclora_{prefix}")

    def attach(self) -> "AdapterSet":
        """Put the adapted layers into the model and install the task-routing hooks."""
        if self.is_attached:
            return self
        if attached_adapters(self.model) is not None:
            raise RuntimeError(
                "this model already has another set of adapters attached; call its detach() first"
            )
        self._put_layers(adapted=True)
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            self.model.register_forward_hook(self._post_forward, always_call=True),
        ]
        if hasattr(self.model, "generate"):
            self.model.generate = functools.partial(self._generate, self.model.generate)
        setattr(self.model, _ATTACHED, self)
        return self

    def detach(self) -> "AdapterSet":
        """Restore the model's original linear layers (adapters keep their weights)."""
        if not self.is_attached:
            return self
        if any(layer.merged for layer in self.layers.values()):
            raise RuntimeError("unmerge() before detaching, or the base weights stay changed")
        self._put_layers(adapted=False)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if "generate" in vars(self.model):
            del self.model.generate
        delattr(self.model, _ATTACHED)
        return self

    @contextmanager
    def plain_layers(self) -> Iterator[nn.Module]:
        """Inside the block the model holds its original layers (merged weights stay merged), e.g.
        to save a merged model with transformers; the adapters go back in afterwards."""
        if not self.is_attached:
            raise RuntimeError("attach() these adapters first")
        self._put_layers(adapted=False)
        try:
            yield self.model
        finally:
            self._put_layers(adapted=True)

    # --- routing ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(iter(self.parameters(trainable_only=False))).device

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

    # --- parameters and state -----------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every adapter parameter, once, keyed ``<module name>.<parameter>`` (``<prefix>.*`` for
        the extras); the base layers' parameters are not adapter parameters."""
        seen = set()
        for name, layer in self.layers.items():
            for key, p in layer.named_parameters():
                if not key.startswith("base.") and id(p) not in seen:
                    seen.add(id(p))
                    yield f"{name}.{key}", p
        for prefix, module in self.extras.items():
            for key, p in module.named_parameters():
                yield f"{prefix}.{key}", p

    def parameters(self, trainable_only: bool = True) -> list[nn.Parameter]:
        """The adapter parameters that train, or all of them with ``trainable_only=False`` (they
        differ when some are frozen, e.g. after adding a task or in a training stage)."""
        return [p for _, p in self.named_parameters() if p.requires_grad or not trainable_only]

    def optimizer_groups(self) -> list[dict]:
        """The trainable parameters as optimizer groups, each with an ``lr_scale`` (the run's
        learning rate times it); one group at 1 here, kinds with a gate or router override it."""
        return [{"params": self.parameters(), "lr_scale": 1.0}]

    def num_trainable(self) -> int:
        """Parameters that train now."""
        return sum(p.numel() for p in self.parameters())

    def num_parameters(self) -> int:
        """All adapter parameters, trainable or frozen."""
        return sum(p.numel() for p in self.parameters(trainable_only=False))

    def requires_grad_(self, flag: bool = True) -> "AdapterSet":
        """Make every adapter parameter trainable (or frozen); the base model stays frozen."""
        for p in self.parameters(trainable_only=False):
            p.requires_grad_(flag)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors only, keyed as in ``named_parameters``."""
        return {key: p.detach() for key, p in self.named_parameters()}

    # --- merging ------------------------------------------------------------------------------
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
        """The task merged into the base weights, if any."""
        layer = next(iter(self.layers.values()))
        if not layer.merged:
            return None
        (t,) = layer.merged_key
        return None if t is None else self.tasks[t]

    # --- save and load (files: see checkpoint.py) ---------------------------------------------
    @property
    def files(self) -> checkpoint.Files:
        return checkpoint.Files(self.kind)

    def _meta(self) -> dict:
        """What this kind's checkpoint adds to the common part (config, tasks, targets, model)."""
        return {}

    def _check_meta(self, meta: dict) -> None:
        """Raise ``CheckpointError`` if a checkpoint's kind-specific part does not fit these
        adapters (``load`` calls it before touching any weight)."""

    @classmethod
    def _from_meta(cls, model: nn.Module, config, meta: dict) -> "AdapterSet":  # pragma: no cover
        raise NotImplementedError

    def save(self, path) -> Path:
        """Write ``<kind>_config.json`` and ``<kind>_adapters.safetensors`` into folder ``path``."""
        meta = {"config": self.config.to_dict(), "tasks": list(self.tasks),
                "targets": {n: [l.out_features, l.in_features] for n, l in self.layers.items()},
                **self._meta()}
        return checkpoint.write(path, self.files, meta, self.state_dict(), self.model)

    def load(self, path) -> "AdapterSet":
        """Load saved weights into these adapters, after checking that everything fits."""
        meta = checkpoint.read_config(path, self.files)
        if list(meta["tasks"]) != list(self.tasks):
            raise checkpoint.CheckpointError(
                f"the checkpoint's tasks {meta['tasks']} differ from these adapters' tasks "
                f"{list(self.tasks)} (order matters: it fixes the task ids)"
            )
        self._check_meta(meta)
        checkpoint.check_same_config(self.config_class.from_dict(meta["config"]), self.config, self.structural)
        checkpoint.check_same_targets(meta, self.layers)
        checkpoint.check_targets(self.model, meta)
        self._load_tensors(path)
        return self

    def _load_tensors(self, path) -> None:
        if any(layer.merged for layer in self.layers.values()):
            raise checkpoint.CheckpointError("these adapters are merged: unmerge() before loading weights")
        checkpoint.copy_tensors(path, self.files, self.state_dict())

    @classmethod
    def from_folder(cls, model: nn.Module, path) -> "AdapterSet":
        """Inject the adapters saved in folder ``path`` into ``model`` and load their weights.

        The model must be the base model they were trained on (same module names and shapes);
        everything is checked before any weight is touched, and a failed load leaves the model
        as it was.
        """
        files = checkpoint.Files(cls.kind)
        meta = checkpoint.read_config(path, files)
        checkpoint.check_targets(model, meta)
        config = cls.config_class.from_dict({**meta["config"], "target_modules": list(meta["targets"]),
                                             "exclude_modules": None})
        adapters = cls._from_meta(model, config, meta)
        try:
            adapters.requires_grad_(True)
            adapters._load_tensors(path)
        except Exception:
            adapters.detach()  # leave the model as it was
            raise
        adapters.config = cls.config_class.from_dict(meta["config"])  # as the user wrote it
        return adapters
