"""Adapter folders on disk: safetensors for the tensors, JSON for everything else, no pickle.

A saved adapter folder of kind ``k`` (``"cgclora"`` for CGC-LoRA, ``"modula"`` for MoDULA) holds

* ``k_config.json``: the format and its version, the package version, the adapter config, the
  task names, every adapted module with its (d_out, d_in) shape, the base model's name and type
  (for messages), and whatever the kind adds (tasks added later, MoDULA's domains);
* ``k_adapters.safetensors``: the adapter tensors keyed ``<module>.<parameter>``.

This module reads and writes those files and checks them against a model or a set of adapters;
``adapters.AdapterSet.save`` / ``load`` / ``from_folder`` use it. Every check runs before any
weight is touched and explains the mismatch: a different base model, other task names, another
configuration, a missing or reshaped tensor. Nothing is half-loaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .lora import SUPPORTED_LAYERS, layer_shape

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A saved adapter folder that does not fit the model or adapters it is loaded into."""


class JSONConfig:
    """Mixin for the dataclass configs saved in an adapter folder: ``to_dict`` gives the fields a
    user sets (tuples as lists), ``from_dict`` rebuilds the config and names any unknown field."""

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class Files:
    """The file names and format tag of one kind of adapter folder."""

    kind: str

    @property
    def config(self) -> str:
        return f"{self.kind}_config.json"

    @property
    def weights(self) -> str:
        return f"{self.kind}_adapters.safetensors"

    @property
    def format(self) -> str:
        return "cgclora_lite.adapters" if self.kind == "cgclora" else f"cgclora_lite.{self.kind}"


CGC_FILES = Files("cgclora")
CONFIG_FILE, WEIGHTS_FILE = CGC_FILES.config, CGC_FILES.weights  # a CGC-LoRA folder's files


def model_name(model: nn.Module) -> str | None:
    """The name a transformers model was loaded from, if any."""
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)


def write(path, files: Files, meta: dict, tensors: dict[str, torch.Tensor], model: nn.Module) -> Path:
    """Write ``meta`` (plus the format header and the base model's name) and ``tensors`` into
    folder ``path`` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_config = getattr(model, "config", None)
    header = {"format": files.format, "format_version": FORMAT_VERSION, "cgclora_lite_version": __version__}
    meta = {**header, **meta, "base_model": model_name(model),
            "base_model_type": getattr(model_config, "model_type", None)}
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path / files.weights), metadata={"format": files.format})
    (path / files.config).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_config(path, files: Files = CGC_FILES) -> dict:
    """Read and validate a folder's config file."""
    path = Path(path)
    file = path / files.config
    if not file.is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
        hint = " (it has peft files: load it with peft instead)" if found and "adapter_config.json" in found else ""
        raise CheckpointError(
            f"{file} not found: {path} is not a cgclora_lite {files.kind} adapter folder{hint}. "
            f"It contains: {found if found is not None else 'nothing (no such folder)'}"
        )
    meta = json.loads(file.read_text())
    if meta.get("format") != files.format or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format {meta.get('format')!r} version {meta.get('format_version')}; this "
            f"cgclora_lite ({__version__}) reads {files.format!r} up to version {FORMAT_VERSION}. "
            "Upgrade cgclora_lite to load it."
        )
    return meta


def check_targets(model: nn.Module, meta: dict) -> None:
    """Every saved module exists in ``model`` as a linear layer (``nn.Linear`` or ``Conv1D``) of the
    saved (d_out, d_in) shape."""
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
        shape = layer_shape(getattr(module, "base", module))  # (d_out, d_in), Linear or Conv1D
        if shape is None:
            kind = type(getattr(module, "base", module)).__name__
            raise CheckpointError(
                f"module {name!r} is a {kind} in this model, not a linear layer ({SUPPORTED_LAYERS}) as "
                f"in the checkpoint (saved on {origin}): this is not the model they were trained on."
            )
        if shape != (d_out, d_in):
            raise CheckpointError(
                f"module {name!r} is {shape[0]} x {shape[1]} in this model but {d_out} x {d_in} in "
                f"the checkpoint (saved on {origin}): this is not the model they were trained on."
            )


def check_same_config(saved, here, fields: Sequence[str]) -> None:
    """The saved config equals ``here`` in every field of ``fields`` (those that change the function)."""
    diff = [f"{k}: saved {getattr(saved, k)} vs here {getattr(here, k)}"
            for k in fields if getattr(saved, k) != getattr(here, k)]
    if diff:
        raise CheckpointError("the checkpoint's configuration differs: " + "; ".join(diff))


def check_same_targets(meta: dict, layers: dict) -> None:
    """The checkpoint adapts exactly the modules of ``layers`` (names)."""
    if sorted(meta["targets"]) != sorted(layers):
        only_saved = sorted(set(meta["targets"]) - set(layers))
        only_here = sorted(set(layers) - set(meta["targets"]))
        raise CheckpointError(
            f"the checkpoint adapts other modules: only in the file {only_saved[:3]}, only here "
            f"{only_here[:3]}"
        )


def copy_tensors(path, files: Files, own: dict[str, torch.Tensor]) -> None:
    """Check the keys and shapes of the saved tensors against ``own``, then copy them in."""
    file = Path(path) / files.weights
    saved = load_file(str(file))
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not match these adapters: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}. The file and its config disagree: re-save it."
        )
    for key, tensor in saved.items():
        if tensor.shape != own[key].shape:
            raise CheckpointError(
                f"tensor {key!r} is {tuple(tensor.shape)} in the file but {tuple(own[key].shape)} "
                "here; the file and its config disagree: re-save it."
            )
    with torch.no_grad():
        for key, tensor in saved.items():
            own[key].copy_(tensor)
