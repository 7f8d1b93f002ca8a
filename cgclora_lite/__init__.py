"""cgclora_lite: CGC-LoRA and the 1+N multi-task pattern, from scratch in PyTorch.

Modules, one idea each:

* ``lora``: ``LoRALinear`` and the merge/unmerge machinery every adapter shares.
* ``cgc``: ``CGCConfig``, ``TaskGate`` and ``CGCLoRALinear`` (common + specific experts, fused).
* ``routing``: ``TaskRouter``, which carries per-sample task ids to every adapted layer.
* ``inject``: ``inject(model, config, tasks)`` and the ``CGCAdapters`` handle it returns.
* ``checkpoint``: save/load adapters (safetensors + JSON), with checks.
* ``models``: the embedded SmolLM2-135M-Instruct, any transformers causal LM, a tiny test model.
* ``data``: tasks, the default offline tasks, tokenisation, collation, task-balanced sampling.
* ``train``, ``evaluate``: the answer-only loss and training loop; generation and metrics.
* ``framework``, ``experiment``: the 1+N framework (``OnePlusN``) and the method comparison.
* ``affinity``: inter-task affinity and clustering tasks into the N clusters.
* ``modula``: MoDULA-Flan and MoDULA-Res, the staged universal + domain experts.
* ``hf``, ``distributed``: ``transformers.Trainer`` and ``torchrun`` training.
* ``export``, ``viz``, ``widgets``, ``bench``: peft/merged export, figures, notebook widgets, benchmarks.
"""

__version__ = "0.1.0"

from .cgc import CGCConfig, CGCLoRALinear, TaskGate  # noqa: E402
from .checkpoint import CheckpointError, load_adapters  # noqa: E402
from .inject import CGCAdapters, GateWeights, attached_adapters, inject, no_adapters  # noqa: E402
from .lora import LoRALinear, MergeError  # noqa: E402
from .routing import TaskRouter, TaskRoutingError  # noqa: E402

__all__ = [
    "CGCAdapters", "CGCConfig", "CGCLoRALinear", "CheckpointError", "GateWeights", "LoRALinear",
    "MergeError", "TaskGate", "TaskRouter", "TaskRoutingError", "attached_adapters", "inject",
    "load_adapters", "no_adapters",
]
