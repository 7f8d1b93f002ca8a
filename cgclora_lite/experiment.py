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

**Budget rule: equal active rank, equal steps, equal examples.** Every method gives each task the
same rank ``r_active`` (default 8) at the same scale ``s = alpha / r_active``: LoRA rank 8; one
rank-8 LoRA per task; MOELoRA 4 experts of rank 2; CGC-LoRA 2 common + 2 specific experts of rank
2; MoDULA a universal expert of rank r_active / 2 and one expert per domain sharing the other half
(rank 2 each for the two default domains: its dense router computes every expert for every
token). So every method spends the same compute per token; trainable parameter counts differ
(per-task experts add parameters, not compute) and are reported. Every adapter set takes the same
number of optimizer steps, and every task sees the same number of training examples:
``e = batch_size // T`` examples of each of the T tasks per step, so a set whose cluster has
``T_c`` tasks trains ``steps`` steps on batches of ``e * T_c`` (the 1+N clusters on smaller
batches than the one-cluster methods, for as many steps). MoDULA's one set splits its ``steps``
across its three stages (``modula.stage_steps``), each task again seeing ``e`` examples per step
of the stages it takes part in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .adapters import set_aside
from .cgc import CGCConfig
from .data import prompt_budget
from .evaluate import evaluate_tasks
from .framework import OnePlusN
from .stats import Bootstrap, Interval
from .tasks import Task, group_by_cluster, headline_task, read_trivia, sentiment_task, topic_task, trivia_task
from .train import TrainConfig

METHODS = ("lora", "per-task-lora", "moelora", "cgc-1+1", "cgc-1+n", "modula-flan", "modula-res")
DEMO_METHODS = ("lora", "per-task-lora", "cgc-1+n")  # what `run` (and `make demo`) compares by default
CGC_METHODS = METHODS[:5]  # the configurations of CGCLoRALinear (``method_config``)
REFERENCE = "per-task-lora"  # the seesaw is measured against independent per-task models
BUDGET_RULE = ("equal active rank, equal steps, equal examples: every method gives each task the same "
               "rank r_active at the same scale alpha / r_active; every adapter set takes the same "
               "number of optimizer steps; every task sees the same number of training examples "
               "(batch_size // T per step, T the number of tasks, so a cluster of T_c tasks trains on "
               "batches of T_c x that)")


@dataclass
class Preset:
    """Sizes of one experiment run. ``model``: None = embedded SmolLM2, "tiny" = tiny random model.

    ``train`` and ``validation``: examples per task; ``test``: per task, None = every example not
    used for training or validation (trivia: at most half of its pairs then go to training). ``batch_size``: examples of all tasks per step
    (``batch_size // T`` of each task). Validation loss is recorded every ``eval_every`` steps.
    ``gate_norm`` and ``gate_lr_scale`` go to the gated methods' ``CGCConfig``.
    """

    name: str
    model: str | None
    train: int
    test: dict[str, int | None]
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
    # chosen by the study's gate group on validation loss (docs/experiment.md, docs/results.md):
    # the paper's softmax gate, learning at 10x the adapters' rate
    gate_norm: str = "softmax"
    gate_lr_scale: float = 10.0


PRESETS = {
    # seconds: the tiny random model with the real tokenizer and data, for smoke tests
    "tiny": Preset("tiny", "tiny", train=8, validation=4, eval_every=2,
                   test={"topic": 4, "sentiment": 4, "headline": 4, "trivia": 4},
                   steps=4, batch_size=4, max_length=80, lr=1e-2),
    # two CPU cores: 144 steps of 4 examples per adapter set (one of each task per step), prompts
    # of 64 tokens, test sets large enough for intervals of about +-0.07 on the label tasks; sized
    # for about 20 minutes of `make demo` with bf16 (17 min 57 s measured on an AMD EPYC with
    # AVX512-BF16), 42 min in fp32 (Intel Xeon without bf16)
    "cpu": Preset("cpu", None, train=240, validation=24, eval_every=36,
                  test={"topic": 200, "sentiment": 200, "headline": 100, "trivia": None},
                  steps=144, batch_size=4, max_length=64, lr=2e-3),
    # a Colab-class GPU: full prompts, 600 steps of 16 examples per adapter set
    "gpu": Preset("gpu", None, train=1200, validation=50, eval_every=50,
                  test={"topic": 400, "sentiment": 400, "headline": 200, "trivia": None},
                  steps=600, batch_size=16, max_length=256, lr=1e-3),
}


DATA_SEED = 0
"""The seed of the default tasks' train/validation/test split: fixed, so that every training seed
and every method is scored on the same test examples (the paired intervals need it)."""


def load_tasks(preset: Preset, names: Sequence[str] | None = None) -> list[Task]:
    """The default tasks at the preset's sizes (``names``: a subset, in the default order), split
    with ``DATA_SEED`` whatever the preset's training seed."""
    builders = {"topic": topic_task, "sentiment": sentiment_task, "headline": headline_task,
                "trivia": trivia_task}
    unknown = sorted(set(names or []) - set(builders))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; default tasks: {list(builders)}")
    tasks = []
    for name, build in builders.items():
        if names and name not in names:
            continue
        train, test = preset.train, preset.test.get(name)
        if test is None:  # a small task (trivia): at most half for training, the rest for testing
            available = len(read_trivia()) if name == "trivia" else 10**9
            train = min(train, available // 2)
            test = available - train - preset.validation
        tasks.append(build(train=train, validation=preset.validation, test=test, seed=DATA_SEED))
    return tasks


def method_config(method: str, r_active: int = 8, alpha: float = 16.0, gate_norm: str = "softmax",
                  gate_lr_scale: float = 1.0) -> CGCConfig:
    """The ``CGCConfig`` of ``method`` at active rank ``r_active`` (the budget rule); the gated
    methods (MOELoRA, CGC-LoRA) take ``gate_norm`` and ``gate_lr_scale``."""
    gate = dict(gate_norm=gate_norm, gate_lr_scale=gate_lr_scale)
    if method == "lora":
        return CGCConfig.lora(rank=r_active, alpha=alpha)
    if method == "per-task-lora":
        return CGCConfig.per_task_lora(rank=r_active, alpha=alpha)
    if r_active % 4:
        raise ValueError(f"r_active must be a multiple of 4 for the gated methods, got {r_active}")
    if method == "moelora":
        return CGCConfig.moelora(n_experts=r_active // 2, rank=2, alpha=alpha, **gate)
    if method in ("cgc-1+1", "cgc-1+n"):
        return CGCConfig(n_common=2, n_specific=2, rank_common=r_active // 4,
                         rank_specific=r_active // 4, alpha=alpha, **gate)
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


def cluster_batches(batch_size: int, clusters: dict[str, list[Task]]) -> dict[str, int]:
    """Batch size per cluster under the budget rule: ``batch_size // T`` examples of each task per
    step (T: all tasks), so a cluster of ``T_c`` tasks gets ``T_c * (batch_size // T)``."""
    n_tasks = sum(len(members) for members in clusters.values())
    per_task = batch_size // n_tasks
    if per_task < 1:
        raise ValueError(f"a batch of {batch_size} examples cannot hold one example of each of the "
                         f"{n_tasks} tasks: use a batch size of at least {n_tasks}")
    return {name: per_task * len(members) for name, members in clusters.items()}


def train_and_score(model, tokenizer, clusters: dict[str, Sequence[Task]], config: CGCConfig,
                    train_config: TrainConfig, batch_size: int | dict[str, int] = 8,
                    max_length: int = 256, steps_by_cluster: dict[str, int] | None = None,
                    eval_limit: int | None = None, progress: bool = True,
                    save_to: Path | None = None) -> dict:
    """Fresh adapters of ``config``, one set per cluster, trained and scored on every task.

    The package's own path: ``OnePlusN.add_cluster`` (``inject``), ``train`` (task-balanced
    batches of ``batch_size`` examples, an int or one per cluster, ``train.train``;
    ``steps_by_cluster`` overrides ``train_config.steps``), ``evaluate`` (greedy generation on the
    test split, at most ``eval_limit`` examples per task). Adapters attached to ``model`` before
    are set aside for the call and put back after; the new ones are detached at the end (saved
    first to ``save_to``, a folder ``OnePlusN.load`` reads).

    Returns ``{"clusters", "trainable_parameters", "train_seconds", "seconds_per_step",
    "eval_seconds", "scores", "history", "gates", "contributions"}``: ``scores[task]`` the
    metrics dict, ``history[cluster]`` the training log, ``gates[cluster]`` and
    ``contributions[cluster]`` the ``GateWeights`` (gate weights, expert contribution shares)
    of each gated cluster.
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
            scores = framework.evaluate(tasks, limit=eval_limit, amp=train_config.amp)
            eval_seconds = time.perf_counter() - start
            gated = {name: c for name, c in framework.clusters.items() if c.config.gate == "task"}
            result = {
                "clusters": {n: [t.name for t in m] for n, m in clusters.items()},
                "trainable_parameters": framework.num_trainable(),
                "train_seconds": train_seconds,
                "seconds_per_step": train_seconds / sum(len(h) for h in histories.values()),
                "eval_seconds": eval_seconds, "scores": scores, "history": histories,
                "gates": {name: c.adapters.gate_weights() for name, c in gated.items()},
                "contributions": {name: c.adapters.expert_contributions()
                                  for name, c in framework.clusters.items()},
            }
            if save_to is not None:
                framework.save(save_to)
        finally:
            framework.deactivate()
    return result


def train_config(preset: Preset) -> TrainConfig:
    """The ``TrainConfig`` of a preset (bf16 autocast where the device has it)."""
    return TrainConfig(steps=preset.steps, lr=preset.lr, warmup=preset.warmup,
                       eval_every=preset.eval_every, seed=preset.seed)


def autocast_name(model, preset: Preset) -> str:
    """The autocast a preset's training and scoring use on ``model``'s device: ``"bfloat16"`` or
    ``"none"`` (``models.autocast_dtype``), for provenance."""
    from .models import autocast_dtype

    dtype = autocast_dtype(next(model.parameters()).device, train_config(preset).amp)
    return str(dtype).removeprefix("torch.") if dtype else "none"


def run_method(method: str, model, tokenizer, tasks: Sequence[Task], preset: Preset,
               progress: bool = True, save_to: Path | None = None) -> dict:
    """Train one method from fresh adapters (seed ``preset.seed``) and evaluate every task under
    the budget rule; detach its adapters after.

    With ``save_to``, the trained framework is saved there (``OnePlusN.load`` reads it back; for
    MoDULA, ``modula.load_modula``).
    """
    if method.startswith("modula-"):
        return _run_modula(method, model, tokenizer, tasks, preset, progress, save_to)
    torch.manual_seed(preset.seed)
    clusters = method_clusters(method, tasks)
    config = method_config(method, preset.r_active, preset.alpha, preset.gate_norm, preset.gate_lr_scale)
    result = train_and_score(model, tokenizer, clusters, config, train_config(preset),
                             cluster_batches(preset.batch_size, clusters), preset.max_length,
                             progress=progress, save_to=save_to)
    return {"method": method, "seed": preset.seed, "config": config.to_dict(), **result}


def _run_modula(method: str, model, tokenizer, tasks: Sequence[Task], preset: Preset,
                progress: bool, save_to: Path | None) -> dict:
    """``run_method`` for MoDULA: its three training stages, then the same evaluation."""
    from .modula import inject_modula, train_modula

    torch.manual_seed(preset.seed)
    domains = method_clusters(method, tasks)
    config = modula_config(method, preset.r_active, preset.alpha, len(domains))
    adapters = inject_modula(model, config, {d: [t.name for t in m] for d, m in domains.items()})
    start = time.perf_counter()
    batch = cluster_batches(preset.batch_size, {"all": list(tasks)})["all"]  # e examples per task
    histories = train_modula(adapters, tasks, tokenizer, train_config(preset), batch,
                             preset.max_length, progress)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ordered = [next(t for t in tasks if t.name == name) for name in adapters.tasks]
    scores = evaluate_tasks(model, tokenizer, ordered, max_prompt_length=prompt_budget(preset.max_length))
    eval_seconds = time.perf_counter() - start
    result = {
        "method": method, "seed": preset.seed, "config": config.to_dict(),
        "clusters": {d: [t.name for t in m] for d, m in domains.items()},
        "trainable_parameters": adapters.num_parameters(), "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / sum(len(h) for h in histories.values()),
        "eval_seconds": eval_seconds, "scores": scores, "history": histories, "gates": {},
        "contributions": {},
    }
    if save_to is not None:
        adapters.save(save_to)
    adapters.detach()
    return result


def _scored(results: list[dict], task: str) -> np.ndarray | None:
    """A method's (seeds, examples) values of ``task``, or None when its score is missing: some
    seed has no score for the task, or a value is NaN."""
    if any(task not in r["scores"] for r in results):
        return None
    values = np.array([r["scores"][task]["per_example"] for r in results], dtype=float)
    return None if np.isnan(values).any() else values


def seesaw_table(runs: dict[str, list[dict]], reference: str = REFERENCE) -> pd.DataFrame:
    """Methods x (per-task score, average, change against ``reference``, tasks that lose...),
    every number with its 95% bootstrap interval (``stats.Bootstrap``; columns ``... low`` and
    ``... high``).

    ``runs``: ``{method: [run_method result per seed]}`` (the zero-shot base: one result with
    ``scores``). A task *loses* under a method when its paired change against the reference
    (per-task LoRA: each task trained alone, no interference) is negative with its whole interval
    below zero (``tasks that lose``); ``tasks below reference`` counts every negative change,
    noise included. Without the reference among ``runs`` the change and loss columns are left out.
    ``train seconds`` and ``s/step`` are means over seeds.

    A **missing score** (a task some seed of a method did not score, or a NaN per-example value)
    leaves that task's columns NaN for the method; its ``average`` and ``avg change`` are then over
    the tasks it has a score for (and the reference has), and the task counts neither as losing
    nor as below the reference.
    """
    tasks = list(dict.fromkeys(t for results in runs.values() for r in results for t in r["scores"]))
    values = {method: {t: _scored(results, t) for t in tasks} for method, results in runs.items()}
    sizes = {t: next(v[t].shape[1] for v in values.values() if v[t] is not None)
             for t in tasks if any(v[t] is not None for v in values.values())}
    boot = Bootstrap(sizes, seeds=max(len(r) for r in runs.values()))
    missing = Interval(np.nan, np.nan, np.nan)
    rows = {}
    for method, per_task in values.items():
        row: dict[str, float] = {}
        present = {t: v for t, v in per_task.items() if v is not None}

        def put(name: str, interval: Interval) -> None:
            row[name], row[f"{name} low"], row[f"{name} high"] = interval.mean, interval.low, interval.high

        for task in tasks:
            put(task, boot.score(task, present[task]) if task in present else missing)
        put("average", boot.average(present) if present else missing)
        if reference in values:
            ref = {t: v for t, v in values[reference].items() if v is not None}
            both = [t for t in present if t in ref]
            changes = {t: boot.difference(t, present[t], ref[t]) for t in both}
            for task in tasks:
                put(f"{task} change", changes.get(task, missing))
            put(f"avg change vs {reference}",
                boot.average_difference({t: present[t] for t in both}, {t: ref[t] for t in both})
                if both else missing)
            row["tasks that lose"] = sum(c.high < 0 for c in changes.values())
            row["tasks below reference"] = sum(c.mean < 0 for c in changes.values())
        results = runs[method]
        row["trainable params"] = results[0].get("trainable_parameters", 0)
        seconds = [r["train_seconds"] for r in results if r.get("train_seconds")]
        row["train seconds"] = float(np.mean(seconds)) if seconds else np.nan
        per_step = [r["seconds_per_step"] for r in results if r.get("seconds_per_step")]
        row["s/step"] = float(np.mean(per_step)) if per_step else np.nan
        row["seeds"] = len(results)
        rows[method] = row
    return pd.DataFrame(rows).T


def results_markdown(table: pd.DataFrame, tasks: Sequence[Task], prov: dict, preset: Preset,
                     seeds: Sequence[int]) -> str:
    """The results table as Markdown (scores with their 95% intervals), with how it was made.

    The change and loss columns appear when ``table`` has them (a run with the reference method);
    a missing score (NaN, see ``seesaw_table``) is written ``n/a``."""
    names = [t.name for t in tasks]
    metric = {t.name: t.metric.replace("_", "-") for t in tasks}
    change = next((c for c in table.columns if c.startswith("avg change vs ")
                   and not c.endswith((" low", " high"))), None)
    head = ["method"] + [f"{t} ({metric[t]})" for t in names] + ["average"]
    head += [change, "tasks that lose (below)"] if change else []
    head += ["trainable params", "s/step"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def interval(row, name: str, sign: str = "") -> str:
        if pd.isna(row[name]):
            return "n/a"
        return f"{row[name]:{sign}.3f} [{row[name + ' low']:{sign}.3f}, {row[name + ' high']:{sign}.3f}]"

    for method, row in table.iterrows():
        cells = [method] + [interval(row, t) for t in names] + [interval(row, "average")]
        if change:
            cells += [interval(row, change, "+"),
                      f"{int(row['tasks that lose'])} ({int(row['tasks below reference'])})"]
        params, per_step = row["trainable params"], row["s/step"]
        cells += [f"{int(params):,}", "" if pd.isna(per_step) else f"{per_step:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{t.name} {len(t.test)}" for t in tasks)
    train = ", ".join(f"{t.name} {len(t.train)}" for t in tasks)
    losses = ("Changes are paired, against " + change.removeprefix("avg change vs ") + ". A task "
              "loses when its whole interval of change lies below zero (in brackets: tasks below "
              "the reference at all, noise included). " if change else
              f"No {REFERENCE} row: no changes against it. ")
    gaps = ("n/a: no score for that task (averages and changes are over the tasks with one). "
            if table[names].isna().to_numpy().any() else "")
    notes = (
        f"\nPreset `{preset.name}`, seeds {list(seeds)}: every adapter set {preset.steps} optimizer "
        f"steps, {preset.batch_size // len(tasks)} examples of each task per step ({BUDGET_RULE}); "
        f"training examples: {train}; test examples: {sizes}; prompts of at most "
        f"{preset.max_length} tokens; active rank {preset.r_active}, lr {preset.lr}, gated methods "
        f"with gate_norm={preset.gate_norm!r} and gate_lr_scale={preset.gate_lr_scale}. "
        f"Brackets: 95% bootstrap intervals over test examples and seeds. {losses}{gaps}"
        f"Model {prov['model']} ({prov['dtype']}, autocast {prov.get('autocast', 'none')}) on "
        f"{prov['device']} ({prov['device_name']}, {prov['cpu_threads']} threads); torch "
        f"{prov['torch']}, transformers {prov['transformers']}, cgclora_lite {prov['cgclora_lite']} "
        f"(commit {prov['git_commit']}); {prov['date']}.\n"
    )
    return "\n".join(rows) + "\n" + notes


def _gate_summary(gates) -> dict:
    """A ``GateWeights`` as JSON: its tasks, experts and the (task, expert) mean over layers."""
    return {"value": gates.value, "tasks": gates.tasks, "experts": gates.experts,
            "mean_over_layers": gates.weights.mean(0).tolist()}


def json_result(result: dict) -> dict:
    """A ``run_method`` result for metrics.json: gate weights and contributions as summaries."""
    return {**{k: v for k, v in result.items() if k not in ("gates", "contributions")},
            "gates": {c: _gate_summary(g) for c, g in result.get("gates", {}).items()},
            "contributions": {c: _gate_summary(g) for c, g in result.get("contributions", {}).items()}}


def write_results(out: str | Path, runs: dict[str, list[dict]], table: pd.DataFrame,
                  tasks: Sequence[Task], prov: dict, preset: Preset, seeds: Sequence[int],
                  total_seconds: float | None = None) -> tuple[str, dict]:
    """Write a run folder's ``results.md`` (``results_markdown`` of ``table``) and
    ``metrics.json`` (provenance, ``total_seconds``, every run of ``runs`` by ``json_result``,
    and ``table`` by method, NaN as null); return the Markdown and the metrics dict."""
    import json

    out = Path(out)
    markdown = results_markdown(table, tasks, prov, preset, seeds)
    (out / "results.md").write_text(markdown)
    metrics = {
        "provenance": prov, "total_seconds": total_seconds,
        "runs": {m: [json_result(r) for r in results] for m, results in runs.items()},
        "table": json.loads(table.to_json(orient="index")),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    return markdown, metrics
