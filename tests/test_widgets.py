"""The gate explorer and expert panel: their pure functions, their wiring, and the Train handler.

No browser here (see test_browser.py): widget values are set from Python, as a front end would.
"""

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from matplotlib._pylab_helpers import Gcf

from cgclora_lite import CGCConfig, GateWeights, attached_adapters, inject, viz, widgets
from cgclora_lite.experiment import method_config
from cgclora_lite.framework import OnePlusN
from cgclora_lite.inject import count_parameters
from cgclora_lite.models import tiny_model
from cgclora_lite.train import TrainConfig

matplotlib.use("Agg")
pytestmark = pytest.mark.filterwarnings("ignore:FigureCanvasAgg is non-interactive")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")

CONFIGS = {
    "default": CGCConfig(),
    **{m: method_config(m) for m in ("lora", "per-task-lora", "moelora", "cgc-1+n")},
    "shared gate": CGCConfig(n_common=3, n_specific=1, gate_scope="shared", task_embedding_dim=8),
    "mixed ranks": CGCConfig(n_common=2, n_specific=2, rank_common=[4, 2], rank_specific=[3, 1]),
    "q and v only": CGCConfig(n_common=1, n_specific=2, target_modules=["q_proj", "v_proj"]),
    "no gate": CGCConfig(n_common=1, n_specific=1, gate="none"),
}
# the rank one task sees, by hand: n_common * rank_common + n_specific * rank_specific (defaults:
# 2 common and 1 specific expert of rank 4); every method of the experiment has 8 (the budget rule)
ACTIVE_RANK = {"default": 2 * 4 + 1 * 4, "lora": 8, "per-task-lora": 8, "moelora": 4 * 2,
               "cgc-1+n": 2 * 2 + 2 * 2, "shared gate": 3 * 4 + 1 * 4, "mixed ranks": 4 + 2 + 3 + 1,
               "q and v only": 1 * 4 + 2 * 4, "no gate": 1 * 4 + 1 * 4}


@pytest.fixture(scope="module")
def tokenizer():
    from cgclora_lite.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def classify_tasks():
    from cgclora_lite.tasks import load_default_tasks

    return load_default_tasks(train=8, test=2)[:2]  # topic, sentiment


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n_tasks", [1, 3])
def test_count_parameters_equals_a_real_injection(name, n_tasks):
    config = CONFIGS[name]
    model = tiny_model(seed=0, vocab_size=128)
    counts = count_parameters(model, config, n_tasks)  # from shapes: nothing is built
    assert attached_adapters(model) is None
    adapters = inject(model, config, [f"t{i}" for i in range(n_tasks)])
    assert counts["trainable"] == adapters.num_trainable()
    assert counts["adapted_layers"] == len(adapters.layers)
    assert counts["active_rank"] == ACTIVE_RANK[name]
    for task in range(n_tasks):  # and what each task of the built layers really sees
        seen = {layer.export_factors(task)[0].shape[0] for layer in adapters.layers.values()}
        assert seen == {ACTIVE_RANK[name]}
    assert counts["total_rank"] == next(iter(adapters.layers.values())).lora_A.shape[0]
    gate = sum(p.numel() for layer in adapters.layers.values() if layer.gate is not None
               for p in layer.gate.parameters())
    gate += sum(p.numel() for p in adapters.shared_gate.parameters()) if adapters.shared_gate else 0
    assert counts["gate"] == gate
    # per task: exactly the plain LoRA that exports one task
    exported = sum(sum(f.numel() for f in layer.export_factors(0)) for layer in adapters.layers.values())
    assert counts["per_task"] == exported
    assert counts["trainable"] == counts["common"] + counts["specific"] + counts["gate"]


def test_count_parameters_takes_shapes_and_refuses_nonsense():
    config = CGCConfig(n_common=1, n_specific=1, rank_common=2, rank_specific=3, gate="none")
    by_list = count_parameters([(10, 20), (5, 20)], config, n_tasks=2)
    # common: 2 * (30 + 25); specific: 2 tasks * 3 * (30 + 25)
    assert by_list["common"] == 110 and by_list["specific"] == 330 and by_list["trainable"] == 440
    assert count_parameters({"a": (10, 20), "b": (5, 20)}, config, 2) == by_list
    with pytest.raises(ValueError, match="n_tasks"):
        count_parameters([(10, 20)], config, 0)
    model = tiny_model(seed=0, vocab_size=128)
    inject(model, config, ["a", "b"])
    with pytest.raises(ValueError, match="detach"):
        count_parameters(model, config, 2)


def _gates() -> GateWeights:
    """2 blocks x (q_proj, v_proj), tasks a and b, 1 common + 1 specific expert each."""
    layers = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    w = torch.tensor([[[0.6, 0.4, 0.0], [0.3, 0.0, 0.7]],
                      [[0.5, 0.5, 0.0], [0.2, 0.0, 0.8]],
                      [[0.9, 0.1, 0.0], [0.1, 0.0, 0.9]],
                      [[0.4, 0.6, 0.0], [0.5, 0.0, 0.5]]])  # (layer, task, expert)
    return GateWeights(w, layers, ["a", "b"], ["common1", "a/specific1", "b/specific1"])


def test_layer_gate_heatmap_shows_one_task_by_layer_over_its_own_experts():
    gates = _gates()
    ax = viz.layer_gate_heatmap(gates, "b", module="q_proj").axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]  # block index of each q_proj
    assert [t.get_text() for t in ax.get_xticklabels()] == ["common1", "b/specific1"]  # not a's
    assert [t.get_text() for t in ax.texts] == ["0.300", "0.700", "0.100", "0.900"]
    assert "'b'" in ax.get_title()
    ax = viz.layer_gate_heatmap(gates, 0).axes[0]  # task by id, every layer
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 q_proj", "0 v_proj", "1 q_proj", "1 v_proj"]
    assert [t.get_text() for t in ax.texts][:2] == ["0.600", "0.400"]
    with pytest.raises(ValueError, match="adapted modules: \\['q_proj', 'v_proj'\\]"):
        viz.layer_gate_heatmap(gates, "a", module="o_proj")
    with pytest.raises(ValueError):
        viz.layer_gate_heatmap(gates, "c")
    assert viz.short_layer_name("lm_head") == "lm_head"


def test_many_layers_thin_rows_and_the_explorer_starts_on_one_module():
    blocks = 30
    layers = [f"model.layers.{i}.mlp.{m}" for i in range(blocks) for m in ("up_proj", "down_proj")]
    w = torch.tensor([0.5, 0.5, 0.0]).expand(len(layers), 1, 3)  # (layer, task, expert)
    gates = GateWeights(w, layers, ["a"], ["common1", "a/specific1", "b/specific1"])
    fig = viz.layer_gate_heatmap(gates, "a")  # 60 rows: no numbers in the cells
    assert not fig.axes[0].texts and fig.get_size_inches()[1] < 6
    assert len(viz.layer_gate_heatmap(gates, "a", module="up_proj").axes[0].texts) == 2 * blocks
    explorer = widgets.GateExplorer(gates)
    assert explorer.module_dropdown.value == "up_proj"
    assert len(explorer.layer_dropdown.options) == 1 + blocks


def _title(figure) -> str:
    return figure.axes[0].get_title()


def test_explorer_redraws_for_the_task_module_layer_and_cluster_chosen(monkeypatch):
    calls = []
    real = viz.layer_gate_heatmap
    monkeypatch.setattr(viz, "layer_gate_heatmap",
                        lambda gates, task, module=None, title=None: calls.append((task, module))
                        or real(gates, task, module, title))
    fresh = GateWeights(torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]]] * 4), _gates().layers,
                        ["a", "b"], _gates().experts)
    explorer = widgets.GateExplorer({"trained": _gates(), "fresh": fresh})
    assert calls == [("a", None)] and len(explorer.figures) == 2
    explorer.task_dropdown.value = "b"
    assert calls[-1] == ("b", None) and len(calls) == 2  # one redraw per change
    assert "'b'" in _title(explorer.figures[1])
    assert "mean over 4 layers" in _title(explorer.figures[0])

    explorer.module_dropdown.value = "v_proj"
    assert calls[-1] == ("b", "v_proj") and len(calls) == 3
    assert [v for _, v in explorer.layer_dropdown.options] == [
        widgets.MEAN, "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert "mean over 2 v_proj layers" in _title(explorer.figures[0])
    explorer.layer_dropdown.value = "model.layers.1.self_attn.v_proj"
    assert "layer 1 v_proj" in _title(explorer.figures[0])
    texts = [t.get_text() for t in explorer.figures[0].axes[0].texts]
    assert texts == ["0.40", "0.60", "0.50", "0.50"]  # that layer's weights, not the mean

    old, n_calls = list(explorer.figures), len(calls)
    explorer.cluster_dropdown.value = "fresh"  # choices kept where they still apply
    assert len(calls) == n_calls + 1  # one redraw, although three dropdowns got new options
    assert explorer.task_dropdown.value == "b" and explorer.module_dropdown.value == "v_proj"
    assert _title(explorer.figures[0]).startswith("fresh:")
    still_open = [m.canvas.figure for m in Gcf.get_all_fig_managers()]
    assert not any(f is g for f in old for g in still_open)  # the old figures are closed

    explorer.add("another", _gates())
    assert explorer.cluster_dropdown.value == "another"
    assert _title(explorer.figures[1]).startswith("another:")
    explorer.add("not shown", _gates(), show=False)
    assert explorer.cluster_dropdown.value == "another"
    assert list(explorer.cluster_dropdown.options) == ["trained", "fresh", "another", "not shown"]
    with pytest.raises(ValueError):
        widgets.GateExplorer({})


def test_panel_slider_updates_the_count_to_a_real_injection_count(tokenizer, classify_tasks):
    model = tiny_model(seed=0)
    panel = widgets.ExpertPanel(model, tokenizer, classify_tasks, progress=False)
    assert f"<b>{panel.counts['trainable']:,}</b>" in panel.count_label.value
    for slider, value in [(panel.specific_slider, 3), (panel.common_slider, 0), (panel.rank_slider, 5)]:
        before = panel.count_label.value
        slider.value = value
        config = CGCConfig(n_common=panel.common_slider.value, n_specific=panel.specific_slider.value,
                           rank_common=panel.rank_slider.value, rank_specific=panel.rank_slider.value)
        expected = count_parameters(tiny_model(seed=0), config, 2)
        real = inject(tiny_model(seed=0), config, ["topic", "sentiment"]).num_trainable()
        assert panel.counts == expected and expected["trainable"] == real
        assert panel.count_label.value != before
        assert f"<b>{real:,}</b> trainable parameters" in panel.count_label.value
        assert f"active rank {config.r_active}," in panel.count_label.value
    panel.specific_slider.value = 0  # no expert at all: said so, and Train is off
    assert "Not a valid configuration" in panel.count_label.value and panel.train_button.disabled
    panel.common_slider.value = 1
    assert not panel.train_button.disabled


def test_train_button_trains_scores_and_draws_leaving_the_model_as_it_was(tokenizer, classify_tasks,
                                                                        monkeypatch):
    from cgclora_lite.evaluate import score_task

    trained = []  # what the real train_and_score returned, answers included

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        trained.append({t: dict(s) for t, s in result["scores"].items()})
        # known, distinct scores (a tiny random model scores 0 everywhere): the panel must show these
        for task, each in {"topic": [0.0, 1.0], "sentiment": [1.0, 1.0]}.items():
            result["scores"][task].update(score=sum(each) / 2, per_example=each)
        return result

    real = widgets.train_and_score
    monkeypatch.setattr(widgets, "train_and_score", spy)
    model = tiny_model(seed=0)
    framework = OnePlusN(model, tokenizer, max_length=64)  # a cluster already in the model
    framework.add_cluster("classify", classify_tasks, CGCConfig(n_common=1, n_specific=1))
    theirs = attached_adapters(model)
    explorer = widgets.GateExplorer({"classify": theirs.gate_weights()})
    panel = widgets.ExpertPanel(model, tokenizer, classify_tasks, progress=False, explorer=explorer,
                                train_config=TrainConfig(steps=2, lr=1e-2), batch_size=4,
                                max_length=64, eval_limit=2)
    panel.rank_slider.value = 3
    before = {k: v.clone() for k, v in theirs.state_dict().items()}
    panel.train_button.click()  # what the front end does on a press

    (run,) = panel.runs
    assert run.label == "#1 2c+2s r3" and run.config.rank_common == 3
    # train_and_score's scores are those of the answers it generated (rescored here from the
    # answers and the test targets: eval_limit=2 examples per task); the run shows them by task
    (scored,) = trained
    for task in classify_tasks:
        answers = scored[task.name]["answers"]
        assert len(answers) == 2
        targets = [ex.target for ex in task.test[:2]]
        assert scored[task.name]["score"] == score_task(task, answers, targets)["score"]
    assert run.scores == {"topic": 0.5, "sentiment": 1.0} and run.seeds == (0,) and run.steps == 2
    # one seed, two examples: the bootstrap draws 0/1 pairs (topic) or always 1 (sentiment)
    assert (run.intervals["topic"].low, run.intervals["topic"].high) == (0.0, 1.0)
    assert run.intervals["sentiment"] == widgets.Interval(1.0, 1.0, 1.0)
    assert panel.score_table().loc["#1 2c+2s r3", ["topic", "sentiment"]].tolist() == [0.5, 1.0]
    assert panel.score_table().loc["#1 2c+2s r3", "topic 95% interval"] == "[0.00, 1.00]"
    assert "test scores topic 0.50 [0.00, 1.00], sentiment 1.00 [1.00, 1.00]" in panel.status.value
    assert len(run.history) == 2 and run.trainable == panel.counts["trainable"]
    assert run.gates.weights.shape == (len(panel.shapes), 2, 2 + 2 * 2)
    assert torch.allclose(run.gates.weights.sum(-1), torch.ones(len(panel.shapes), 2))
    assert "#1 2c+2s r3: 2 steps x 1 seed(s)" in panel.status.value and not panel.train_button.disabled
    assert [f.axes[0].get_title() for f in panel.figures] == [
        "#1 2c+2s r3: gate weights (mean over layers)", "Test score per task and run (95% intervals)"]
    error_bars = [segment for c in panel.figures[1].axes[0].collections for segment in c.get_segments()]
    assert sorted((low, high) for (_, low), (_, high) in error_bars) == [(0.0, 1.0), (1.0, 1.0)]
    assert list(panel.score_table().index) == ["#1 2c+2s r3"]
    assert explorer.cluster_dropdown.value == "panel #1 2c+2s r3"
    assert explorer.contributions["panel #1 2c+2s r3"] is run.contributions  # its shares too
    assert run.contributions.value == "contribution share"
    # the framework's own adapters are back, untouched
    assert attached_adapters(model) is theirs
    assert all(torch.equal(before[k], v) for k, v in theirs.state_dict().items())

    panel.common_slider.value = 0
    panel.train()
    assert [r.label for r in panel.runs] == ["#1 2c+2s r3", "#2 0c+2s r3"]
    bars = panel.figures[-1].axes[0]
    assert {t.get_text() for t in bars.get_legend().get_texts()} == {"#1 2c+2s r3", "#2 0c+2s r3"}
    assert isinstance(panel.score_table(), pd.DataFrame) and len(panel.score_table()) == 2


def test_panel_trains_each_seed_with_the_steps_and_gate_options_chosen(tokenizer, classify_tasks, monkeypatch):
    calls = []

    def spy(model, tokenizer, clusters, config, train_config, *args, **kwargs):
        calls.append((config, train_config, torch.initial_seed()))
        each = {"topic": [float(len(calls) == 1), 1.0], "sentiment": [0.0, 0.0]}  # seed 0: topic 1/2 right
        return {"scores": {t: {"score": sum(v) / 2, "per_example": v} for t, v in each.items()},
                "gates": {"panel": _gates()} if len(calls) == 1 else {"panel": _flat_gates()},
                "contributions": {"panel": _flat_gates()}, "history": {"panel": [{"loss": 1.0}]},
                "trainable_parameters": 7, "train_seconds": 1.0, "eval_seconds": 0.5}

    monkeypatch.setattr(widgets, "train_and_score", spy)
    panel = widgets.ExpertPanel(tiny_model(seed=0), tokenizer, classify_tasks, progress=False,
                                train_config=TrainConfig(steps=3, lr=1e-2, seed=5))
    assert panel.steps_slider.value == 3 and panel.seeds_slider.value == 1
    panel.steps_slider.value, panel.seeds_slider.value = 7, 2
    panel.gate_norm_dropdown.value, panel.gate_lr_dropdown.value = "scaled", 10.0
    run = panel.train()
    assert [(c.gate_norm, c.gate_lr_scale, t.steps, t.seed, init) for c, t, init in calls] == [
        ("scaled", 10.0, 7, 5, 5), ("scaled", 10.0, 7, 6, 6)]  # each seed: its batches and its start
    assert run.seeds == (5, 6) and run.steps == 7 and run.seconds == 3.0
    assert run.scores == {"topic": 0.75, "sentiment": 0.0}  # the mean over the seeds
    assert run.intervals["sentiment"] == widgets.Interval(0.0, 0.0, 0.0)
    assert run.intervals["topic"].low < 0.75 < run.intervals["topic"].high
    assert torch.allclose(run.gates.weights, (_gates().weights + _flat_gates().weights) / 2)
    row = panel.score_table().loc[run.label]
    assert (row["gate"], row["gate lr x"], row["steps"], row["seeds"]) == ("scaled", 10.0, 7, 2)
    assert "7 steps x 2 seed(s)" in panel.status.value


def _flat_gates() -> GateWeights:
    g = _gates()
    return GateWeights(torch.where(g.weights > 0, 0.5, 0.0), g.layers, g.tasks, g.experts)


def test_explorer_shows_contribution_shares_when_asked():
    shares = GateWeights(_flat_gates().weights, _gates().layers, ["a", "b"], _gates().experts,
                         value="contribution share")
    explorer = widgets.GateExplorer({"trained": _gates(), "fresh": _gates()}, contributions={"trained": shares})
    assert "gate weights, mean over 4 layers" in _title(explorer.figures[0])
    explorer.layer_dropdown.value = "model.layers.1.self_attn.v_proj"
    explorer.view_toggle.value = widgets.CONTRIBUTION_VIEW
    assert explorer.shown is shares
    assert _title(explorer.figures[0]) == "trained: contribution shares of layer 1 v_proj"
    assert [t.get_text() for t in explorer.figures[0].axes[0].texts] == ["0.50", "0.50", "0.50", "0.50"]
    assert "contribution shares by layer" in _title(explorer.figures[1])
    explorer.cluster_dropdown.value = "fresh"  # no shares recorded: its gate weights, and the title says so
    assert explorer.shown is explorer.gates["fresh"]
    assert "gate weights (no contribution shares recorded for this cluster)" in _title(explorer.figures[0])
    explorer.add("new", _gates(), shares)
    assert explorer.shown is shares
    with pytest.raises(ValueError, match="without gate weights"):
        widgets.GateExplorer({"a": _gates()}, contributions={"b": shares})
