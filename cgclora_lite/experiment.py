"""The 1+N experiment: CGC-LoRA against its baselines on the same data, tokens and budget.

Methods (the first five are configurations of one layer, ``cgc.CGCLoRALinear``; the MoDULA
variants are ``modula.MoDULALinear``):

=================  ==================================================  ===========================
method             what it is                                          clusters
=================  ==================================================  ===========================
``lora``           one LoRA trained on all tasks (integrated model)    one, all tasks
``per-task-lora``  one LoRA per task (independent models)              one, all tasks (K_c = 0)
``moelora``        shared experts mixed by a task gate                 one, all tasks
``cgc-1+1``        CGC-LoRA over all tasks                             one, all tasks
``cgc-1+n``        CGC-LoRA in the 1+N pattern                         one per task cluster
``modula-flan``    MoDULA: universal + domain experts, token router    domains = task clusters
``modula-res``     MoDULA with the universal expert on a residual      domains = task clusters
=================  ==================================================  ===========================

**Budget rule: equal active rank.** Every method gives each task the same rank ``r_active``
(default 8) at the same scale ``s = alpha / r_active``: LoRA rank 8; one rank-8 LoRA per task;
MOELoRA 4 experts of rank 2; CGC-LoRA 2 common + 2 specific experts of rank 2; MoDULA a universal
expert of rank r_active / 2 and one expert per domain sharing the other half (rank 2 each for the
two default domains: its dense router computes every expert for every token). So every method
spends the same compute per token; trainable parameter counts differ (per-task experts add
parameters, not compute) and are reported. Every method sees the same training batches' worth of
tokens: ``steps`` optimizer steps of ``batch_size`` task-balanced examples. In the 1+N pattern
the steps are shared among clusters in proportion to their number of tasks; MoDULA splits them
across its three stages (``modula.stage_steps``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from .adapters import set_aside
from .cgc import CGCConfig
from .data import prompt_budget
from .evaluate import evaluate_tasks
from .framework import OnePlusN
from .tasks import Task, group_by_cluster
from .train import TrainConfig, proportional_steps

METHODS = ("lora", "per-task-lora", "moelora", "cgc-1+1", "cgc-1+n", "modula-flan", "modula-res")
CGC_METHODS = METHODS[:5]  # the configurations of CGCLoRALinear (``method_config``)
REFERENCE = "per-task-lora"  # the seesaw is measured against independent per-task models
BUDGET_RULE = ("equal active rank: every method gives each task the same rank r_active at the same "
               "scale alpha / r_active, and trains for the same steps x batch size of examples")


@dataclass
class Preset:
    """Sizes of one experiment run. ``model``: None = embedded SmolLM2, "tiny" = tiny random model."""

    name: str
    model: str | None
    train: int
    test: int
    steps: int
    batch_size: int
    max_length: int
    lr: float
    validation: int = 0
    eval_every: int = 0
    r_active: int = 8
    alpha: float = 16.0
    warmup: float = 0.1
    seed: int = 0


PRESETS = {
    # seconds: the tiny random model with the real tokenizer and data, for smoke tests
    "tiny": Preset("tiny", "tiny", train=8, test=4, steps=4, batch_size=4, max_length=80, lr=1e-2),
    # two CPU cores, under 20 minutes: short prompts, 48 steps of 8 examples per method
    "cpu": Preset("cpu", None, train=200, test=30, steps=48, batch_size=8, max_length=80, lr=2e-3),
    # a Colab-class GPU: full prompts, 600 steps of 16 examples per method, periodic validation
    "gpu": Preset("gpu", None, train=1200, test=100, steps=600, batch_size=16, max_length=256,
                  lr=1e-3, validation=50, eval_every=100),
}


def method_config(method: str, r_active: int = 8, alpha: float = 16.0) -> CGCConfig:
    """The ``CGCConfig`` of ``method`` at active rank ``r_active`` (the budget rule)."""
    if method == "lora":
        return CGCConfig.lora(rank=r_active, alpha=alpha)
    if method == "per-task-lora":
        return CGCConfig.per_task_lora(rank=r_active, alpha=alpha)
    if r_active % 4:
        raise ValueError(f"r_active must be a multiple of 4 for the gated methods, got {r_active}")
    if method == "moelora":
        return CGCConfig.moelora(n_experts=r_active // 2, rank=2, alpha=alpha)
    if method in ("cgc-1+1", "cgc-1+n"):
        return CGCConfig(n_common=2, n_specific=2, rank_common=r_active // 4,
                         rank_specific=r_active // 4, alpha=alpha)
    raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")


def modula_config(method: str, r_active: int = 8, alpha: float = 16.0, n_domains: int = 2):
    """The ``MoDULAConfig`` of ``modula-flan`` / ``modula-res`` at active rank ``r_active``: a
    universal expert of rank r_active / 2 and the other half shared by the domain experts."""
    from .modula import MoDULAConfig

    if r_active % 2 or (r_active // 2) % n_domains:
        raise ValueError(f"r_active {r_active} does not split into a universal half and "
                         f"{n_domains} equal domain experts")
    return MoDULAConfig(variant=method.removeprefix("modula-"), rank_universal=r_active // 2,
                        rank_domain=r_active // 2 // n_domains, alpha=alpha)


def method_clusters(method: str, tasks: Sequence[Task]) -> dict[str, list[Task]]:
    """The clusters a method trains: the task clusters for 1+N (and MoDULA's domains), else one
    cluster of all tasks."""
    return group_by_cluster(tasks) if method == "cgc-1+n" or method.startswith("modula") else {"all": list(tasks)}


def split_steps(steps: int, clusters: dict[str, list[Task]]) -> dict[str, int]:
    """Steps per cluster in proportion to its number of tasks (``train.proportional_steps``:
    largest remainders, at least one each, totals exactly ``steps``)."""
    return proportional_steps(steps, {name: len(tasks) for name, tasks in clusters.items()})


def train_and_score(model, tokenizer, clusters: dict[str, Sequence[Task]], config: CGCConfig,
                    train_config: TrainConfig, batch_size: int = 8, max_length: int = 256,
                    steps_by_cluster: dict[str, int] | None = None, eval_limit: int | None = None,
                    progress: bool = True, save_to: Path | None = None) -> dict:
    """Fresh adapters of ``config``, one set per cluster, trained and scored on every task.

    The package's own path: ``OnePlusN.add_cluster`` (``inject``), ``train`` (task-balanced
    batches, ``train.train``; ``steps_by_cluster`` overrides ``train_config.steps``), ``evaluate``
    (greedy generation on the test split, at most ``eval_limit`` examples per task). Adapters
    attached to ``model`` before are set aside for the call and put back after; the new ones are
    detached at the end (saved first to ``save_to``, a folder ``OnePlusN.load`` reads).

    Returns ``{"clusters", "trainable_parameters", "train_seconds", "eval_seconds", "scores",
    "history", "gates"}``: ``scores[task]`` the metrics dict, ``history[cluster]`` the training
    log, ``gates[cluster]`` the ``GateWeights`` of each gated cluster.
    """
    tasks = [t for members in clusters.values() for t in members]
    with set_aside(model):
        framework = OnePlusN(model, tokenizer, max_length)
        try:
            for name, members in clusters.items():
                framework.add_cluster(name, list(members), config)
            start = time.perf_counter()
            histories = framework.train(train_config, batch_size, progress, steps_by_cluster)
            train_seconds = time.perf_counter() - start
            start = time.perf_counter()
            scores = framework.evaluate(tasks, limit=eval_limit)
            eval_seconds = time.perf_counter() - start
            gates = {name: c.adapters.gate_weights() for name, c in framework.clusters.items()
                     if c.config.gate == "task"}
            result = {
                "clusters": {n: [t.name for t in m] for n, m in clusters.items()},
                "trainable_parameters": framework.num_trainable(),
                "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                "scores": scores, "history": histories, "gates": gates,
            }
            if save_to is not None:
                framework.save(save_to)
        finally:
            framework.deactivate()
    return result


def run_method(method: str, model, tokenizer, tasks: Sequence[Task], preset: Preset,
               progress: bool = True, save_to: Path | None = None) -> dict:
    """Train one method from fresh adapters and evaluate every task; detach its adapters after.

    With ``save_to``, the trained framework is saved there (``OnePlusN.load`` reads it back; for
    MoDULA, ``modula.load_modula``).
    """
    if method.startswith("modula-"):
        return _run_modula(method, model, tokenizer, tasks, preset, progress, save_to)
    torch.manual_seed(preset.seed)
    clusters = method_clusters(method, tasks)
    config = method_config(method, preset.r_active, preset.alpha)
    train_config = TrainConfig(steps=preset.steps, lr=preset.lr, warmup=preset.warmup,
                               eval_every=preset.eval_every, seed=preset.seed)
    result = train_and_score(model, tokenizer, clusters, config, train_config, preset.batch_size,
                             preset.max_length, split_steps(preset.steps, clusters),
                             progress=progress, save_to=save_to)
    return {"method": method, "config": config.to_dict(), **result}


def _run_modula(method: str, model, tokenizer, tasks: Sequence[Task], preset: Preset,
                progress: bool, save_to: Path | None) -> dict:
    """``run_method`` for MoDULA: its three training stages, then the same evaluation."""
    from .modula import inject_modula, train_modula

    torch.manual_seed(preset.seed)
    domains = method_clusters(method, tasks)
    config = modula_config(method, preset.r_active, preset.alpha, len(domains))
    adapters = inject_modula(model, config, {d: [t.name for t in m] for d, m in domains.items()})
    train_config = TrainConfig(steps=preset.steps, lr=preset.lr, warmup=preset.warmup, seed=preset.seed)
    start = time.perf_counter()
    histories = train_modula(adapters, tasks, tokenizer, train_config, preset.batch_size,
                             preset.max_length, progress)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ordered = [next(t for t in tasks if t.name == name) for name in adapters.tasks]
    scores = evaluate_tasks(model, tokenizer, ordered, max_prompt_length=prompt_budget(preset.max_length))
    eval_seconds = time.perf_counter() - start
    result = {
        "method": method, "config": config.to_dict(),
        "clusters": {d: [t.name for t in m] for d, m in domains.items()},
        "trainable_parameters": adapters.num_parameters(),
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "scores": scores, "history": histories, "gates": {},
    }
    if save_to is not None:
        adapters.save(save_to)
    adapters.detach()
    return result


def seesaw_table(scores: dict[str, dict[str, float]], params: dict[str, int],
                 seconds: dict[str, float], reference: str = REFERENCE) -> pd.DataFrame:
    """Methods x (per-task score, average, change against ``reference``, tasks that lose...).

    ``scores[method][task]`` is the task's headline score. A task *loses* under a method when it
    scores below the reference (per-task LoRA: each task trained alone, no interference).
    """
    table = pd.DataFrame(scores).T  # (method, task)
    tasks = list(table.columns)
    table["average"] = table[tasks].mean(axis=1)
    if reference in table.index:
        delta = table[tasks] - table.loc[reference, tasks]
        table[f"avg change vs {reference}"] = delta.mean(axis=1)
        table["tasks that lose"] = (delta < 0).sum(axis=1)
        for task in tasks:
            table[f"{task} change"] = delta[task]
    table["trainable params"] = pd.Series(params)
    table["train seconds"] = pd.Series(seconds)
    return table


def results_markdown(table: pd.DataFrame, tasks: Sequence[Task], prov: dict, preset: Preset) -> str:
    """The results table as Markdown, with how it was made."""
    task_cols = [t.name for t in tasks]
    metric = {t.name: t.metric.replace("_", "-") for t in tasks}
    head = ["method"] + [f"{t} ({metric[t]})" for t in task_cols] + ["average"]
    extra = [c for c in ("avg change vs " + REFERENCE, "tasks that lose") if c in table.columns]
    head += extra + ["trainable params", "train s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in table.iterrows():
        cells = [method] + [f"{row[t]:.3f}" for t in task_cols] + [f"{row['average']:.3f}"]
        for c in extra:
            value = row[c]
            cells.append("" if pd.isna(value) else (f"{value:+.3f}" if "change" in c else f"{int(value)}"))
        params, secs = row["trainable params"], row["train seconds"]
        cells += ["0" if pd.isna(params) else f"{int(params):,}", "" if pd.isna(secs) else f"{secs:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    notes = (
        f"\nPreset `{preset.name}`: {preset.steps} steps x {preset.batch_size} examples per method, "
        f"{preset.train} training and {preset.test} test examples per task, prompts of at most "
        f"{preset.max_length} tokens, active rank {preset.r_active} for every method, lr {preset.lr}. "
        f"Model {prov['model']} ({prov['dtype']}) on {prov['device']}; torch {prov['torch']}, "
        f"transformers {prov['transformers']}, cgclora_lite {prov['cgclora_lite']} (commit "
        f"{prov['git_commit']}); seed {prov['seed']}; "
        f"{prov['date']}.\n"
    )
    return "\n".join(rows) + "\n" + notes
