"""The seesaw toy (``toy``) and its live panel (``widgets.ToyPanel``).

The behavioural checks (who beats whom, the front's shape, the division of labour, the fast gate)
held for every seed tried when they were written (seeds 0-2, and 0-5 for the fast gate); they run
here on two seeds each.
"""

import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from cgclora_lite import CGCLoRALinear, toy, widgets

matplotlib.use("Agg")
pytestmark = pytest.mark.filterwarnings("ignore:FigureCanvasAgg is non-interactive")
SEEDS = (0, 1)
SMALL = toy.ToyConfig(steps=40, n_train=64, n_test=64, eval_every=10)  # for the panel's wiring


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --- the tasks and the methods -------------------------------------------------------------------

@pytest.mark.parametrize("conflict", [0.0, 0.3, 0.75, 1.0])
def test_targets_are_the_shared_part_plus_each_tasks_own(conflict):
    config = toy.ToyConfig(conflict=conflict)
    tasks = toy.make_tasks(config)
    d, t = config.dim, len(toy.TASKS)
    assert tasks.train_x.shape == tasks.train_y.shape == (t, config.n_train, d)
    assert tasks.test_x.shape == (t, config.n_test, d) and tasks.targets.shape == (t, d, d)
    assert torch.allclose(tasks.targets, tasks.shared + tasks.own)
    assert torch.allclose(tasks.shared.norm(), torch.tensor(math.sqrt(1 - conflict) * config.target_norm))
    assert torch.allclose(tasks.own.norm(dim=(1, 2)), torch.tensor(math.sqrt(conflict) * config.target_norm))
    if 0 < conflict:
        assert torch.linalg.matrix_rank(tasks.own[0]) == config.target_rank
    if conflict < 1:
        assert torch.linalg.matrix_rank(tasks.shared) == config.target_rank
    # the test targets are exact: (W0 + dW_t) x; the frozen layer's loss is ||dW_t x||^2 on average
    assert torch.allclose(tasks.test_y, tasks.test_x @ (tasks.base.weight + tasks.targets).transpose(1, 2))
    assert not tasks.base.weight.requires_grad


@pytest.mark.parametrize("seed", range(4))
def test_conflict_sets_how_much_the_two_maps_agree(seed):
    for conflict in (0.0, 0.5, 1.0):
        tasks = toy.make_tasks(toy.ToyConfig(conflict=conflict, seed=seed))
        cosine = torch.nn.functional.cosine_similarity(tasks.targets[0].flatten(), tasks.targets[1].flatten(), dim=0)
        assert abs(cosine.item() - (1 - conflict)) < 0.1
    same = toy.make_tasks(toy.ToyConfig(conflict=0.0, seed=seed))
    assert torch.equal(same.targets[0], same.targets[1])


def test_the_same_seed_draws_the_same_tasks_and_another_seed_others():
    a, b = toy.make_tasks(toy.ToyConfig()), toy.make_tasks(toy.ToyConfig())
    c = toy.make_tasks(toy.ToyConfig(seed=1))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.targets, c.targets)


@pytest.mark.parametrize("kw", [{}, {"n_common": 2, "n_specific": 1, "rank": 3}, {"n_common": 0, "n_specific": 2},
                                {"n_common": 3, "n_specific": 0, "scaling": 0.5}])
def test_every_method_gets_the_same_active_rank_and_scale(kw):
    config = toy.ToyConfig(**kw)
    methods = {}
    for method in toy.METHODS:
        cgc = toy.method_config(config, method)
        assert cgc.r_active == config.r_active == (config.n_common + config.n_specific) * config.rank
        assert cgc.scaling == pytest.approx(config.scaling)
        methods[method] = cgc.method
    assert methods["lora"] == "lora" and methods["per-task-lora"] == "per-task lora"
    assert methods["moelora"] == "moelora"
    if config.n_common and config.n_specific:
        assert methods["cgc-lora"] == methods["cgc-frozen-gate"] == "cgc-lora"


def test_bad_configurations_and_methods_are_refused():
    with pytest.raises(ValueError, match="conflict"):
        toy.ToyConfig(conflict=1.5)
    with pytest.raises(ValueError, match="at least one expert"):
        toy.ToyConfig(n_common=0, n_specific=0)
    with pytest.raises(ValueError, match="steps"):
        toy.ToyConfig(steps=0)
    with pytest.raises(ValueError, match="unknown toy method"):
        toy.method_config(toy.ToyConfig(), "lora-xl")


@pytest.mark.parametrize("method", toy.METHODS)
def test_a_fresh_toy_layer_is_the_frozen_layer(method):
    config = toy.ToyConfig()
    tasks = toy.make_tasks(config)
    layer = CGCLoRALinear(tasks.base, list(toy.TASKS), toy.method_config(config, method))
    x = tasks.test_x.reshape(-1, config.dim)
    ids = torch.arange(2).repeat_interleave(config.n_test)
    with torch.no_grad():
        assert torch.equal(layer(x, task_ids=ids), tasks.base(x))
    assert torch.allclose(toy.relative_losses(layer, tasks), torch.ones(2))


# --- training ------------------------------------------------------------------------------------

def test_a_run_records_curves_gates_contributions_and_leaves_the_random_state_alone():
    config = toy.ToyConfig(steps=60, eval_every=20)
    state = torch.random.get_rng_state()
    run = toy.train(config, "cgc-lora")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sorted(run.curves["step"].unique()) == [1, 20, 40, 60]
    assert set(run.curves["task"]) == set(toy.TASKS)
    final = run.curves[run.curves["step"] == 60].set_index("task")["loss"].to_dict()
    assert run.losses == final and all(0 <= v < 1 for v in final.values())
    assert run.gates.weights.shape == run.contributions.weights.shape == (1, 2, 3)
    assert run.gates.experts == ["common1", "A/specific1", "B/specific1"]
    assert torch.allclose(run.gates.weights.sum(-1), torch.ones(1, 2)) and run.gates.total == 1
    assert torch.allclose(run.contributions.weights.sum(-1), torch.ones(1, 2))
    assert run.gates.weights[0, 0, 2] == 0 and run.contributions.weights[0, 1, 1] == 0  # no access
    assert toy.usable_experts(run.layer).tolist() == [[True, True, False], [True, False, True]]
    assert run.trainable == 2 * 3 * config.rank * config.dim + (2 + 2) * 8  # experts + gate (T*D + K*D)
    again = toy.train(config, "cgc-lora")  # deterministic
    assert again.losses == run.losses and torch.equal(again.gates.weights, run.gates.weights)


def test_each_experts_update_adds_up_to_the_layers_update_per_task():
    run = toy.train(toy.ToyConfig(steps=40), "cgc-lora")
    updates = toy.expert_updates(run.layer)  # (T, E, D, D)
    for t in range(2):
        assert torch.allclose(updates[t].sum(0), run.layer.delta_weight(t), atol=1e-5)
    norms = updates.norm(dim=(2, 3))  # the contributions are these norms, as shares
    assert torch.allclose(run.contributions.weights[0], norms / norms.sum(-1, keepdim=True), atol=1e-5)


def test_a_frozen_gate_stays_at_its_start_and_a_scaled_gate_sums_to_k():
    frozen = toy.train(toy.ToyConfig(steps=40), "cgc-frozen-gate")
    assert torch.equal(frozen.gates.weights[0][frozen.gates.weights[0] > 0], torch.full((4,), 0.5))
    assert frozen.trainable == toy.train(toy.ToyConfig(steps=40), "cgc-lora").trainable  # frozen, still counted
    scaled = toy.train(toy.ToyConfig(steps=40, gate_norm="scaled"), "cgc-lora")
    assert scaled.gates.total == 2 and torch.allclose(scaled.gates.weights.sum(-1), torch.full((1, 2), 2.0))


@pytest.mark.parametrize("seed", SEEDS)
def test_per_task_lora_beats_one_shared_lora_on_each_task_at_high_conflict(seed):
    config = toy.ToyConfig(conflict=0.75, seed=seed)
    runs = toy.train_all(config, ["lora", "per-task-lora", "moelora", "cgc-lora"])
    for task in toy.TASKS:
        assert runs["per-task-lora"].losses[task] < 0.01 and runs["lora"].losses[task] > 0.2
        assert runs["cgc-lora"].losses[task] < 0.01
    worst = {method: max(run.losses.values()) for method, run in runs.items()}
    assert worst["cgc-lora"] < worst["moelora"] < worst["lora"]
    assert runs["cgc-lora"].trainable < runs["per-task-lora"].trainable


@pytest.mark.parametrize("seed", SEEDS)
def test_at_conflict_0_one_shared_lora_is_as_good_as_one_per_task(seed):
    runs = toy.train_all(toy.ToyConfig(conflict=0.0, seed=seed), ["lora", "per-task-lora"])
    for task in toy.TASKS:
        assert runs["lora"].losses[task] < runs["per-task-lora"].losses[task] + 0.005
        assert runs["lora"].losses[task] < 0.01


@pytest.mark.parametrize("seed", SEEDS)
def test_the_seesaw_front_trades_one_task_for_the_other(seed):
    config = toy.ToyConfig(conflict=0.75, seed=seed)
    front = toy.seesaw_front(config, (0.0, 0.25, 0.5, 0.75, 1.0))
    a, b = front["loss A"].to_numpy(), front["loss B"].to_numpy()
    assert (np.diff(a) < 0).all() and (np.diff(b) > 0).all()  # more weight on A: A better, B worse
    assert a[-1] < 0.01 and b[-1] > 1.0 and b[0] < 0.01 and a[0] > 1.0  # one task only: the other > no adapter
    assert front.loc[2, "loss A"] == toy.train(config, "lora").losses["A"]  # equal weights: the plain run


@pytest.mark.parametrize("seed", SEEDS)
def test_the_common_expert_holds_the_shared_part_when_the_ranks_force_it(seed):
    config = toy.ToyConfig(conflict=0.5, seed=seed)
    tasks = toy.make_tasks(config)
    alignment = toy.expert_alignment(toy.train(config, "cgc-lora", tasks), tasks)
    assert (alignment.xs("common1", level="expert")["cos with shared part"] > 0.99).all()
    assert alignment.loc[("A", "A/specific1"), "cos with A's own part"] > 0.99
    assert alignment.loc[("B", "B/specific1"), "cos with B's own part"] > 0.99
    run = toy.train(config, "cgc-lora", tasks)  # shares: sqrt(1 - c) / (sqrt(1 - c) + sqrt(c)) = 1/2
    assert torch.allclose(run.contributions.weights[0, :, 0], torch.tensor(0.5), atol=0.05)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_gate_30_times_faster_saturates_and_stalls(seed):
    config = toy.ToyConfig(seed=seed, gate_lr_scale=30.0)
    run = toy.train(config, "cgc-lora")
    assert run.gates.weights.max() > 0.99 and max(run.losses.values()) > 0.1
    assert max(toy.train(config, "cgc-frozen-gate").losses.values()) < 0.01  # the gate's rate is all


# --- the panel -----------------------------------------------------------------------------------

def test_the_panel_trains_at_the_start_and_draws_losses_gates_and_contributions():
    panel = widgets.ToyPanel(SMALL)
    (run,) = panel.runs
    assert run.method == "cgc-lora" and run.config == SMALL
    assert panel.status.value.startswith("run #1, cgc-lora: held-out loss A ")
    (fig,) = panel.figures
    loss_ax, gate_ax, share_ax = fig.axes
    assert loss_ax.get_ylim() == pytest.approx((1e-4, 3)) and len(loss_ax.get_lines()) == 3  # A, B, 1
    for ax, values, top in ((gate_ax, run.gates, 1.0), (share_ax, run.contributions, 1.0)):
        (image,) = ax.images
        assert (image.norm.vmin, image.norm.vmax) == (0, top)  # fixed, whatever the values
        shown = sorted(float(t.get_text()) for t in ax.texts)
        assert shown == sorted(round(v, 2) for v in values.weights[0][toy.usable_experts(run.layer)].tolist())
    for widget, key in ((panel, "toy_panel"), (panel.conflict_slider, "toy_conflict"),
                        (panel.train_button, "toy_train"), (panel.plot, "toy_plot")):
        assert widgets.CLASSES[key] in widget._dom_classes  # what a browser test finds


def test_changing_a_control_retrains_with_it_and_the_table_follows():
    panel = widgets.ToyPanel(SMALL)
    first = panel.figures[0]
    panel.conflict_slider.value = 0.0
    panel.common_slider.value = 2
    panel.method_dropdown.value = "moelora"
    panel.gate_lr_slider.value = 10.0
    assert len(panel.runs) == 5 and panel.figures[0] is not first
    assert plt.get_fignums() == []  # its figures are not pyplot's: nothing piles up or shows twice
    last = panel.runs[-1]
    assert last.method == "moelora"
    assert (last.config.conflict, last.config.n_common, last.config.gate_lr_scale) == (0.0, 2, pytest.approx(10.0))
    assert last.gates.weights.shape == (1, 2, 3)  # 3 shared experts of rank 2: the same active rank 6
    table = panel.run_table()
    assert list(table.index) == [1, 2, 3, 4, 5] and list(table["method"])[-2:] == ["moelora", "moelora"]
    assert table.loc[5, "loss A"] == last.losses["A"] and table.loc[2, "conflict"] == 0.0
    assert panel.status.value.startswith("run #5, moelora")
    panel.train_button.click()  # Retrain: the same configuration again, the same numbers
    assert len(panel.runs) == 6 and panel.runs[-1].losses == last.losses


def test_an_invalid_configuration_says_so_and_trains_nothing():
    panel = widgets.ToyPanel(SMALL, method="per-task-lora", auto=False)
    assert panel.runs == [] and panel.figures == []
    panel.common_slider.value, panel.specific_slider.value = 0, 0  # no training: auto is off
    assert panel.train() is None and panel.runs == []
    assert "Not a valid configuration" in panel.status.value
    panel.specific_slider.value = 1
    run = panel.train()
    assert run is not None and run.method == "per-task-lora" and run.gates.total == 1
    with pytest.raises(ValueError, match="unknown toy method"):
        widgets.ToyPanel(SMALL, method="nope")
