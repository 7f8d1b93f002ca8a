"""The study: what CGC-LoRA's parts do on the real model, with seeds and intervals.

    python -m cgclora_lite study --groups gate --seeds 0 --out results/gate     # one group
    python -m cgclora_lite study                                                 # everything

Every *arm* trains one configuration from fresh adapters, once per seed, under the experiment's
budget rule (``experiment.cluster_batches``: every adapter set the same steps, every task the same
examples), and records its per-task validation loss (teacher-forced, recorded while training)
and its test scores. The groups:

* ``methods``: lora, per-task-lora, moelora, cgc-1+1, cgc-1+n, modula-flan, modula-res, and
  cgc-1+n on two clusters found from the data (``affinity``: gradient cosines on the training
  split, average linkage) instead of the prior ones;
* ``gate``: cgc-1+n with ``gate_norm`` softmax / scaled x ``gate_lr_scale`` 1 / 10 / 100, and the
  gate off (every expert weight 1). **The defaults are chosen here, on validation loss**;
* ``split``: cgc-1+n with the four rank-2 experts split 1/3, 2/2, 3/1 (K_c/K_s) and 4/0 (MOELoRA's
  shape in two clusters), at equal r_active;
* ``budget``: lora, per-task-lora and cgc-1+n at half and twice the preset's steps;
* ``capacity``: the same at r_active 2, 4 and 16 (interference grows as capacity shrinks;
  ``capacity_arm``);
* ``control``: a positive control, sentiment and a copy of it whose negative and positive answers
  are swapped (same inputs, same instruction), in one cluster: a shared adapter must seesaw there.

The arms that read the default clusters take them from ``tasks.DEFAULT_CLUSTERS``. An arm that
trains what an arm already measured trains (the gate group's ``softmax x10`` is the preset's own
gate, so the methods group's cgc-1+n) reuses its runs (``setting``) and says so. Results: one
JSON file (every arm, seed, task: validation loss, test score, per-example scores, seconds) and
a Markdown report of tables with 95% bootstrap intervals (``stats``), which ``report`` rebuilds
from the JSON alone: per group, each arm's scores and its paired change against a reference arm
(``reference_arm``), and, when the study holds their arms, the components of cgc-1+n's change
against per-task LoRA (``COMPONENTS``: sharing, structure, the gate) and the key methods each at
the active rank it would choose on validation (``rank_choice``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .cgc import CGCConfig
from .experiment import (
    METHODS,
    Preset,
    autocast_name,
    cluster_batches,
    load_tasks,
    method_clusters,
    run_method,
    train_and_score,
    train_config,
)
from .stats import Bootstrap, Interval
from .tasks import Example, Task

GROUPS = ("methods", "gate", "split", "budget", "capacity", "control")
KEY_METHODS = ("lora", "per-task-lora", "cgc-1+n")


@dataclass(frozen=True)
class Arm:
    """One configuration of the study: a ``method`` of ``experiment.METHODS`` (run by
    ``run_method``), or a CGC-LoRA ``config`` (``CGCConfig`` keyword arguments) trained on
    ``clusters`` ("prior": the tasks' own clusters; "one": all tasks in one; "affinity": two
    clusters found by ``affinity.task_affinity`` and ``affinity.cluster_tasks`` on the training
    split at the arm's seed), with ``preset`` overrides (``steps``, ``r_active``, ``gate_norm``...)."""

    group: str
    name: str
    method: str | None = None
    config: dict = field(default_factory=dict)
    clusters: str = "prior"
    preset: dict = field(default_factory=dict)
    tasks: str = "default"  # or "control": sentiment and its flipped copy


def arms(groups: Sequence[str], preset: Preset) -> list[Arm]:
    """The arms of ``groups``, in order."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown study groups {unknown}; choose from {list(GROUPS)}")
    plan: list[Arm] = []
    rank = preset.r_active // 4
    for group in groups:
        if group == "methods":
            plan += [Arm(group, m, method=m) for m in METHODS]
            plan.append(Arm(group, "cgc-1+n, clusters by affinity", clusters="affinity",
                            config=dict(n_common=2, n_specific=2, rank_common=rank, rank_specific=rank)))
        elif group == "gate":
            plan += [Arm(group, f"{norm} x{scale:g}", method="cgc-1+n",
                         preset={"gate_norm": norm, "gate_lr_scale": scale})
                     for norm in ("softmax", "scaled") for scale in (1.0, 10.0, 100.0)]
            plan.append(Arm(group, "gate off", config=dict(n_common=2, n_specific=2, rank_common=rank,
                                                           rank_specific=rank, gate="none")))
        elif group == "split":
            plan += [Arm(group, f"K_c={c}, K_s={4 - c}",
                         config=dict(n_common=c, n_specific=4 - c, rank_common=rank, rank_specific=rank))
                     for c in (1, 2, 3, 4)]
        elif group == "budget":
            plan += [Arm(group, f"{m}, {steps} steps", method=m, preset={"steps": steps})
                     for steps in (preset.steps // 2, preset.steps * 2) for m in KEY_METHODS]
        elif group == "capacity":
            plan += [capacity_arm(m, r) for r in (2, 4, 16) for m in KEY_METHODS]
        elif group == "control":
            plan += [Arm(group, m, method=m, tasks="control") for m in ("lora", "per-task-lora", "cgc-1+1")]
    return plan


def capacity_arm(method: str, r_active: int) -> Arm:
    """``method`` at active rank ``r_active`` (alpha 2 r_active, the preset's scale 2). cgc-1+n's
    four experts of rank r_active / 4 do not exist below r_active 4; there it takes one common and
    one specific expert of rank r_active / 2, the same r_active and the same gate."""
    preset = {"r_active": r_active, "alpha": 2.0 * r_active}
    name = f"{method}, r_active {r_active}"
    if method == "cgc-1+n" and r_active % 4:
        half = r_active // 2
        return Arm("capacity", name, config=dict(n_common=1, n_specific=1, rank_common=half,
                                                 rank_specific=half), preset=preset)
    return Arm("capacity", name, method=method, preset=preset)


def flipped(task: Task) -> Task:
    """A copy of a sentiment task whose ``negative`` and ``positive`` answers are swapped."""
    swap = {"negative": "positive", "positive": "negative"}

    def flip(examples: list[Example]) -> list[Example]:
        return [Example(e.input, swap.get(e.target, e.target), "flipped") for e in examples]

    return Task(name="flipped", cluster=task.cluster, instruction=task.instruction, metric=task.metric,
                labels=task.labels, train=flip(task.train), validation=flip(task.validation),
                test=flip(task.test))


def run_arm(arm: Arm, model, tokenizer, preset: Preset, seed: int, progress: bool = False) -> dict:
    """Train and score one arm at one seed; returns ``run_method``'s result plus the final
    per-task validation loss (``val_loss``)."""
    preset = replace(preset, seed=seed, **arm.preset)
    if arm.tasks == "control":
        (sentiment,) = load_tasks(preset, ["sentiment"])
        tasks = [sentiment, flipped(sentiment)]
    else:
        tasks = load_tasks(preset)
    if arm.method is not None:
        result = run_method(arm.method, model, tokenizer, tasks, preset, progress)
    else:
        import torch

        if arm.clusters == "affinity":
            clusters = affinity_clusters(model, tokenizer, tasks, preset, seed)
        else:
            clusters = method_clusters("cgc-1+n" if arm.clusters == "prior" else "lora", tasks)
        torch.manual_seed(seed)
        config = CGCConfig(alpha=preset.alpha, gate_norm=preset.gate_norm,
                           gate_lr_scale=preset.gate_lr_scale, **arm.config)
        result = train_and_score(model, tokenizer, clusters, config, train_config(preset),
                                 cluster_batches(preset.batch_size, clusters), preset.max_length,
                                 progress=progress)
    result["val_loss"] = final_validation_loss(result["history"])
    return result


def affinity_clusters(model, tokenizer, tasks: Sequence[Task], preset: Preset, seed: int,
                      n_clusters: int = 2) -> dict[str, list[Task]]:
    """``n_clusters`` clusters of ``tasks`` found from the training data: gradient affinity on two
    batches of 8 training examples per task (notebook 03's measurement), average linkage."""
    from .affinity import cluster_tasks, task_affinity

    affinity = task_affinity(model, tokenizer, tasks, method="gradient", batch_size=8, batches=2,
                             max_length=preset.max_length, seed=seed)
    by_name = {t.name: t for t in tasks}
    return {name: [by_name[n] for n in members]
            for name, members in cluster_tasks(affinity, n_clusters).items()}


def setting(arm: dict, preset: Preset) -> tuple:
    """What an arm (``asdict(Arm)`` or an arm of the JSON) trains, without its group and name: the
    method or CGC config, the clusters, the tasks and the preset with the arm's overrides. Two arms
    of one setting train the same adapters at every seed (training is seeded and deterministic on
    one kind of machine: docs/results.json's softmax x10 and gate off at seed 0 and
    docs/results-3seeds.json's cgc-1+n and gate off, run by other processes at other commits, have
    the same validation losses to the last digit and the same per-example test scores), so
    ``run_study`` runs a setting once and reuses its runs."""
    return (arm["method"], arm["config"], arm["clusters"], arm["tasks"],
            asdict(replace(preset, **arm["preset"])))


def final_validation_loss(histories: dict[str, list[dict]]) -> dict[str, float]:
    """``{task: validation loss}`` at the last validation step of each cluster (or stage)."""
    losses: dict[str, float] = {}
    for log in histories.values():
        recorded = [r for r in log if "val_loss_by_task" in r]
        if recorded:
            losses.update(recorded[-1]["val_loss_by_task"])
    return losses


def check(preset: Preset, groups: Sequence[str], seeds: Sequence[int], out: str | Path,
          only: Sequence[str] | None = None) -> tuple[list[Arm], dict | None]:
    """What ``run_study`` will do, checked before any work: the arms to run (``only``: the arms of
    those names in every group given, in that order) and the saved study it resumes (None when
    ``<out>.json`` does not exist).
    ValueError for a preset without validation, unknown groups or arms, or a saved study with
    another preset or other seeds (never overwritten)."""
    if not preset.validation or not preset.eval_every:
        raise ValueError("the study selects on validation loss: use a preset with validation "
                         "examples and eval_every > 0")
    plan = arms(groups, preset)
    if only is not None:  # a name may stand in several groups (lora in methods and control): all of them
        names = list(dict.fromkeys(a.name for a in plan))
        missing = [name for name in only if name not in names]
        if missing:
            raise ValueError(f"no arms {missing} in groups {list(groups)}; arms: {names}")
        plan = [a for name in dict.fromkeys(only) for a in plan if a.name == name]
    previous = Path(out).with_suffix(".json")
    saved = json.loads(previous.read_text()) if previous.is_file() else None
    if saved is not None and (saved["preset"] != asdict(preset) or saved["seeds"] != list(seeds)):
        current = asdict(preset)
        differ = {k: v for k, v in saved["preset"].items() if current.get(k) != v}
        raise ValueError(f"{previous} holds a study with another preset or other seeds (seeds "
                         f"{saved['seeds']}, preset {saved['preset'].get('name')!r} with {differ} where "
                         "this one differs); it is resumed only with the same ones. Pass another --out to "
                         "start a new study, or move that file away.")
    return plan, saved


def run_study(preset: Preset, groups: Sequence[str] = GROUPS, seeds: Sequence[int] = (0, 1, 2),
              out: str | Path = "results/study", progress: bool = False, model_name: str | None = None,
              only: Sequence[str] | None = None) -> dict:
    """Run the arms of ``groups`` (``only``: the arms of those names, see ``check``) at every seed;
    write ``<out>.json`` and ``<out>.md`` after every arm, so a long study can be stopped and read.

    A study is resumable: when ``<out>.json`` exists with the same preset and seeds, its arms, its
    note and the earlier processes' provenance are kept, those arms are not run again, and the new
    arms are appended. An arm whose ``setting`` the study already measured under another name
    reuses those runs (``same_as`` in the JSON). A file with another preset or other seeds is
    never overwritten: ValueError, before the model loads. Returns the JSON dict.
    """
    from .models import load_model
    from .provenance import provenance

    plan, saved = check(preset, groups, seeds, out, only)
    out = Path(out)
    model, tokenizer = load_model(model_name if model_name is not None else preset.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    study = {"provenance": provenance(model, seeds=list(seeds), autocast=autocast_name(model, preset)),
             "preset": asdict(preset),
             "seeds": list(seeds), "arms": []}
    loaded_commit = study["provenance"]["git_commit"]
    if saved is not None:  # resume: keep what was measured
        study["arms"] = saved["arms"]
        study["earlier_seconds"] = saved.get("total_seconds", 0) + saved.get("earlier_seconds", 0)
        # the processes that measured the kept arms, and the note on how they ran
        study["earlier_provenance"] = saved.get("earlier_provenance", []) + [saved["provenance"]]
        if saved.get("note"):
            study["note"] = saved["note"]
    done = {(a["group"], a["name"]) for a in study["arms"]}
    start = time.perf_counter()
    for arm in plan:
        if (arm.group, arm.name) in done:
            continue
        mine = setting(asdict(arm), preset)
        same = next((a for a in study["arms"] if setting(a, preset) == mine), None)
        if same is not None:  # e.g. the gate group's "softmax x10" is the methods group's cgc-1+n
            print(f"== study: {arm.group} / {arm.name} trains what {same['group']} / {same['name']} "
                  "trained: its runs are reused", flush=True)
            study["arms"].append({**asdict(arm), "runs": same["runs"],
                                  "same_as": [same["group"], same["name"]],
                                  "git_commit": same["git_commit"], "date": same["date"]})
            _save(study, out, start)
            continue
        runs = []
        for seed in seeds:
            print(f"== study: {arm.group} / {arm.name}, seed {seed}", flush=True)
            result = run_arm(arm, model, tokenizer, preset, seed, progress)
            runs.append({
                "seed": seed, "val_loss": result["val_loss"],
                "scores": {t: {"score": s["score"], "per_example": s["per_example"]}
                           for t, s in result["scores"].items()},
                "trainable_parameters": result["trainable_parameters"],
                "train_seconds": result["train_seconds"], "seconds_per_step": result["seconds_per_step"],
                "eval_seconds": result["eval_seconds"], "clusters": result.get("clusters"),
                "gates": {c: g.weights.mean(0).tolist() for c, g in result.get("gates", {}).items()},
                "contributions": {c: g.weights.mean(0).tolist()
                                  for c, g in result.get("contributions", {}).items()},
            })
        # the code that ran is the code this process loaded: the commit when it started (a
        # commit made while a long study runs does not change what it runs)
        study["arms"].append({**asdict(arm), "runs": runs, "git_commit": loaded_commit,
                              "date": provenance(model)["date"]})
        _save(study, out, start)
    _save(study, out, start)
    return study


def _save(study: dict, out: Path, start: float) -> None:
    """Write ``<out>.json`` and its report ``<out>.md``."""
    study["total_seconds"] = time.perf_counter() - start
    out.with_suffix(".json").write_text(json.dumps(study, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(study))


def _per_example(arm: dict, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """``{task: (seeds, examples) per-example test scores}`` of one arm of the JSON, in the order
    of ``tasks`` (the order sets the bootstrap's draws for each task)."""
    return {t: np.array([r["scores"][t]["per_example"] for r in arm["runs"]]) for t in tasks}


def _table(arms_of_group: list[dict], boot_for) -> list[str]:
    """Markdown rows: arm, validation loss per task (mean over seeds), test score per task and its
    average with 95% intervals."""
    tasks = list(arms_of_group[0]["runs"][0]["scores"])
    head = (["arm"] + [f"val loss {t}" for t in tasks] + ["val loss mean"]
            + [f"test {t}" for t in tasks] + ["test average", "s/step"])
    rows = []
    for arm in arms_of_group:
        runs = arm["runs"]
        values = _per_example(arm, tasks)
        boot = boot_for(values, len(runs))
        val = [np.mean([r["val_loss"].get(t, np.nan) for r in runs]) for t in tasks]
        name = arm["name"] + (" (= {} / {})".format(*arm["same_as"]) if arm.get("same_as") else "")
        cells = [name] + [f"{v:.3f}" for v in val] + [f"{np.nanmean(val):.3f}"]
        cells += [f"{boot.score(t, values[t]):.3f}" for t in tasks] + [f"{boot.average(values):.3f}"]
        cells.append(f"{np.mean([r['seconds_per_step'] for r in runs]):.2f}")
        rows.append(cells)
    return _rows(head, rows)


# The arm a group's changes are measured against, where it is not per-task LoRA at the same setting.
GROUP_REFERENCE = {"gate": "gate off", "split": "K_c=2, K_s=2"}


def reference_arm(arm: dict, names: Sequence[str]) -> str | None:
    """The name of the arm ``arm`` is compared with (paired, on the same test examples and seeds),
    or None: per-task LoRA at the same setting for the other groups' arms ("lora, 72 steps" against
    "per-task-lora, 72 steps"; the affinity arm against "per-task-lora"), the ungated layer for the
    gate group and the even split for the split group (``GROUP_REFERENCE``); None for the
    reference itself or when the group has no such arm."""
    if arm["group"] in GROUP_REFERENCE:
        name = GROUP_REFERENCE[arm["group"]]
    elif arm.get("method"):
        name = arm["name"].replace(arm["method"], "per-task-lora", 1)
    else:  # a CGCConfig arm named "<method>, <setting>": per-task LoRA at that setting if measured
        _, _, at = arm["name"].partition(", ")
        name = f"per-task-lora, {at}" if f"per-task-lora, {at}" in names else "per-task-lora"
    return name if name in names and name != arm["name"] else None


def _paired(arm: dict, ref: dict, boot_for) -> tuple[list[Interval], Interval]:
    """``arm``'s paired changes against ``ref`` (the same test examples, seed by seed): one
    interval per task, in the runs' task order, and the interval of the average change."""
    tasks = list(arm["runs"][0]["scores"])
    values, base = _per_example(arm, tasks), _per_example(ref, tasks)
    boot = boot_for(values, len(arm["runs"]))
    return [boot.difference(t, values[t], base[t]) for t in tasks], boot.average_difference(values, base)


def _rows(head: list[str], cells: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(line) + " |" for line in [head, ["---"] * len(head)] + cells]


def _changes(arms_of_group: list[dict], boot_for) -> list[str]:
    """Markdown rows: each arm's paired change against its ``reference_arm`` per task and on
    average (95% intervals), and the tasks that lose (interval below zero) with, in brackets, every
    task below the reference. Empty when no arm of the group has a reference."""
    by_name = {a["name"]: a for a in arms_of_group}
    pairs = [(a, by_name[r]) for a in arms_of_group if (r := reference_arm(a, list(by_name)))]
    if not pairs:
        return []
    tasks = list(arms_of_group[0]["runs"][0]["scores"])
    cells = []
    for arm, ref in pairs:
        changes, average = _paired(arm, ref, boot_for)
        cells.append([arm["name"], ref["name"]] + [f"{c:+.3f}" for c in changes] + [
            f"{average:+.3f}", f"{sum(c.high < 0 for c in changes)} ({sum(c.mean < 0 for c in changes)})"])
    return _rows(["arm", "against"] + [f"change {t}" for t in tasks]
                 + ["average change", "tasks that lose (below)"], cells)


# The seed paper's open check, which component a gain or loss comes from, as three steps that add
# up to cgc-1+n against per-task LoRA: (step, (group, arm), (group, the arm it is measured against)).
COMPONENTS = (
    ("sharing: one LoRA for every task", ("methods", "lora"), ("methods", "per-task-lora")),
    ("structure: common and specific experts in the prior clusters, ungated", ("gate", "gate off"),
     ("methods", "lora")),
    ("the gate: the task-id gate on those experts", ("methods", "cgc-1+n"), ("gate", "gate off")),
)


def _components(study: dict, boot_for) -> list[str]:
    """Markdown rows of ``COMPONENTS``' paired changes (95% intervals), for the steps whose two
    arms the study holds; empty when it holds none."""
    by_key = {(a["group"], a["name"]): a for a in study["arms"]}
    steps = [(step, by_key[arm], by_key[ref]) for step, arm, ref in COMPONENTS
             if arm in by_key and ref in by_key]
    if not steps:
        return []
    cells = []
    for step, arm, ref in steps:
        changes, average = _paired(arm, ref, boot_for)
        cells.append([step, arm["name"], ref["name"]] + [f"{c:+.3f}" for c in changes] + [f"{average:+.3f}"])
    tasks = list(steps[0][1]["runs"][0]["scores"])
    return _rows(["step", "arm", "against"] + [f"change {t}" for t in tasks] + ["average change"], cells)


def _boot_for(values: dict, seeds: int) -> Bootstrap:
    """The bootstrap over ``values``' test examples (``{task: (seeds, examples)}``) and ``seeds``."""
    return Bootstrap({t: v.shape[1] for t, v in values.items()}, seeds)


def _mean_val_loss(arm: dict) -> float:
    """An arm's validation loss, mean over tasks and seeds (the selection criterion)."""
    return float(np.mean([np.mean(list(r["val_loss"].values())) for r in arm["runs"]]))


def rank_choice(study: dict) -> list[str]:
    """Markdown rows: lora, per-task LoRA and cgc-1+n at every active rank the study holds (the
    methods group at the preset's, the capacity group at the others) with their mean validation
    loss; the rank each would choose on validation (the lowest); its test average there; and its
    paired change against per-task LoRA at the rank per-task LoRA would choose. Empty without the
    capacity group or per-task LoRA at every rank."""
    preset_rank = study["preset"].get("r_active")
    if preset_rank is None:
        return []
    by_key = {(a["group"], a["name"]): a for a in study["arms"]}
    ranks = sorted({a.get("preset", {}).get("r_active", preset_rank) for a in study["arms"]
                    if a["group"] == "capacity"} | {preset_rank})

    def arm_at(method: str, rank: int) -> dict | None:
        return by_key.get(("methods", method) if rank == preset_rank
                          else ("capacity", capacity_arm(method, rank).name))

    methods = [m for m in KEY_METHODS if all(arm_at(m, r) for r in ranks)]
    if len(ranks) < 2 or "per-task-lora" not in methods:
        return []
    loss = {(m, r): _mean_val_loss(arm_at(m, r)) for m in methods for r in ranks}
    chosen = {m: min(ranks, key=lambda r: loss[m, r]) for m in methods}
    reference = arm_at("per-task-lora", chosen["per-task-lora"])
    tasks = list(reference["runs"][0]["scores"])
    cells = []
    for m in methods:
        arm = arm_at(m, chosen[m])
        values = _per_example(arm, tasks)
        change = "" if arm is reference else f"{_paired(arm, reference, _boot_for)[1]:+.3f}"
        cells.append([m] + [f"{loss[m, r]:.3f}" for r in ranks]
                     + [str(chosen[m]), f"{_boot_for(values, len(arm['runs'])).average(values):.3f}", change])
    return _rows(["method"] + [f"val loss r_active {r}" for r in ranks] + [
        "chosen r_active", "test average", f"change vs per-task-lora at r_active {chosen['per-task-lora']}"], cells)


def report(study: dict) -> str:
    """The study's Markdown report, from its JSON alone (every number traceable to it)."""
    prov, preset = study["provenance"], study["preset"]
    lines = [
        "# Study results", "",
        f"Written by `{prov.get('command')}`: preset `{preset['name']}`, seeds {study['seeds']}, {preset['steps']} steps per adapter "
        f"set, {preset['batch_size']} examples per step over all tasks, model {prov.get('model')} on "
        f"{prov.get('device_name')} ({prov.get('cpu_threads')} threads, autocast "
        f"{prov.get('autocast', 'not recorded')}), commit {prov.get('git_commit')}, "
        f"{prov.get('date')}; {(study.get('total_seconds', 0) + study.get('earlier_seconds', 0)) / 60:.0f} "
        "minutes of training and scoring in all. Test scores: "
        "mean [95% bootstrap interval over test examples and seeds]. Validation loss: the last "
        "recorded, teacher-forced, mean over seeds (the selection criterion; test scores are "
        "reported only).", "",
    ]
    if study.get("earlier_provenance"):
        earlier = "; ".join(f"commit {p.get('git_commit')}, {p.get('date')}, {p.get('device_name')}, autocast "
                            f"{p.get('autocast', 'not recorded')}" for p in study["earlier_provenance"])
        lines += [f"Resumed: arms measured by earlier processes were kept ({earlier}); each arm "
                  "records the commit and date of the process that ran it.", ""]
    if study.get("note"):
        lines += [study["note"], ""]
    for group in dict.fromkeys(a["group"] for a in study["arms"]):
        of_group = [a for a in study["arms"] if a["group"] == group]
        lines += [f"## {group}", ""] + _table(of_group, _boot_for) + [""]
        changes = _changes(of_group, _boot_for)
        if changes:
            lines += ["Paired changes in test score against the reference arm, 95% intervals; a task "
                      "*loses* when its whole interval lies below zero (in brackets: every task below "
                      "the reference, noise included).", ""] + changes + [""]
    components = _components(study, _boot_for)
    if components:
        lines += ["## components", "",
                  "Where the change of cgc-1+n against per-task LoRA comes from, in steps that add up to "
                  "it (paired changes in test score, 95% intervals).", ""] + components + [""]
    ranks = rank_choice(study)
    if ranks:
        lines += ["## ranks chosen on validation", "",
                  "The budget rule gives every method the same active rank. Here each method takes "
                  "instead the rank with its lowest mean validation loss: its test average there, and "
                  "its paired change against per-task LoRA at the rank per-task LoRA would choose "
                  "(95% intervals).", ""] + ranks + [""]
    return "\n".join(lines) + "\n"


def best_gate(study: dict) -> dict:
    """The gate arm with the lowest mean validation loss (over tasks and seeds)."""
    gate = [a for a in study["arms"] if a["group"] == "gate"]
    if not gate:
        raise ValueError("the study has no gate group")
    return min(gate, key=_mean_val_loss)

