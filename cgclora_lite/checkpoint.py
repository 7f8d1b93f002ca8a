"""Saving and loading adapters: safetensors for the tensors, JSON for everything else, no pickle.

A saved adapter folder holds

* ``cgclora_config.json``: the format version, the ``CGCConfig``, the task names, every adapted
  module with its (d_out, d_in) shape, and the base model's name and type (for messages);
* ``cgclora_adapters.safetensors``: the adapter tensors keyed ``<module>.<parameter>``.

Loading checks everything against the model before any weight is touched and explains any
mismatch: a different base model, other task names, another configuration, a missing or reshaped
tensor. Nothing is half-loaded: the checks come first, then the copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .cgc import CGCConfig
from .inject import CGCAdapters, inject

CONFIG_FILE = "cgclora_config.json"
WEIGHTS_FILE = "cgclora_adapters.safetensors"
FORMAT = "cgclora_lite.adapters"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A saved adapter folder that does not fit the model or adapters it is loaded into."""


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)


def save_adapters(adapters: CGCAdapters, path) -> Path:
    """Write the adapters' config and tensors into folder ``path`` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_config = getattr(adapters.model, "config", None)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cgclora_lite_version": __version__,
        "config": adapters.config.to_dict(),
        "tasks": list(adapters.tasks),
        "added_tasks": adapters.added_tasks,  # the last tasks, added later (add_task)
        "targets": {n: [l.out_features, l.in_features] for n, l in adapters.layers.items()},
        "base_model": _model_name(adapters.model),
        "base_model_type": getattr(model_config, "model_type", None),
    }
    tensors = {k: v.contiguous().cpu() for k, v in adapters.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": FORMAT})
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_config(path) -> dict:
    """Read and validate a folder's ``cgclora_config.json``."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
        hint = " (it has peft files: load it with peft instead)" if found and "adapter_config.json" in found else ""
        raise CheckpointError(
            f"{file} not found: {path} is not a cgclora_lite adapter folder{hint}. "
            f"It contains: {found if found is not None else 'nothing (no such folder)'}"
        )
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format {meta.get('format')!r} version {meta.get('format_version')}; this "
            f"cgclora_lite ({__version__}) reads {FORMAT!r} up to version {FORMAT_VERSION}. "
            "Upgrade cgclora_lite to load it."
        )
    return meta


def _check_targets(model: nn.Module, meta: dict) -> None:
    """Every saved module exists in ``model`` as a Linear layer of the saved shape."""
    names = dict(model.named_modules())
    origin = f"{meta.get('base_model') or 'an unnamed model'} ({meta.get('base_model_type')})"
    missing = [n for n in meta["targets"] if n not in names]
    if missing:
        raise CheckpointError(
            f"the adapters were saved on {origin}; this model has no module {missing[0]!r} "
            f"({len(missing)} of {len(meta['targets'])} saved modules missing). Load them onto "
            "the base model they were trained on."
        )
    for name, (d_out, d_in) in meta["targets"].items():
        module = names[name]
        base = getattr(module, "base", module)
        shape = (getattr(base, "out_features", None), getattr(base, "in_features", None))
        if shape != (d_out, d_in):
            raise CheckpointError(
                f"module {name!r} is {shape[0]} x {shape[1]} in this model but {d_out} x {d_in} in "
                f"the checkpoint (saved on {origin}): this is not the model they were trained on."
            )


def _load_tensors(adapters: CGCAdapters, path: Path) -> None:
    """Check keys and shapes of the saved tensors, then copy them into ``adapters``."""
    saved = load_file(str(path / WEIGHTS_FILE))
    own = adapters.state_dict()
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path / WEIGHTS_FILE} does not match these adapters: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}. The file and its config disagree: re-save it."
        )
    for key, tensor in saved.items():
        if tensor.shape != own[key].shape:
            raise CheckpointError(
                f"tensor {key!r} is {tuple(tensor.shape)} in the file but {tuple(own[key].shape)} "
                "here; the file and its config disagree: re-save it."
            )
    if adapters.merged_task is not None:
        raise CheckpointError("these adapters are merged: unmerge() before loading weights")
    with torch.no_grad():
        for key, tensor in saved.items():
            own[key].copy_(tensor)


def load_adapters(model: nn.Module, path) -> CGCAdapters:
    """Inject the adapters saved in ``path`` into ``model`` and load their weights.

    The model must be the base model they were trained on (same module names and shapes).
    """
    path = Path(path)
    meta = read_config(path)
    _check_targets(model, meta)
    config = CGCConfig.from_dict({**meta["config"], "target_modules": list(meta["targets"]),
                                  "exclude_modules": None})
    added = list(meta.get("added_tasks", []))
    tasks = list(meta["tasks"])
    if added and tasks[len(tasks) - len(added):] != added:
        raise CheckpointError(f"{path / CONFIG_FILE}: added_tasks {added} are not the last of tasks {tasks}")
    adapters = inject(model, config, tasks[: len(tasks) - len(added)])
    try:
        for name in added:  # rebuilt in the same order, so every block has its saved place
            adapters.add_task(name)
        adapters.requires_grad_(True)
        _load_tensors(adapters, path)
    except Exception:
        adapters.detach()  # leave the model as it was
        raise
    adapters.config = CGCConfig.from_dict(meta["config"])  # as the user wrote it
    return adapters


def load_into(adapters: CGCAdapters, path) -> None:
    """Load saved weights into existing ``adapters`` (same tasks, config and modules)."""
    path = Path(path)
    meta = read_config(path)
    if list(meta["tasks"]) != list(adapters.tasks):
        raise CheckpointError(
            f"the checkpoint's tasks {meta['tasks']} differ from these adapters' tasks "
            f"{list(adapters.tasks)} (order matters: it fixes the task ids)"
        )
    if list(meta.get("added_tasks", [])) != adapters.added_tasks:
        raise CheckpointError(
            f"the checkpoint's tasks added later {meta.get('added_tasks', [])} differ from these "
            f"adapters' {adapters.added_tasks}: call add_task for each, in order, before loading"
        )
    saved_config = CGCConfig.from_dict(meta["config"])
    structural = ["n_common", "n_specific", "common_ranks", "specific_ranks", "gate", "gate_scope",
                  "task_embedding_dim", "alpha"]
    diff = [f"{k}: saved {getattr(saved_config, k)} vs here {getattr(adapters.config, k)}"
            for k in structural if getattr(saved_config, k) != getattr(adapters.config, k)]
    if diff:
        raise CheckpointError("the checkpoint's configuration differs: " + "; ".join(diff))
    if sorted(meta["targets"]) != sorted(adapters.layers):
        only_saved = sorted(set(meta["targets"]) - set(adapters.layers))
        only_here = sorted(set(adapters.layers) - set(meta["targets"]))
        raise CheckpointError(
            f"the checkpoint adapts other modules: only in the file {only_saved[:3]}, only here "
            f"{only_here[:3]}"
        )
    _check_targets(adapters.model, meta)
    _load_tensors(adapters, path)
