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
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .inject import CGCAdapters


def _base_name(adapters: CGCAdapters) -> str | None:
    config = getattr(adapters.model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(adapters.model, "name_or_path", None)


def export_peft(adapters: CGCAdapters, task: str | None, path) -> Path:
    """Write task ``task``'s update as a peft LoRA adapter folder (``task`` None: task-free configs)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rank = adapters.config.r_active
    tensors = {}
    for name, layer in adapters.layers.items():
        A, B = layer.export_factors(task)  # (r_active, d_in), (d_out, r_active), fp32
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous().cpu()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": _base_name(adapters),
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "target_modules": sorted(adapters.layers),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "README.md").write_text(
        f"# LoRA export of task `{task}`\n\nExported by cgclora_lite from a {adapters.config.method} "
        f"cluster with tasks {list(adapters.tasks)}: task `{task}`'s update as a plain LoRA of rank "
        f"{rank} (scale already folded into lora_B).\n\n```python\nfrom peft import PeftModel\n"
        f"model = PeftModel.from_pretrained(base_model, {str(path)!r})\n```\n")
    return path


@torch.no_grad()
def export_merged(adapters: CGCAdapters, task: str | None, path, tokenizer=None) -> Path:
    """Save the central model with task ``task``'s update merged in, as a transformers folder.

    The in-memory model is left exactly as it was (weights restored bit for bit, adapters back).
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
    return path
