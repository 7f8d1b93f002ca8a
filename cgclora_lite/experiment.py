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

import json
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from .cgc import CGCConfig
from .tasks import Task, group_by_cluster, load_default_tasks
from .data import prompt_budget
from .provenance import provenance
from .evaluate import evaluate_tasks
from .framework import OnePlusN
from .train import TrainConfig

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
    """Steps per cluster in proportion to its number of tasks (totals exactly ``steps``)."""
    total = sum(len(t) for t in clusters.values())
    shares = {name: steps * len(t) // total for name, t in clusters.items()}
    for name in list(clusters)[: steps - sum(shares.values())]:
        shares[name] += 1
    return shares


def run_method(method: str, model, tokenizer, tasks: Sequence[Task], preset: Preset,
               progress: bool = True, save_to: Path | None = None) -> dict:
    """Train one method from fresh adapters and evaluate every task; detach its adapters after.

    With ``save_to``, the trained framework is saved there (``OnePlusN.load`` reads it back; for
    MoDULA, ``modula.load_modula``).
    """
    if method.startswith("modula-"):
        return _run_modula(method, model, tokenizer, tasks, preset, progress, save_to)
    torch.manual_seed(preset.seed)
    framework = OnePlusN(model, tokenizer, preset.max_length)
    clusters = method_clusters(method, tasks)
    for name, members in clusters.items():
        framework.add_cluster(name, members, method_config(method, preset.r_active, preset.alpha))
    config = TrainConfig(steps=preset.steps, lr=preset.lr, warmup=preset.warmup,
                         eval_every=preset.eval_every, seed=preset.seed)
    start = time.perf_counter()
    histories = framework.train(config, preset.batch_size, progress,
                                steps_by_cluster=split_steps(preset.steps, clusters))
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = framework.evaluate(tasks)
    eval_seconds = time.perf_counter() - start
    gates = {name: c.adapters.gate_weights() for name, c in framework.clusters.items()
             if c.config.gate == "task"}
    result = {
        "method": method, "config": method_config(method, preset.r_active, preset.alpha).to_dict(),
        "clusters": {n: [t.name for t in m] for n, m in clusters.items()},
        "trainable_parameters": framework.num_trainable(),
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "scores": scores, "history": histories, "gates": gates,
    }
    if save_to is not None:
        framework.save(save_to)
    framework._deactivate()
    return result


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


def run_experiment(preset: Preset, methods: Sequence[str] = METHODS, model_name: str | None = None,
                   task_names: Sequence[str] | None = None, out: str | Path | None = None,
                   progress: bool = True) -> dict:
    """Run the experiment and write its run folder; return the metrics dict.

    The folder holds ``config.json``, ``metrics.json``, ``results.md``, PNG figures
    (``scores.png``, ``training_curves.png``, ``gates_<method>_<cluster>.png``) and each method's
    trained adapters under ``adapters/<method>/`` (a saved ``OnePlusN``: see ``export``).
    """
    from . import viz
    from .models import load_model

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    start = time.perf_counter()
    model_name = model_name if model_name is not None else preset.model
    if model_name == "tiny":  # the tiny model's weights follow the run's seed
        model_name = f"tiny_model(seed={preset.seed})"
    model, tokenizer = load_model(model_name)
    tasks = load_default_tasks(train=preset.train, validation=preset.validation, test=preset.test,
                               seed=preset.seed)
    if task_names:
        missing = sorted(set(task_names) - {t.name for t in tasks})
        if missing:
            raise ValueError(f"unknown tasks {missing}; default tasks: {[t.name for t in tasks]}")
        tasks = [t for t in tasks if t.name in task_names]
    out = Path(out or f"runs/{preset.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(model, seed=preset.seed)
    (out / "config.json").write_text(json.dumps({
        "preset": asdict(preset), "methods": list(methods), "tasks": [t.name for t in tasks],
        "task_clusters": {t.name: t.cluster for t in tasks}, "budget_rule": BUDGET_RULE,
        "provenance": prov}, indent=2) + "\n")

    print(f"zero-shot: {getattr(model, 'name_or_path', '')} on {len(tasks)} tasks", flush=True)
    base = evaluate_tasks(model, tokenizer, tasks, max_prompt_length=prompt_budget(preset.max_length))
    results = {"base (zero-shot)": {"scores": base, "trainable_parameters": 0, "train_seconds": None}}
    for method in methods:
        clusters = {n: [t.name for t in m] for n, m in method_clusters(method, tasks).items()}
        print(f"\n== {method}: clusters {clusters}", flush=True)
        results[method] = run_method(method, model, tokenizer, tasks, preset, progress,
                                     save_to=out / "adapters" / method)

    table = seesaw_table({m: {t: s["score"] for t, s in r["scores"].items()} for m, r in results.items()},
                         {m: r["trainable_parameters"] for m, r in results.items()},
                         {m: r["train_seconds"] for m, r in results.items() if r["train_seconds"]})
    markdown = results_markdown(table, tasks, prov, preset)
    (out / "results.md").write_text(markdown)
    _write_figures(viz, results, tasks, out)
    metrics = {
        "provenance": prov, "total_seconds": time.perf_counter() - start,
        "methods": {m: {k: v for k, v in r.items() if k != "gates"} for m, r in results.items()},
        "table": json.loads(table.to_json(orient="index")),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    print("\n" + markdown + f"\nwrote {out}/ in {metrics['total_seconds']:.0f} s")
    return metrics


def _write_figures(viz, results: dict, tasks: Sequence[Task], out: Path) -> None:
    import matplotlib.pyplot as plt

    scores = pd.DataFrame([{"method": m, "task": t, "score": s["score"]}
                           for m, r in results.items() for t, s in r["scores"].items()])
    figures = {"scores.png": viz.score_bars(scores)}
    history = pd.DataFrame([{"method": m, "cluster": c, **h} for m, r in results.items()
                            for c, hs in r.get("history", {}).items() for h in hs])
    if not history.empty:
        figures["training_curves.png"] = viz.training_curves(history)
    for method, result in results.items():
        for cluster, gates in result.get("gates", {}).items():
            figures[f"gates_{method}_{cluster}.png".replace("+", "plus")] = viz.gate_heatmap(
                gates, title=f"{method}, cluster {cluster!r}: gate weights (mean over layers)")
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
