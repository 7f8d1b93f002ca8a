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
    """Grouped bars: ``scores`` has columns ``task``, ``method``, ``score`` (one row each)."""
    missing = {"task", "method", "score"} - set(scores.columns)
    if missing:
        raise ValueError(f"scores needs columns task, method, score; missing {sorted(missing)}")
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * scores["task"].nunique(), 4.2))
    sns.barplot(data=scores, x="task", y="score", hue="method", ax=ax, palette="colorblind")
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
    """Task x expert heatmap of gate weights: the mean over layers, or one layer (name or index).

    A blank cell is an expert the task may not use (another task's specific expert).
    """
    if layer is None:
        weights, where = gates.weights.mean(0), f"mean over {len(gates.layers)} layers"
    else:
        index = gates.layers.index(layer) if isinstance(layer, str) else layer
        weights, where = gates.weights[index], gates.layers[index]
    frame = pd.DataFrame(weights.numpy(), index=gates.tasks, columns=gates.experts)
    usable = gates.weights.sum(0).numpy() > 0  # (task, expert): ever nonzero in some layer
    fig, ax = plt.subplots(figsize=(2.0 + 0.8 * len(gates.experts), 1.8 + 0.45 * len(gates.tasks)))
    sns.heatmap(frame, mask=~usable, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis",
                cbar_kws={"label": "gate weight"}, ax=ax)
    ax.set(xlabel="expert", ylabel="task", title=title or f"Gate weights ({where})")
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
    Colour: the weight against the uniform mix ``1/K`` (K = experts the task may use), white at
    uniform, so that small moves of a short training run show; the cells print the weights.
    Each row sums to 1 (a softmax); the experts of other tasks are left out (their weight is 0).
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
    uniform = 1 / len(experts)
    spread = max(float((weights - uniform).abs().max()), 0.02)
    few = len(rows) <= MAX_ANNOTATED_ROWS  # many rows: thinner, no numbers, some row labels
    fig, ax = plt.subplots(figsize=(2.6 + 0.9 * len(experts), 1.5 + (0.24 if few else 0.06) * len(rows)))
    sns.heatmap(frame, annot=few, fmt=".3f", annot_kws={"fontsize": 7}, cmap="vlag",
                center=uniform, vmin=uniform - spread, vmax=uniform + spread,
                yticklabels=True if few else "auto",
                cbar_kws={"label": f"gate weight (white: uniform 1/{len(experts)})"}, ax=ax)
    which = f"{module} layers" if module else "all adapted layers"
    ax.set(xlabel="expert", ylabel="layer" if module else "layer and module",
           title=title or f"Gate weights of task {gates.tasks[t]!r} ({which})")
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

def run_figures(results: dict) -> dict[str, plt.Figure]:
    """The figures of an experiment's run folder, by file name: ``scores.png`` (``score_bars``),
    ``training_curves.png`` (``training_curves``) and one ``gates_<method>_<cluster>.png``
    (``gate_heatmap``) per gated cluster. ``results``: ``{method: run_method(...) result}``."""
    scores = pd.DataFrame([{"method": m, "task": t, "score": s["score"]}
                           for m, r in results.items() for t, s in r["scores"].items()])
    figures = {"scores.png": score_bars(scores)}
    history = pd.DataFrame([{"method": m, "cluster": c, **h} for m, r in results.items()
                            for c, hs in r.get("history", {}).items() for h in hs])
    if not history.empty:
        figures["training_curves.png"] = training_curves(history)
    for method, result in results.items():
        for cluster, gates in result.get("gates", {}).items():
            figures[f"gates_{method}_{cluster}.png".replace("+", "plus")] = gate_heatmap(
                gates, title=f"{method}, cluster {cluster!r}: gate weights (mean over layers)")
    return figures
