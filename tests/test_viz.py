"""Figures are pure functions of their data: check what they draw, not how it looks."""

import matplotlib
import pandas as pd
import pytest
import torch

from cgclora_lite.inject import GateWeights
from cgclora_lite.viz import gate_heatmap, score_bars, training_curves

matplotlib.use("Agg")


def test_score_bars_draw_one_bar_per_method_and_task():
    scores = pd.DataFrame([{"task": t, "method": m, "score": s} for t, m, s in
                           [("a", "lora", 0.5), ("a", "cgc", 0.7), ("b", "lora", 0.2), ("b", "cgc", 0.4)]])
    fig = score_bars(scores)
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 3) for p in ax.patches if p.get_height() > 0)
    assert heights == [0.2, 0.4, 0.5, 0.7]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    with pytest.raises(ValueError, match="missing \\['score'\\]"):
        score_bars(scores.drop(columns="score"))


def test_training_curves_smooth_each_run():
    history = pd.DataFrame({"method": ["m"] * 4, "cluster": ["c"] * 4, "step": [1, 2, 3, 4],
                            "loss": [4.0, 2.0, 3.0, 1.0]})
    ax = training_curves(history, smooth=2).axes[0]
    (line,) = [l for l in ax.get_lines() if len(l.get_xdata()) == 4]
    assert list(line.get_ydata()) == [4.0, 3.0, 2.5, 2.0]


def test_gate_heatmap_shows_mean_or_one_layer_and_blanks_forbidden_experts():
    weights = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.0, 0.8]],
                            [[0.7, 0.3, 0.0], [0.4, 0.0, 0.6]]])  # (layer, task, expert)
    gates = GateWeights(weights, ["l0", "l1"], ["t0", "t1"], ["common1", "t0/specific1", "t1/specific1"])
    texts = [t.get_text() for t in gate_heatmap(gates).axes[0].texts]
    assert texts == ["0.60", "0.40", "0.30", "0.70"]  # mean over layers, 2 blank cells
    texts = [t.get_text() for t in gate_heatmap(gates, layer="l1").axes[0].texts]
    assert texts == ["0.70", "0.30", "0.40", "0.60"]
