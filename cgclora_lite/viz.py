"""Figures: pure functions that draw results and return a matplotlib ``Figure`` (they never train).

* ``score_bars``: per-task scores by method (the seesaw at a glance);
* ``training_curves``: training loss against step, one line per method and cluster;
* ``gate_heatmap``: the gate weights of one cluster, task x expert (mean over layers, or one layer).

Each takes plain data (a pandas DataFrame or a ``GateWeights``), so notebooks and widgets can call
them with anything they computed.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

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
