"""Export one task of a trained cluster: as a merged transformers model, or as a plain peft LoRA.

The gate ignores tokens, so task t's update of each adapted layer is one matrix,
``dW_t = B_cat diag(c_t) A_cat``, with a plain LoRA factorisation ``dW_t = B'_t A'_t``
(``CGCLoRALinear.export_factors``): ``A'_t`` stacks the rows of the experts task t uses (common and
its own specific ones, ``r_active`` rows) and ``B'_t`` their columns times ``s * w_t``. So:

* ``export_merged``: ``W0 + dW_t`` in every adapted layer, saved with ``save_pretrained`` (plus the
  tokenizer): a normal model folder that ``AutoModelForCausalLM.from_pretrained`` loads, serving
  task t at the base model's cost.
* ``export_peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` for a LoRA of rank
  ``r_active`` with ``lora_alpha = r_active`` (peft's scale 1: the scale is already in ``B'``),
  which ``peft.PeftModel.from_pretrained(central_model, folder)`` loads. Any tool that serves
  plain LoRA adapters (peft, vLLM...) can then serve this task of a CGC-LoRA model.

peft stores ``lora_A`` as (r, d_in) and ``lora_B`` as (d_out, r) for every layer type; for a
GPT-2-style ``Conv1D`` base (weight (d_in, d_out)) it needs ``fan_in_fan_out=True`` in the config,
which is set when the adapted layers are Conv1D. ``base_model_name_or_path`` is what
``AutoPeftModelForCausalLM.from_pretrained(folder)`` loads: the caller names something loadable
(``framework.OnePlusN.export`` does: the embedded model's cached folder, a local folder's absolute
path, a hub name). Each folder gets a ``README.md`` that says how to load and serve it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ._version import __version__
from .inject import CGCAdapters


def _base_name(adapters: CGCAdapters) -> str | None:
    config = getattr(adapters.model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(adapters.model, "name_or_path", None)


def _lora_rank_option(rank: int) -> int:
    """The smallest of vLLM's ``--max-lora-rank`` choices that holds ``rank``."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def export_peft(adapters: CGCAdapters, task: str | None, path, base_model: str | None = None,
                notes: str = "") -> Path:
    """Write task ``task``'s update as a peft LoRA adapter folder (``task`` None: task-free configs).

    ``base_model``: what ``adapter_config.json`` records as ``base_model_name_or_path``, which
    ``AutoPeftModelForCausalLM.from_pretrained(folder)`` loads (default: the model's own
    ``name_or_path``). ``notes``: Markdown added to the folder's README (the base model's origin,
    the prompt format...).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rank = adapters.config.r_active
    base_model = base_model if base_model is not None else _base_name(adapters)
    tensors = {}
    for name, layer in adapters.layers.items():
        A, B = layer.export_factors(task)  # (r_active, d_in), (d_out, r_active), fp32
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous().cpu()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    conv1d = any(getattr(layer, "transposed", False) for layer in adapters.layers.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "target_modules": sorted(adapters.layers),
        "bias": "none", "fan_in_fan_out": conv1d, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    where = str(path.resolve())
    name = task or "adapter"
    (path / "README.md").write_text(
        f"# LoRA export of task `{task}`\n\n"
        f"Exported by cgclora_lite {__version__} from a {adapters.config.method} cluster with tasks "
        f"{list(adapters.tasks)}: task `{task}`'s update as a plain LoRA of rank {rank} on "
        f"{len(adapters.layers)} layers (the scale is already folded into lora_B, so "
        f"lora_alpha = r).\n\nBase model (`base_model_name_or_path`): `{base_model}`\n"
        f"{notes}\n"
        "## Load it with peft\n\n```python\nfrom peft import AutoPeftModelForCausalLM, PeftModel\n\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({where!r})  # loads the base model too\n"
        f"# or, on a base model you loaded yourself:\n"
        f"model = PeftModel.from_pretrained(base_model, {where!r})\n```\n\n"
        "## Serve it\n\nAny engine that loads LoRA adapters serves it next to the base model, e.g. "
        "vLLM:\n\n```bash\n"
        f"vllm serve {base_model} --enable-lora --lora-modules {name}={where} "
        f"--max-lora-rank {_lora_rank_option(rank)}\n```\n\n"
        f"and ask for the model `{name}` in requests. Several tasks exported this way can be "
        "served at once by one base model (one `--lora-modules` entry each).\n")
    return path


@torch.no_grad()
def export_merged(adapters: CGCAdapters, task: str | None, path, tokenizer=None,
                  notes: str = "") -> Path:
    """Save the central model with task ``task``'s update merged in, as a transformers folder.

    The in-memory model is left exactly as it was (weights restored bit for bit, adapters back).
    ``notes``: Markdown added to the folder's README (which says how to load and serve it).
    """
    path = Path(path)
    model = adapters.model
    if not adapters.is_attached:
        raise RuntimeError("attach() these adapters before exporting them")
    adapters.merge(task)
    try:
        with adapters.plain_layers():  # nn.Linear layers holding W0 + dW_t, no adapter modules
            model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    finally:
        adapters.unmerge()
    where = str(path.resolve())
    (path / "README.md").write_text(
        f"# Merged export of task `{task}`\n\n"
        f"Exported by cgclora_lite {__version__}: the central model `{_base_name(adapters)}` with "
        f"task `{task}`'s update ({adapters.config.method} cluster, tasks {list(adapters.tasks)}) "
        "folded into its weights. A plain transformers model folder: it serves this task at the "
        f"base model's cost, without cgclora_lite.\n{notes}\n"
        "## Load it\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained({where!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({where!r})\n```\n\n"
        f"## Serve it\n\n```bash\nvllm serve {where}\n```\n")
    return path
