"""Figures: pure functions that draw results and return a matplotlib ``Figure`` (they never train).

* ``score_bars``: per-task scores by method (the seesaw at a glance);
* ``training_curves``: training loss against step, one line per method and cluster;
* ``gate_heatmap``: the gate weights of one cluster, task x expert (mean over layers, or one layer);
* ``layer_gate_heatmap``: one task's gate weights, layer x expert (all layers or one module kind);
* ``affinity_clustermap``: a task affinity matrix, clustered, coloured by cluster (see ``affinity``).

Each takes plain data (a pandas DataFrame or a ``GateWeights``), so notebooks and widgets can call
them with anything they computed.
"""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .affinity import Affinity, affinity_linkage
from .inject import GateWeights


def score_bars(scores: pd.DataFrame, title: str = "Test score per task and method") -> plt.Figure:
    """Grouped bars: ``scores`` has columns ``task``, ``method``, ``score`` (one row each), and
    optionally ``low`` and ``high``: an interval drawn as an error bar on each bar."""
    missing = {"task", "method", "score"} - set(scores.columns)
    if missing:
        raise ValueError(f"scores needs columns task, method, score; missing {sorted(missing)}")
    tasks, methods = list(pd.unique(scores["task"])), list(pd.unique(scores["method"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(tasks), 4.2))
    sns.barplot(data=scores, x="task", y="score", hue="method", order=tasks, hue_order=methods,
                errorbar=None, ax=ax, palette="colorblind")
    if {"low", "high"} <= set(scores.columns):
        for method, bars in zip(methods, ax.containers):  # one container of bars per method
            rows = scores[scores["method"] == method].set_index("task")
            for bar in bars:
                center = bar.get_x() + bar.get_width() / 2
                row = rows.loc[tasks[round(center)]]  # task i's bars sit around x = i
                ax.errorbar(center, row["score"], yerr=[[row["score"] - row["low"]], [row["high"] - row["score"]]],
                            fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set(ylim=(0, 1), xlabel="", ylabel="score (accuracy / ROUGE-L / exact match)", title=title)
    ax.legend(title="method", fontsize=8, title_fontsize=9, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def training_curves(history: pd.DataFrame, smooth: int = 5,
                    title: str = "Training loss (answer tokens)") -> plt.Figure:
    """Loss against step: ``history`` has ``method``, ``cluster``, ``step``, ``loss``.

    Lines are a rolling mean over ``smooth`` steps (the raw loss of small batches is noisy).
    """
    missing = {"method", "cluster", "step", "loss"} - set(history.columns)
    if missing:
        raise ValueError(f"history needs columns method, cluster, step, loss; missing {sorted(missing)}")
    data = history.copy()
    data["run"] = data["method"] + " / " + data["cluster"]
    data["smoothed loss"] = data.groupby("run")["loss"].transform(
        lambda s: s.rolling(smooth, min_periods=1).mean())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sns.lineplot(data=data, x="step", y="smoothed loss", hue="run", ax=ax, palette="colorblind")
    ax.set(title=title, ylabel=f"loss (rolling mean over {smooth} steps)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def gate_heatmap(gates: GateWeights, layer: str | int | None = None,
                 title: str | None = None) -> plt.Figure:
    """Task x expert heatmap of gate weights (or contribution shares): the mean over layers, or
    one layer (name or index).

    A blank cell is an expert the task may not use (another task's specific expert). The colour
    range is fixed, 0 to what a task's row sums to (``gates.total``), so small differences are
    not painted as large ones.
    """
    if layer is None:
        weights, where = gates.weights.mean(0), f"mean over {len(gates.layers)} layers"
    else:
        index = gates.layers.index(layer) if isinstance(layer, str) else layer
        weights, where = gates.weights[index], gates.layers[index]
    frame = pd.DataFrame(weights.numpy(), index=gates.tasks, columns=gates.experts)
    usable = gates.weights.sum(0).numpy() > 0  # (task, expert): ever nonzero in some layer
    fig, ax = plt.subplots(figsize=(2.0 + 0.8 * len(gates.experts), 1.8 + 0.45 * len(gates.tasks)))
    sns.heatmap(frame, mask=~usable, annot=True, fmt=".2f", vmin=0, vmax=gates.total, cmap="viridis",
                cbar_kws={"label": gates.value}, ax=ax)
    ax.set(xlabel="expert", ylabel="task", title=title or f"{gates.value.capitalize()}s ({where})")
    ax.grid(False)  # a whitegrid style would draw lines over the blank cells
    ax.tick_params(axis="x", rotation=35)
    ax.tick_params(axis="y", rotation=0)
    plt.setp(ax.get_xticklabels(), ha="right")
    fig.tight_layout()
    return fig


# --- the gate explorer's views and the expert panel's parameter count ---------------------------

def module_names(gates: GateWeights) -> list[str]:
    """The kinds of adapted module (last name part: ``q_proj``, ``up_proj``...), in model order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in gates.layers))


def short_layer_name(name: str, with_module: bool = True) -> str:
    """``model.layers.12.self_attn.q_proj`` -> ``12 q_proj`` (or ``12``); other names unchanged."""
    block = re.search(r"(?:^|\.)(\d+)\.", name)
    if block is None:
        return name
    return f"{block.group(1)} {name.rsplit('.', 1)[-1]}" if with_module else block.group(1)


MAX_ANNOTATED_ROWS = 40
"""``layer_gate_heatmap`` prints the weights in the cells up to this many rows (layers)."""


def layer_gate_heatmap(gates: GateWeights, task: str | int, module: str | None = None,
                       title: str | None = None) -> plt.Figure:
    """Layer x expert heatmap of one task's gate weights, over the experts that task may use.

    Rows: every adapted layer, or only those whose name ends with ``module`` (``"q_proj"``).
    Colour: the weight against the uniform mix ``total/K`` (K = experts the task may use), white
    at uniform, on a fixed range from 0 to twice uniform, so noise is not painted as signal; the
    cells print the weights. Each row sums to ``gates.total`` (1 for a softmax gate or shares, K
    for a scaled gate); the experts of other tasks are left out (their weight is 0).
    Above ``MAX_ANNOTATED_ROWS`` rows (all 210 projections of SmolLM2), rows are thin and unnumbered.
    """
    t = gates.tasks.index(task) if isinstance(task, str) else int(task)
    if not 0 <= t < len(gates.tasks):
        raise ValueError(f"task {task!r} not in {gates.tasks}")
    rows = [i for i, name in enumerate(gates.layers)
            if module is None or name == module or name.endswith("." + module)]
    if not rows:
        raise ValueError(f"no adapted layer is a {module!r}; adapted modules: {module_names(gates)}")
    usable = gates.weights[:, t].sum(0) > 0  # (expert,): the experts task t may use
    weights = gates.weights[rows][:, t][:, usable]  # (rows, usable experts)
    experts = [e for e, ok in zip(gates.experts, usable.tolist()) if ok]
    labels = [short_layer_name(gates.layers[i], with_module=module is None) for i in rows]
    frame = pd.DataFrame(weights.numpy(), index=labels, columns=experts)
    uniform = gates.total / len(experts)
    few = len(rows) <= MAX_ANNOTATED_ROWS  # many rows: thinner, no numbers, some row labels
    fig, ax = plt.subplots(figsize=(2.6 + 0.9 * len(experts), 1.5 + (0.24 if few else 0.06) * len(rows)))
    sns.heatmap(frame, annot=few, fmt=".3f", annot_kws={"fontsize": 7}, cmap="vlag",
                center=uniform, vmin=0, vmax=2 * uniform, yticklabels=True if few else "auto",
                cbar_kws={"label": f"{gates.value} (white: uniform {uniform:.3g})"}, ax=ax)
    which = f"{module} layers" if module else "all adapted layers"
    ax.set(xlabel="expert", ylabel="layer" if module else "layer and module",
           title=title or f"{gates.value.capitalize()}s of task {gates.tasks[t]!r} ({which})")
    ax.grid(False)
    ax.tick_params(axis="x", rotation=35)
    ax.tick_params(axis="y", rotation=0, labelsize=7 if len(rows) > 20 else 9)
    plt.setp(ax.get_xticklabels(), ha="right")
    fig.tight_layout()
    return fig


# --- task affinity ----------------------------------------------------------------------------

def affinity_clustermap(affinity: Affinity, clusters: dict[str, list[str]] | None = None,
                        linkage: str = "average", title: str | None = None) -> plt.Figure:
    """Seaborn clustermap of a task affinity matrix (rows: source task i, columns: target task j).

    Rows and columns are ordered by the dendrogram of ``cluster_tasks`` (``affinity_linkage``:
    the same tree for both, so the diagonal stays the diagonal), cells print the values, and the
    colour is centred on 0 (red: i helps j, blue: i hurts j) and scaled to the off-diagonal cells
    (a task's affinity with itself is the largest and would wash the others out). With ``clusters`` (as returned by
    ``cluster_tasks``), row and column labels get one colour per cluster, with a legend.
    """
    import numpy as np
    from matplotlib.patches import Patch

    tree = affinity_linkage(affinity, linkage)  # raises for fewer than two tasks
    frame = affinity.matrix.rename_axis(index="source task i", columns="target task j")
    colors, handles = None, []
    if clusters is not None:
        where = {task: name for name, members in clusters.items() for task in members}
        missing = [t for t in affinity.tasks if t not in where]
        if missing:
            raise ValueError(f"tasks {missing} are in no cluster of {clusters}")
        palette = dict(zip(clusters, sns.color_palette("colorblind", len(clusters))))
        colors = pd.Series([palette[where[t]] for t in affinity.tasks], index=affinity.tasks,
                           name="cluster")
        handles = [Patch(color=c, label=name) for name, c in palette.items()]
    size = 3.2 + 0.9 * len(affinity.tasks)
    off_diagonal = ~np.eye(len(affinity.tasks), dtype=bool)  # (T, T)
    spread = float(np.abs(frame.to_numpy()[off_diagonal]).max()) or 1.0
    label = {"gradient": "gradient cosine", "lookahead": "lookahead affinity Z"}.get(
        affinity.method, affinity.method)
    grid = sns.clustermap(frame, row_linkage=tree, col_linkage=tree, row_colors=colors,
                          col_colors=colors, annot=True, fmt=".2f" if spread >= 0.1 else ".3f",
                          cmap="vlag", center=0,
                          vmin=-spread, vmax=spread, figsize=(size, size), dendrogram_ratio=0.15)
    grid.ax_heatmap.tick_params(axis="y", rotation=0)
    if handles:
        grid.ax_col_dendrogram.legend(handles=handles, title="cluster", loc="center left",
                                      bbox_to_anchor=(1.02, 0.5), fontsize=8, title_fontsize=9)
    grid.figure.suptitle(title or f"Task affinity ({label})", y=1.02)
    return grid.figure


# --- a run folder's figures -------------------------------------------------------------------

def score_intervals(table: pd.DataFrame, tasks: list[str],
                    title: str = "Test score per task and method, with 95% intervals") -> plt.Figure:
    """Per-task scores with their bootstrap intervals: ``table`` is ``experiment.seesaw_table``'s
    (columns ``<task>``, ``<task> low``, ``<task> high`` for every task; methods as rows)."""
    methods = list(table.index)
    colors = sns.color_palette("colorblind", len(methods))
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(tasks), 4.2))
    width = 0.8 / len(methods)
    for m, (method, color) in enumerate(zip(methods, colors)):
        x = [i - 0.4 + width * (m + 0.5) for i in range(len(tasks))]
        mean = table.loc[method, tasks].to_numpy(float)
        low = table.loc[method, [f"{t} low" for t in tasks]].to_numpy(float)
        high = table.loc[method, [f"{t} high" for t in tasks]].to_numpy(float)
        ax.bar(x, mean, width, color=color, label=method)
        ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylim=(0, 1), ylabel="score (accuracy / ROUGE-L / exact match)", title=title)
    ax.legend(title="method", fontsize=8, title_fontsize=9, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def validation_curves(history: pd.DataFrame,
                      title: str = "Validation loss per task (teacher-forced answer tokens)") -> plt.Figure:
    """One panel per task: validation loss against optimizer step, one colour per method (the mean
    over seeds; a band when there are several). ``history`` has columns ``method``, ``task``,
    ``step``, ``val_loss`` (and ``seed``). A seesaw shows as a task whose loss stalls or rises under
    a shared method while its own LoRA keeps going down."""
    missing = {"method", "task", "step", "val_loss"} - set(history.columns)
    if missing:
        raise ValueError(f"history needs columns method, task, step, val_loss; missing {sorted(missing)}")
    tasks = list(dict.fromkeys(history["task"]))
    methods = list(dict.fromkeys(history["method"]))
    palette = dict(zip(methods, sns.color_palette("colorblind", len(methods))))
    cols = min(len(tasks), 2)
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False, sharex=True)
    for ax, task in zip(axes.flat, tasks):
        sns.lineplot(data=history[history["task"] == task], x="step", y="val_loss", hue="method",
                     palette=palette, ax=ax, legend=False, errorbar=("pi", 100), marker="o", markersize=3)
        ax.set(title=task, ylabel="validation loss", xlabel="optimizer step")
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=palette[m], marker="o", markersize=4) for m in methods]
    fig.legend(handles, methods, title="method", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def run_figures(runs: dict[str, list[dict]], table: pd.DataFrame, tasks: list[str]) -> dict[str, plt.Figure]:
    """The figures of an experiment's run folder, by file name: ``scores.png``
    (``score_intervals``), ``validation_curves.png`` (``validation_curves``, when validation loss
    was recorded), and for the first seed of every method one ``gates_<method>_<cluster>.png`` per
    gated cluster and one ``contributions_<method>_<cluster>.png`` per cluster (``gate_heatmap``).
    ``runs``: ``{method: [run_method result per seed]}``; ``table``: ``experiment.seesaw_table``."""
    figures = {"scores.png": score_intervals(table, tasks)}
    history = validation_history(runs)
    if not history.empty:
        figures["validation_curves.png"] = validation_curves(history)
    for method, results in runs.items():
        for kind in ("gates", "contributions"):
            for cluster, gates in results[0].get(kind, {}).items():
                name = f"{kind}_{method}_{cluster}.png".replace("+", "plus")
                figures[name] = gate_heatmap(gates, title=f"{method}, cluster {cluster!r}: "
                                                          f"{gates.value}s (mean over layers)")
    return figures


def validation_history(runs: dict[str, list[dict]]) -> pd.DataFrame:
    """Long table (method, seed, task, step, val_loss) of the per-task validation losses recorded
    while training. A method's clusters train side by side (every cluster's step s is the
    method's step s); MoDULA's stages follow each other (their steps are counted on)."""
    rows = []
    for method, results in runs.items():
        for result in results:
            histories = result.get("history", {})
            staged = method.startswith("modula")
            offset = 0
            for log in histories.values():
                for record in log:
                    for task, loss in record.get("val_loss_by_task", {}).items():
                        rows.append({"method": method, "seed": result.get("seed", 0), "task": task,
                                     "step": record["step"] + offset, "val_loss": loss})
                offset += len(log) if staged else 0
    return pd.DataFrame(rows)
