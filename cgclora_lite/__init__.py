"""cgclora_lite: CGC-LoRA and the 1+N multi-task pattern, from scratch in PyTorch.

Flat modules, one idea each, in four layers; a module imports only modules listed before it
(``tests/test_layers.py`` checks this):

core: adapters on any model
    ``routing``     ``TaskRouter``: per-sample task ids for the duration of a call
    ``lora``        ``AdaptedLinear`` (frozen base, merge/unmerge) and ``LoRALinear``
    ``fused``       ``FusedCGCLoRA``: the base product and the gated adapter as one autograd node
    ``checkpoint``  adapter folders: plain tensors (safetensors) and JSON, checked before loading
    ``cgc``         ``CGCConfig``, ``TaskGate``, ``CGCLoRALinear``: common + specific experts
    ``adapters``    ``AdapterSet``: one set of adapters in a model (attach, routing, state, save)
    ``inject``      ``CGCAdapters``, ``inject``, ``load_adapters``, gate weights
    ``export``      one task as a peft LoRA adapter or a merged transformers model
fine-tuning: a real model on real tasks
    ``provenance``  what produced a result: versions, git commit, machine
    ``models``      the embedded SmolLM2-135M-Instruct, any causal LM, the tiny test model
    ``tasks``       ``Task``, the default offline tasks, CSV/JSON/hub loaders
    ``taskfile``    your own tasks and clusters in a YAML/JSON task file, every problem reported
    ``data``        chat-template encoding with answer-only labels, collator, balanced sampling
    ``distributed`` process-group helpers and gradient synchronisation (nothing in one process)
    ``train``       the answer-only loss and the training loop
    ``evaluate``    batched greedy generation and the metrics
    ``stats``       bootstrap confidence intervals of scores and paired differences
    ``hf``          ``transformers.Trainer`` with task ids as a column
    ``launch``      the ``torchrun`` entry point
1+N: the framework and its experiment
    ``affinity``    task affinity and clustering tasks into the N clusters
    ``modula``      MoDULA-Flan / MoDULA-Res, a sibling adapter set with a token router
    ``framework``   ``OnePlusN``: the central model and its N clusters
    ``experiment``  the methods, the budget rule, the presets, training and scoring, the seesaw table
    ``study``       seeds, ablations, budget and capacity curves, a positive control; its report
    ``workflow``    your own tasks end to end: train a framework from a task file, evaluate, predict
tools
    ``viz``         seaborn figures as pure functions
    ``toy``         the seesaw toy of notebook 02: two tasks, every method, a training run in a second
    ``widgets``     ipywidgets panels for the notebooks
    ``bench``       benchmarks of the fused layer
    ``cli``         the command line: ``run`` (the run folder), ``export``, ``affinity``, ``bench``
    ``gpucheck``    every GPU measurement in one command (``make gpu-check``)
"""

from ._version import __version__
from .adapters import AdapterSet, attached_adapters, no_adapters
from .cgc import CGCConfig, CGCLoRALinear, TaskGate
from .checkpoint import CheckpointError
from .inject import CGCAdapters, GateWeights, inject, load_adapters
from .lora import LoRALinear, MergeError
from .routing import TaskRouter, TaskRoutingError

LAYERS = {
    "core": ["_version", "routing", "lora", "fused", "checkpoint", "cgc", "adapters", "inject", "export"],
    "fine-tuning": ["provenance", "models", "tasks", "taskfile", "data", "distributed", "train", "evaluate",
                    "stats", "hf", "launch"],
    "1+N": ["affinity", "modula", "framework", "experiment", "study", "workflow"],
    "tools": ["viz", "toy", "widgets", "bench", "cli", "gpucheck", "__main__"],
}
"""The package's modules in layer order: each may import only modules listed before it."""

__all__ = [
    "AdapterSet", "CGCAdapters", "CGCConfig", "CGCLoRALinear", "CheckpointError", "GateWeights",
    "LAYERS", "LoRALinear", "MergeError", "TaskGate", "TaskRouter", "TaskRoutingError", "__version__",
    "attached_adapters", "inject", "load_adapters", "no_adapters",
]
