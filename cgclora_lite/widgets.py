"""Interactive panels for notebooks: they only wire ``viz`` and the 1+N framework together.

* ``GateExplorer``: dropdowns over clusters' gate weights (cluster, task, module kind, layer) and
  two heatmaps that follow them: task x expert for one layer (or the mean over layers), and
  layer x expert for one task; a toggle shows the experts' contribution shares instead.
* ``ExpertPanel``: sliders for the number of common and specific experts and their rank, the
  parameter count of that configuration (updated as a slider moves, computed from layer shapes by
  ``inject.count_parameters``), the training steps, the gate options and the number of seeds, and a
  Train button that trains fresh adapters of that configuration once per seed
  (``experiment.train_and_score``: ``OnePlusN`` + ``train`` + ``evaluate``), then draws their gate
  weights and the test score of every run so far with its 95% bootstrap interval (``stats``).
* ``ToyPanel``: the toy of notebook 02 (``toy``), retrained live in about a second whenever a control
  changes (conflict between the tasks, K_c, K_s, rank, steps, the gate's learning-rate scale, seed,
  method), with its per-task losses, gate weights and expert contribution shares on fixed ranges.

Core widgets only, so they work with ipywidgets 7.6+ (Colab ships 7.7) and 8. Every widget carries
a stable CSS class (``cgclora-...``, see ``CLASSES``) for browser tests. Callbacks draw into an
``Output`` widget and end with ``plt.show()`` (otherwise figures pile up in some front ends);
``ToyPanel``, which redraws at every slider move, displays a PNG it renders itself instead.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Sequence

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Image, display
from matplotlib.figure import Figure

from . import toy, viz
from .adapters import set_aside
from .cgc import GATE_NORMS, CGCConfig
from .experiment import train_and_score
from .inject import GateWeights, count_parameters, target_shapes
from .stats import Bootstrap, Interval
from .tasks import Task
from .train import TrainConfig

MEAN = "mean over layers"
"""The layer dropdown's first choice: the gate weights averaged over all layers shown."""
ALL_MODULES = "all modules"
"""The module dropdown's first choice: no filter on the kind of module."""
GATE_VIEW, CONTRIBUTION_VIEW = "gate weights", "contribution shares"
"""The explorer's two views: the gate weights w_t, or each expert's share of a task's update."""
GATE_LR_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0)
"""The expert panel's choices of the gate's learning-rate multiplier (``CGCConfig.gate_lr_scale``)."""
CLASSES = {
    "explorer": "cgclora-gate-explorer", "cluster": "cgclora-cluster", "task": "cgclora-task",
    "module": "cgclora-module", "layer": "cgclora-layer", "gate_plot": "cgclora-gate-plot",
    "panel": "cgclora-expert-panel", "common": "cgclora-common-experts",
    "specific": "cgclora-specific-experts", "rank": "cgclora-rank", "count": "cgclora-param-count",
    "train": "cgclora-train", "status": "cgclora-train-status", "panel_plot": "cgclora-panel-plot",
    "view": "cgclora-view", "steps": "cgclora-steps", "gate_norm": "cgclora-gate-norm",
    "gate_lr": "cgclora-gate-lr", "seeds": "cgclora-seeds",
    "toy_panel": "cgclora-toy-panel", "toy_method": "cgclora-toy-method", "toy_conflict": "cgclora-toy-conflict",
    "toy_common": "cgclora-toy-common", "toy_specific": "cgclora-toy-specific", "toy_rank": "cgclora-toy-rank",
    "toy_steps": "cgclora-toy-steps", "toy_gate_lr": "cgclora-toy-gate-lr", "toy_seed": "cgclora-toy-seed",
    "toy_train": "cgclora-toy-train", "toy_status": "cgclora-toy-status", "toy_plot": "cgclora-toy-plot",
}
"""CSS class of each widget (``widget.add_class``): how a browser test finds it on the page."""
_WIDE = {"description_width": "initial"}  # descriptions are not cut to the default width
_SLIDER_STYLE = {"description_width": "210px"}  # one width for all sliders, so their tracks align
_SLIDER_LAYOUT = {"width": "520px"}


def _tag(widget: W.DOMWidget, key: str) -> W.DOMWidget:
    widget.add_class(CLASSES[key])
    return widget


# --- one press of Train -------------------------------------------------------------------------

@dataclass
class PanelRun:
    """One press of an ``ExpertPanel``'s Train button: the configuration and what it gave.

    ``seeds``: the training seeds, one run each (the adapters' initial values and the batches).
    ``gates`` and ``contributions``: their mean over the seeds (None for an ungated configuration).
    ``scores``: task name -> headline test score, the mean over the seeds; ``intervals``: task name
    -> its 95% bootstrap interval over test examples and seeds (``stats.Bootstrap``).
    ``history``: the first seed's training log (one dict per step); ``trainable`` counts
    parameters; ``seconds`` is the training plus scoring time of every seed.
    """

    label: str
    config: CGCConfig
    gates: GateWeights | None
    scores: dict[str, float]
    history: list[dict]
    trainable: int
    seconds: float
    steps: int = 0
    seeds: tuple[int, ...] = (0,)
    intervals: dict[str, Interval] | None = None
    contributions: GateWeights | None = None


def mean_gates(runs: Sequence[GateWeights]) -> GateWeights:
    """The element-wise mean of several runs' ``GateWeights`` (same layers, tasks and experts)."""
    first = runs[0]
    weights = torch.stack([g.weights for g in runs]).mean(0)  # (layer, task, expert)
    return replace(first, weights=weights)


# --- the gate explorer -------------------------------------------------------------------------

class GateExplorer(W.VBox):
    """Dropdowns (cluster, task, module, layer) over gate weights, and two heatmaps that follow them.

    Args:
        gates: ``{cluster name: GateWeights}`` (e.g. ``adapters.gate_weights()`` of each cluster,
            or of one cluster before and after training), or a single ``GateWeights``.
        contributions: ``{cluster name: GateWeights}`` of contribution shares
            (``adapters.expert_contributions()``: each expert's share of a task's update,
            ``|s w_{t,e}| ||B_e A_e||_F`` over the task's sum) for some or all of the clusters. The
            ``view`` toggle switches between gate weights and contribution shares; a cluster
            without shares shows its gate weights, and its titles say so.

    The figures: ``viz.gate_heatmap`` (task x expert) of the chosen layer or the mean over the
    layers of the chosen module kind, and ``viz.layer_gate_heatmap`` (layer x expert) of the
    chosen task. ``figures`` holds the two last drawn; ``add`` adds a cluster and shows it. The
    module dropdown starts on every layer, or on the first kind of module if there are more than
    ``viz.MAX_ANNOTATED_ROWS`` layers.
    """

    def __init__(self, gates: Mapping[str, GateWeights] | GateWeights,
                 contributions: Mapping[str, GateWeights] | GateWeights | None = None):
        super().__init__()
        self.gates: dict[str, GateWeights] = (
            {"cluster": gates} if isinstance(gates, GateWeights) else dict(gates))
        if not self.gates:
            raise ValueError("GateExplorer needs the gate weights of at least one cluster")
        self.contributions: dict[str, GateWeights] = (
            {next(iter(self.gates)): contributions} if isinstance(contributions, GateWeights)
            else dict(contributions or {}))
        unknown = sorted(set(self.contributions) - set(self.gates))
        if unknown:
            raise ValueError(f"contributions of clusters {unknown} without gate weights: give "
                             f"both for the same cluster names ({list(self.gates)})")
        self.figures: list[plt.Figure] = []
        self._holding = False
        self.cluster_dropdown = _tag(W.Dropdown(options=list(self.gates), description="cluster",
                                                style=_WIDE), "cluster")
        self.task_dropdown = _tag(W.Dropdown(description="task", style=_WIDE), "task")
        self.module_dropdown = _tag(W.Dropdown(description="module", style=_WIDE), "module")
        self.layer_dropdown = _tag(W.Dropdown(description="layer", style=_WIDE), "layer")
        self.view_toggle = _tag(W.ToggleButtons(options=[GATE_VIEW, CONTRIBUTION_VIEW], value=GATE_VIEW,
                                                description="show", style=_WIDE), "view")
        self.plot = _tag(W.Output(), "gate_plot")
        self.children = [W.HBox([self.cluster_dropdown, self.task_dropdown]),
                         W.HBox([self.module_dropdown, self.layer_dropdown]), self.view_toggle, self.plot]
        _tag(self, "explorer")
        self.cluster_dropdown.observe(lambda _: self._holding or self._show_cluster(), names="value")
        self.module_dropdown.observe(lambda _: self._module_changed(), names="value")
        for dropdown in (self.task_dropdown, self.layer_dropdown, self.view_toggle):
            dropdown.observe(lambda _: self.draw(), names="value")
        self._show_cluster()

    @contextmanager
    def _hold(self) -> Iterator[None]:
        """Change several dropdowns without a redraw for each (nests)."""
        previous, self._holding = self._holding, True
        try:
            yield
        finally:
            self._holding = previous

    @staticmethod
    def _set(dropdown: W.Dropdown, options: list, keep) -> None:
        """Give ``dropdown`` new options, keeping its value if it is still one of them."""
        values = [o[1] if isinstance(o, tuple) else o for o in options]
        dropdown.options = options
        dropdown.value = keep if keep in values else values[0]

    def _layer_options(self) -> list[tuple[str, str]]:
        gates, module = self.current_gates, self._module()
        layers = [n for n in gates.layers if module is None or n.rsplit(".", 1)[-1] == module]
        return [(MEAN, MEAN)] + [(viz.short_layer_name(n), n) for n in layers]

    def _show_cluster(self) -> None:
        gates = self.current_gates
        modules = viz.module_names(gates)
        # the first choice: every layer if few, else the first kind of module (30 rows, not 210)
        first = ALL_MODULES if len(gates.layers) <= viz.MAX_ANNOTATED_ROWS else modules[0]
        with self._hold():
            self._set(self.task_dropdown, list(gates.tasks), self.task_dropdown.value)
            self._set(self.module_dropdown, [ALL_MODULES] + modules, self.module_dropdown.value or first)
            self._set(self.layer_dropdown, self._layer_options(), self.layer_dropdown.value)
        self.draw()

    def _module_changed(self) -> None:
        if self._holding:
            return
        with self._hold():
            self._set(self.layer_dropdown, self._layer_options(), self.layer_dropdown.value)
        self.draw()

    def _module(self) -> str | None:
        value = self.module_dropdown.value
        return None if value in (None, ALL_MODULES) else value

    @property
    def current_gates(self) -> GateWeights:
        return self.gates[self.cluster_dropdown.value]

    @property
    def shown(self) -> GateWeights:
        """What the heatmaps show: the current cluster's gate weights, or its contribution shares
        when the view asks for them and the cluster has them."""
        cluster = self.cluster_dropdown.value
        if self.view_toggle.value == CONTRIBUTION_VIEW and cluster in self.contributions:
            return self.contributions[cluster]
        return self.gates[cluster]

    def add(self, name: str, gates: GateWeights, contributions: GateWeights | None = None,
            show: bool = True) -> None:
        """Add (or replace) cluster ``name`` (and its contribution shares); with ``show``, select it."""
        self.gates[name] = gates
        if contributions is not None:
            self.contributions[name] = contributions
        else:
            self.contributions.pop(name, None)
        current = self.cluster_dropdown.value
        with self._hold():
            self.cluster_dropdown.options = list(self.gates)
            self.cluster_dropdown.value = name if show else current
        self._show_cluster()

    def draw(self) -> None:
        """Redraw both heatmaps for the current choices (into ``plot``; kept in ``figures``)."""
        if self._holding:
            return
        gates, module, layer = self.shown, self._module(), self.layer_dropdown.value
        cluster, task = self.cluster_dropdown.value, self.task_dropdown.value
        what = f"{gates.value}s"
        if self.view_toggle.value == CONTRIBUTION_VIEW and cluster not in self.contributions:
            what += " (no contribution shares recorded for this cluster)"
        if layer == MEAN:
            if module is None:
                by_task = gates
            else:  # the mean over this kind of module only
                keep = [i for i, n in enumerate(gates.layers) if n.rsplit(".", 1)[-1] == module]
                by_task = replace(gates, weights=gates.weights[keep], layers=[gates.layers[i] for i in keep])
            title = (f"{cluster}: {what}, mean over {len(by_task.layers)} "
                     f"{module + ' ' if module else ''}layers")
            layer_arg = None
        else:
            by_task, layer_arg = gates, layer
            title = f"{cluster}: {what} of layer {viz.short_layer_name(layer)}"
        self.plot.clear_output(wait=True)
        with self.plot:
            for figure in self.figures:
                plt.close(figure)
            self.figures = [
                viz.gate_heatmap(by_task, layer=layer_arg, title=title),
                viz.layer_gate_heatmap(gates, task, module,
                                       title=f"{cluster}: task {task!r}, {gates.value}s by layer"),
            ]
            plt.show()


# --- the expert panel --------------------------------------------------------------------------

class ExpertPanel(W.VBox):
    """Sliders for an expert configuration, its parameter count, and a button that trains it.

    Args:
        model, tokenizer: the central model (adapters it has attached are put aside while the
            panel trains, then put back) and its tokenizer.
        tasks: the cluster's tasks, with train and test examples.
        config: the starting configuration (default 2 common + 2 specific experts of rank 2).
            The sliders set ``n_common``, ``n_specific`` and one rank for every expert, the menus
            ``gate_norm`` and ``gate_lr_scale``; the rest (alpha, target modules...) stays as in
            ``config``.
        train_config, batch_size, max_length: the training budget of one press of Train (the
            steps slider starts at ``train_config.steps``; seed i of a press trains with
            ``train_config.seed + i``, and ``torch.manual_seed`` of it for the adapters' start).
        eval_limit: test examples per task scored after training (None: all).
        progress: show the training progress bar.
        explorer: a ``GateExplorer`` to which each run's gates and contribution shares are added.
        max_experts, max_rank, max_steps, max_seeds: the sliders' upper ends (``max_steps``
            defaults to four times the starting steps, at least 64).

    ``runs`` lists every ``PanelRun``; ``counts`` is the current configuration's
    ``inject.count_parameters``; ``figures`` holds the last figures drawn.
    """

    def __init__(self, model, tokenizer, tasks: Sequence[Task], config: CGCConfig | None = None, *,
                 train_config: TrainConfig | None = None, batch_size: int = 8, max_length: int = 80,
                 eval_limit: int | None = None, progress: bool = True,
                 explorer: GateExplorer | None = None, max_experts: int = 4, max_rank: int = 16,
                 max_steps: int | None = None, max_seeds: int = 3):
        super().__init__()
        config = config or CGCConfig(n_common=2, n_specific=2, rank_common=2, rank_specific=2)
        self.model, self.tokenizer, self.tasks = model, tokenizer, list(tasks)
        self.base_config = config
        self.train_config = train_config or TrainConfig(steps=16, lr=2e-3)
        self.batch_size, self.max_length, self.eval_limit = batch_size, max_length, eval_limit
        self.progress, self.explorer = progress, explorer
        self.runs: list[PanelRun] = []
        self.figures: list[plt.Figure] = []
        self.counts: dict[str, int] | None = None
        with set_aside(model):
            self.shapes = target_shapes(model, config)  # {name: (d_out, d_in)}
        rank = (config.common_ranks or config.specific_ranks)[0]

        def slider(value: int, low: int, high: int, description: str, key: str) -> W.IntSlider:
            return _tag(W.IntSlider(value=value, min=low, max=max(high, value), description=description,
                                    style=_SLIDER_STYLE, layout=W.Layout(**_SLIDER_LAYOUT),
                                    continuous_update=True), key)

        self.common_slider = slider(config.n_common, 0, max_experts, "common experts (K_c)", "common")
        self.specific_slider = slider(config.n_specific, 0, max_experts, "specific experts per task (K_s)",
                                      "specific")
        self.rank_slider = slider(rank, 1, max_rank, "rank of each expert (r)", "rank")
        steps = self.train_config.steps
        self.steps_slider = slider(steps, 1, max_steps or max(64, 4 * steps), "training steps", "steps")
        self.gate_norm_dropdown = _tag(W.Dropdown(options=list(GATE_NORMS), value=config.gate_norm,
                                                  description="gate normalisation", style=_SLIDER_STYLE),
                                       "gate_norm")
        scales = sorted({*GATE_LR_SCALES, float(config.gate_lr_scale)})
        self.gate_lr_dropdown = _tag(W.Dropdown(options=[(f"{x:g}x", x) for x in scales],
                                                value=float(config.gate_lr_scale),
                                                description="gate learning rate", style=_SLIDER_STYLE),
                                     "gate_lr")
        self.seeds_slider = slider(1, 1, max_seeds, "seeds (one training run each)", "seeds")
        self.count_label = _tag(W.HTML(), "count")
        self.train_button = _tag(W.Button(description="Train", button_style="primary", icon="play",
                                          tooltip="train fresh adapters with this configuration"),
                                 "train")
        self.status = _tag(W.HTML("Press <b>Train</b> to train this configuration "
                                  f"(batches of {batch_size} examples)."), "status")
        self.plot = _tag(W.Output(), "panel_plot")
        self.children = [self.common_slider, self.specific_slider, self.rank_slider, self.count_label,
                         self.steps_slider, self.gate_norm_dropdown, self.gate_lr_dropdown, self.seeds_slider,
                         W.HBox([self.train_button, self.status]), self.plot]
        _tag(self, "panel")
        for s in (self.common_slider, self.specific_slider, self.rank_slider):
            s.observe(lambda _: self.update_count(), names="value")
        self.train_button.on_click(lambda _: self.train())
        self.update_count()

    @property
    def config(self) -> CGCConfig:
        """The configuration the sliders describe (raises ValueError if it has no expert)."""
        rank = self.rank_slider.value
        return replace(self.base_config, n_common=self.common_slider.value,
                       n_specific=self.specific_slider.value, rank_common=rank, rank_specific=rank,
                       gate_norm=self.gate_norm_dropdown.value,
                       gate_lr_scale=float(self.gate_lr_dropdown.value))

    def update_count(self) -> None:
        """Recompute the parameter count of the sliders' configuration (no model is built)."""
        try:
            config = self.config
        except ValueError as error:  # e.g. no expert at all
            self.counts = None
            self.count_label.value = f"<span style='color:#b00020'>Not a valid configuration: {error}</span>"
            self.train_button.disabled = True
            return
        self.counts = c = count_parameters(self.shapes, config, len(self.tasks))
        self.count_label.value = (
            f"<b>{c['trainable']:,}</b> trainable parameters ({config.method}, {c['adapted_layers']} "
            f"layers, {len(self.tasks)} tasks): active rank {c['active_rank']}, "
            f"{c['per_task']:,} per task as a plain LoRA, gates {c['gate']:,}")
        self.train_button.disabled = False

    def train(self) -> PanelRun | None:
        """Train the controls' configuration once per seed (what the Train button does); draw and
        return the run.

        Returns None if training failed: in a notebook the traceback shows in the panel.
        """
        config, steps = self.config, self.steps_slider.value
        seeds = tuple(self.train_config.seed + i for i in range(self.seeds_slider.value))
        label = (f"#{len(self.runs) + 1} {config.n_common}c+{config.n_specific}s "
                 f"r{self.rank_slider.value}")
        self.train_button.disabled = True
        result = None
        try:
            self.plot.clear_output(wait=True)
            with self.plot:  # the progress bar, or a traceback, goes here
                runs = []
                for seed in seeds:
                    self.status.value = f"Training {label}, seed {seed} ({len(runs) + 1} of {len(seeds)})..."
                    torch.manual_seed(seed)  # the adapters' initial values
                    runs.append(train_and_score(
                        self.model, self.tokenizer, {"panel": self.tasks}, config,
                        replace(self.train_config, steps=steps, seed=seed), self.batch_size,
                        self.max_length, eval_limit=self.eval_limit, progress=self.progress))
                result = self._summarise(label, config, steps, seeds, runs)
        finally:
            self.train_button.disabled = False
        if result is None:
            self.status.value = f"{label} failed: see the error below."
            return None
        self.runs.append(result)
        if self.explorer is not None and result.gates is not None:
            self.explorer.add(f"panel {label}", result.gates, result.contributions)
        self.draw()
        scores = ", ".join(f"{t} {result.intervals[t]:.2f}" for t in result.scores)
        self.status.value = (f"{label}: {steps} steps x {len(seeds)} seed(s) in {result.seconds:.0f} s; "
                             f"test scores {scores}")  # last: says that everything is drawn
        return result

    @staticmethod
    def _summarise(label: str, config: CGCConfig, steps: int, seeds: tuple[int, ...],
                   runs: list[dict]) -> PanelRun:
        """One ``PanelRun`` from the ``train_and_score`` results of each seed."""
        tasks = list(runs[0]["scores"])
        per_example = {t: [run["scores"][t]["per_example"] for run in runs] for t in tasks}  # (S, N)
        bootstrap = Bootstrap({t: len(values[0]) for t, values in per_example.items()}, len(seeds))
        gated = [run["gates"]["panel"] for run in runs if "panel" in run["gates"]]
        shares = [run["contributions"]["panel"] for run in runs if "panel" in run["contributions"]]
        return PanelRun(
            label, config, mean_gates(gated) if gated else None,
            {t: sum(run["scores"][t]["score"] for run in runs) / len(runs) for t in tasks},
            runs[0]["history"]["panel"], runs[0]["trainable_parameters"],
            sum(run["train_seconds"] + run["eval_seconds"] for run in runs), steps, seeds,
            {t: bootstrap.score(t, values) for t, values in per_example.items()},
            mean_gates(shares) if shares else None)

    def score_table(self) -> pd.DataFrame:
        """One row per run: its configuration and budget, trainable parameters, seconds, and each
        task's score (the mean over seeds) with its 95% interval."""
        return pd.DataFrame([{"run": r.label, "method": r.config.method, "gate": r.config.gate_norm,
                              "gate lr x": r.config.gate_lr_scale, "steps": r.steps, "seeds": len(r.seeds),
                              "trainable": r.trainable, "seconds": round(r.seconds, 1), **r.scores,
                              **{f"{t} 95% interval": f"[{i.low:.2f}, {i.high:.2f}]"
                                 for t, i in (r.intervals or {}).items()}}
                             for r in self.runs]).set_index("run")

    def draw(self) -> None:
        """Draw the last run's gate weights and every run's test scores (into ``plot``)."""
        if not self.runs:
            return
        last = self.runs[-1]
        scores = pd.DataFrame([{"task": t, "method": r.label, "score": s,
                                "low": r.intervals[t].low, "high": r.intervals[t].high}
                               for r in self.runs for t, s in r.scores.items()])
        self.plot.clear_output(wait=True)
        with self.plot:
            for figure in self.figures:
                plt.close(figure)
            self.figures = []  # in the order plt.show() draws them (creation order)
            if last.gates is not None:
                self.figures.append(viz.gate_heatmap(
                    last.gates, title=f"{last.label}: gate weights (mean over layers)"))
            self.figures.append(viz.score_bars(scores, title="Test score per task and run (95% intervals)"))
            plt.show()
            display(self.score_table())


# --- the toy panel -----------------------------------------------------------------------------

class ToyPanel(W.VBox):
    """The toy of notebook 02, retrained live: controls for a ``toy.ToyConfig`` and a method.

    Args:
        config: the starting configuration (default ``toy.ToyConfig()``); the controls set
            ``conflict``, ``n_common``, ``n_specific``, ``rank``, ``steps``, ``gate_lr_scale`` and
            ``seed``, the rest stays as given.
        method: the starting method, one of ``toy.METHODS``.
        auto: retrain whenever a control changes (sliders act when released) and once at the start;
            without it, only the Retrain button trains.

    Each run (``toy.train``, about a second at the default configuration) draws one figure of three
    panels: the held-out loss of each task while training (log scale, fixed range, 1 = no adapter),
    the gate weights and the experts' contribution shares (task x expert, colours fixed from 0 to
    what a row sums to). ``runs`` lists every ``toy.ToyRun``; ``run_table()`` compares them (the
    last ones are shown under the figure); ``figures`` holds the figure last drawn. A change takes
    the run's time (0.5-0.9 s at the default configuration) plus about 0.5 s to draw (one thread
    of a busy 2-core CPU, 2026-12-02).
    """

    SHOWN_RUNS = 8
    """Rows of the run table shown under the figure (the latest runs)."""

    def __init__(self, config: toy.ToyConfig | None = None, method: str = "cgc-lora", *, auto: bool = True,
                 max_experts: int = 3, max_rank: int = 4, max_steps: int = 600):
        super().__init__()
        config = config or toy.ToyConfig()
        if method not in toy.METHODS:
            raise ValueError(f"unknown toy method {method!r}; choose from {toy.METHODS}")
        self.base_config, self.auto = config, auto
        self.runs: list[toy.ToyRun] = []
        self.figures: list[plt.Figure] = []
        layout = W.Layout(**_SLIDER_LAYOUT)

        def int_slider(value: int, low: int, high: int, description: str, key: str, step: int = 1):
            return _tag(W.IntSlider(value=value, min=low, max=max(high, value), step=step,
                                    description=description, style=_SLIDER_STYLE, layout=layout,
                                    continuous_update=False), key)

        self.method_dropdown = _tag(W.Dropdown(options=list(toy.METHODS), value=method, description="method",
                                               style=_SLIDER_STYLE, layout=layout), "toy_method")
        self.conflict_slider = _tag(W.FloatSlider(value=config.conflict, min=0.0, max=1.0, step=0.05,
                                                  description="conflict between the tasks (c)",
                                                  style=_SLIDER_STYLE, layout=layout,
                                                  continuous_update=False), "toy_conflict")
        self.common_slider = int_slider(config.n_common, 0, max_experts, "common experts (K_c)", "toy_common")
        self.specific_slider = int_slider(config.n_specific, 0, max_experts, "own experts per task (K_s)",
                                          "toy_specific")
        self.rank_slider = int_slider(config.rank, 1, max_rank, "rank of each expert (r)", "toy_rank")
        self.steps_slider = int_slider(config.steps, 20, max_steps, "training steps", "toy_steps", step=20)
        self.gate_lr_slider = _tag(W.FloatLogSlider(value=config.gate_lr_scale, base=10, min=-1, max=2,
                                                    step=0.25, description="gate learning rate x",
                                                    readout_format=".3g", style=_SLIDER_STYLE,
                                                    layout=layout, continuous_update=False), "toy_gate_lr")
        self.seed_slider = int_slider(config.seed, 0, 9, "seed", "toy_seed")
        self.train_button = _tag(W.Button(description="Retrain", icon="refresh",
                                          tooltip="train this configuration again"), "toy_train")
        self.status = _tag(W.HTML("Change a control (or press <b>Retrain</b>) to train the toy."),
                           "toy_status")
        self.plot = _tag(W.Output(), "toy_plot")
        self.controls = [self.method_dropdown, self.conflict_slider, self.common_slider,
                         self.specific_slider, self.rank_slider, self.steps_slider, self.gate_lr_slider,
                         self.seed_slider]
        self.children = [*self.controls, W.HBox([self.train_button, self.status]), self.plot]
        _tag(self, "toy_panel")
        for control in self.controls:
            control.observe(lambda _: self.auto and self.train(), names="value")
        self.train_button.on_click(lambda _: self.train())
        if auto:
            self.train()

    @property
    def method(self) -> str:
        return self.method_dropdown.value

    @property
    def config(self) -> toy.ToyConfig:
        """The configuration the controls describe (raises ValueError if it has no expert)."""
        return replace(self.base_config, conflict=round(self.conflict_slider.value, 4),
                       n_common=self.common_slider.value, n_specific=self.specific_slider.value,
                       rank=self.rank_slider.value, steps=self.steps_slider.value,
                       gate_lr_scale=float(self.gate_lr_slider.value), seed=self.seed_slider.value)

    def train(self) -> toy.ToyRun | None:
        """Train the controls' configuration and method, draw it and return the run (None if the
        configuration is not valid: the status says why)."""
        try:
            config = self.config
        except ValueError as error:
            self.status.value = f"<span style='color:#b00020'>Not a valid configuration: {error}</span>"
            return None
        self.train_button.disabled = True
        self.status.value = f"Training {self.method}..."
        try:
            run = toy.train(config, self.method)
        finally:
            self.train_button.disabled = False
        self.runs.append(run)
        self.draw()
        losses = ", ".join(f"{task} {loss:.3g}" for task, loss in run.losses.items())
        self.status.value = (f"run #{len(self.runs)}, {run.method}: held-out loss {losses}; "
                             f"{run.trainable:,} parameters, {config.steps} steps in {run.seconds:.1f} s")
        return run

    def run_table(self) -> pd.DataFrame:
        """One row per run: its method, the settings the controls change, final losses, size, time."""
        return pd.DataFrame([
            {"run": i + 1, "method": r.method, "conflict": r.config.conflict, "K_c": r.config.n_common,
             "K_s": r.config.n_specific, "rank": r.config.rank, "steps": r.config.steps,
             "gate lr x": r.config.gate_lr_scale, "seed": r.config.seed,
             **{f"loss {task}": loss for task, loss in r.losses.items()},
             "parameters": r.trainable, "seconds": round(r.seconds, 2)}
            for i, r in enumerate(self.runs)]).set_index("run")

    def draw(self) -> None:
        """Draw the last run (losses, gate weights, contribution shares) and the run table.

        The figure goes in as a PNG rendered here (``toy_figure`` is not a pyplot figure): half
        the time of ``plt.show()``, whose inline backend renders twice for a tight bounding box.
        """
        if not self.runs:
            return
        self.figures = [toy_figure(self.runs[-1])]
        png = io.BytesIO()
        self.figures[0].savefig(png, format="png", dpi=90)
        self.plot.clear_output(wait=True)
        with self.plot:
            display(Image(png.getvalue()))
            display(self.run_table().tail(self.SHOWN_RUNS).round(4))


def toy_figure(run: toy.ToyRun) -> plt.Figure:
    """One toy run in three panels: held-out loss per task against the step (log scale, 1e-4 to 3),
    then the gate weights and the contribution shares (task x expert; blank: an expert the task
    may not use; colours from 0 to what a task's row sums to).

    A ``matplotlib.figure.Figure`` that pyplot does not manage (so nothing shows or keeps it unless
    asked), drawn with ``imshow`` and margins fixed in inches: every slider move redraws, and this
    renders once, in about half the time of seaborn's heatmaps with ``tight_layout`` shown by
    ``plt.show()`` (whose inline backend renders twice, for a tight bounding box).
    """
    experts = len(run.gates.experts)
    width = max(2.4, 0.9 + 0.6 * experts)  # inches per heatmap
    fig_width, fig_height = 6.8 + 2 * width, 3.5
    fig = Figure(figsize=(fig_width, fig_height))
    axes = fig.subplots(1, 3, width_ratios=[4.6, width, width])
    fig.subplots_adjust(left=0.85 / fig_width, right=1 - 0.1 / fig_width, bottom=1.0 / fig_height,
                        top=1 - 0.35 / fig_height, wspace=0.3)  # margins in inches: no layout pass
    ax = axes[0]
    for task, curve in run.curves.groupby("task"):
        ax.plot(curve["step"], curve["loss"], label=f"task {task}")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.text(0.98, 1.15, "no adapter", color="grey", fontsize=8, ha="right", transform=ax.get_yaxis_transform())
    ax.set(yscale="log", ylim=(1e-4, 3), xlabel="training step", ylabel="held-out loss / frozen layer's",
           title=f"{run.method}, conflict {run.config.conflict:g}")
    ax.legend(fontsize=8, loc="lower left")
    usable = toy.usable_experts(run.layer).numpy()  # (task, expert)
    for ax, values in zip(axes[1:], (run.gates, run.contributions)):
        weights = values.weights[0].numpy()  # (task, expert)
        image = ax.imshow(np.ma.masked_array(weights, ~usable), cmap="viridis", vmin=0, vmax=values.total,
                          aspect="auto")
        for (t, e), value in np.ndenumerate(weights):
            if usable[t, e]:
                light = image.norm(value) < 0.6  # white text on the dark end of viridis
                ax.text(e, t, f"{value:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if light else "black")
        ax.set_xticks(range(experts), values.experts, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(values.tasks)), values.tasks)
        ax.set_title(f"{values.value}s (0 to {values.total:g})", fontsize=10)
        ax.grid(False)  # a whitegrid style would draw lines over the blank cells
        ax.set_facecolor("white")
    return fig
