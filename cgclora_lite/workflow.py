"""Your own tasks, end to end: train a framework from a task file, evaluate it, predict with it.

The command line's ``train``, ``evaluate`` and ``predict`` (``cli.py``) are thin wrappers around
these functions, and ``run --tasks-file`` uses ``file_tasks`` to compare the methods on your tasks.

* ``train_framework``: the tasks of a task file (``taskfile``; clusters found by task affinity
  when the file leaves them open: ``resolve_clusters``), the adapters of one method
  (``experiment.method_config`` and ``experiment.method_clusters``, batches under the
  experiment's budget rule: ``experiment.cluster_batches``), trained and saved as a **framework
  folder**:

  ====================  =====================================================================
  ``framework.json``    the central model (named and fingerprinted), tasks, clusters, provenance
  ``clusters/<name>/``  each cluster's adapters (``cgclora_config.json`` + safetensors)
  ``history.json``      each cluster's training curve (loss, lr, gradient norm per step)
  ``tasks.json``        the task file as checked (absolute paths) and a hash of every split
  ``train.json``        method, adapter and training settings, clusters and how they were found,
                        trainable parameters, time, provenance
  ====================  =====================================================================

* ``open_framework``: such a folder back on its central model, with its tasks' data read again
  and compared with the saved hashes (changed data is refused: its test split could now hold
  training rows), or with the tasks of another task file.
* ``evaluate_framework``: each task's score on a split with a 95% bootstrap interval
  (``stats.Bootstrap``), and, on request, the central model's zero-shot score and the gain.
* ``predict``: answers for (task, input) requests, batched, each routed to its task's cluster, so
  one call may mix tasks.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .affinity import cluster_tasks, task_affinity
from .cgc import CGCConfig
from .data import prompt_budget
from .evaluate import MAX_NEW_TOKENS, evaluate_tasks, generate_answers
from .experiment import CGC_METHODS, cluster_batches, method_clusters, method_config
from .framework import FRAMEWORK_FILE, OnePlusN
from .models import load_model
from .provenance import provenance
from .stats import Bootstrap
from .taskfile import (
    Clustering,
    Problem,
    TaskFile,
    TaskFileError,
    data_fingerprint,
    load_task_file,
    load_tasks,
)
from .tasks import Example, MissingColumnError, Task, read_table
from .train import TrainConfig

TASKS_FILE = "tasks.json"
TRAIN_FILE = "train.json"


@dataclass
class TrainSettings:
    """How ``train_framework`` trains: the method (one of ``experiment.CGC_METHODS``; the MoDULA
    methods train in stages and cannot be exported per task: compare them with ``run``) and the
    experiment's knobs, under the same names as ``experiment.Preset`` (``from_preset``).

    ``steps`` optimizer steps per cluster; ``batch_size`` examples of all tasks per step (each task
    gets ``batch_size // T``: the budget rule); ``max_length`` tokens per example; ``r_active``
    and ``alpha``: each task's rank and the scale numerator; ``eval_every``: validation loss
    every so many steps (0: never; tasks without validation examples skip it).
    """

    method: str = "cgc-1+n"
    steps: int = 144
    batch_size: int = 8
    lr: float = 2e-3
    max_length: int = 80
    r_active: int = 8
    alpha: float = 16.0
    warmup: float = 0.1
    seed: int = 0
    eval_every: int = 0
    gate_norm: str = "softmax"
    gate_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in CGC_METHODS:
            raise ValueError(f"method {self.method!r} cannot train a framework: choose one of "
                             f"{', '.join(CGC_METHODS)} (MoDULA's token router has no per-task "
                             "adapter to save or export; compare it with `run --tasks-file`)")
        if self.batch_size < 1 or self.max_length < 16:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 16, got {self.batch_size} "
                             f"and {self.max_length}")
        self.adapter_config()  # raises now for a bad r_active or gate option
        self.train_config()  # and for bad steps or warmup

    @classmethod
    def from_preset(cls, preset, **overrides) -> "TrainSettings":
        """The preset's values for every field both have, then ``overrides`` (None: keep)."""
        shared = {f.name: getattr(preset, f.name) for f in fields(cls) if hasattr(preset, f.name)}
        return cls(**{**shared, **{k: v for k, v in overrides.items() if v is not None}})

    def adapter_config(self) -> CGCConfig:
        """The method's ``CGCConfig`` at this active rank (``experiment.method_config``)."""
        return method_config(self.method, self.r_active, self.alpha, gate_norm=self.gate_norm,
                             gate_lr_scale=self.gate_lr_scale)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, lr=self.lr, warmup=self.warmup,
                           eval_every=self.eval_every, seed=self.seed)

    def check_tasks(self, tasks: Sequence[Task]) -> None:
        """Raise before any model is loaded if the batch cannot hold one example of every task."""
        if self.batch_size < len(tasks):
            raise ValueError(f"a batch of {self.batch_size} examples cannot hold one example of each "
                             f"of the {len(tasks)} tasks: use a batch size of at least {len(tasks)}")


# --- clusters -----------------------------------------------------------------------------

def resolve_clusters(model, tokenizer, tasks: Sequence[Task], clustering: Clustering | None,
                     max_length: int = 128, batch_size: int = 8, seed: int = 0) -> dict | None:
    """Give every task a cluster when the task file left them open (``task.cluster == ""``).

    ``clustering.n_clusters`` clusters named ``cluster1``, ``cluster2``...: with one cluster, or
    one per task, nothing needs measuring; otherwise the tasks' affinity is measured on the
    central model (``affinity.task_affinity``, ``clustering.method``, two batches of
    ``batch_size`` per task) and cut by ``affinity.cluster_tasks``. Returns how the clusters were
    found (``{"clusters", "n_clusters", "method", "affinity"}``), or None when every task already
    named its cluster. The model is left as it was.
    """
    if all(t.cluster for t in tasks):
        return None
    clustering = clustering or Clustering(min(2, len(tasks)))
    n = min(clustering.n_clusters, len(tasks))
    names = [t.name for t in tasks]
    affinity = None
    if n == 1:
        groups = {"cluster1": names}
    elif n == len(tasks):
        groups = {f"cluster{i + 1}": [name] for i, name in enumerate(names)}
    else:
        affinity = task_affinity(model, tokenizer, tasks, clustering.method, batch_size=batch_size,
                                 max_length=max_length, seed=seed)
        groups = cluster_tasks(affinity, n)
    owner = {name: cluster for cluster, members in groups.items() for name in members}
    for task in tasks:
        task.cluster = owner[task.name]
    return {"clusters": groups, "n_clusters": n,
            "method": clustering.method if affinity is not None else None,
            "affinity": affinity.to_dict() if affinity is not None else None}


def file_tasks(tasks: Sequence[Task], spec: TaskFile, model, tokenizer, max_length: int = 128,
               seed: int = 0, names: Sequence[str] | None = None) -> list[Task]:
    """A task file's tasks ready for the experiment (``run --tasks-file``): ``names`` picks a
    subset (unknown names raise), and open clusters are found by ``resolve_clusters``."""
    if names:
        unknown = sorted(set(names) - set(spec.names))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the task file has {spec.names}")
        tasks = [t for t in tasks if t.name in names]
    resolve_clusters(model, tokenizer, tasks, spec.clustering, max_length, seed=seed)
    return list(tasks)


# --- training -----------------------------------------------------------------------------

def check_out_folder(out: str | Path) -> Path:
    """``out`` as a Path; raises if it already holds a trained framework (nothing is overwritten)."""
    out = Path(out)
    if (out / FRAMEWORK_FILE).exists():
        raise FileExistsError(f"{out} already holds a trained framework: choose another --out folder, "
                              "or delete this one first")
    return out


def train_framework(model, tokenizer, spec: TaskFile, tasks: Sequence[Task], settings: TrainSettings,
                    out: str | Path, progress: bool = True) -> tuple[OnePlusN, dict]:
    """Train ``settings.method`` on ``tasks`` (from ``taskfile.load_task_file``) and save the
    framework folder ``out`` (see the module docstring). Returns the framework (its adapters on
    ``model``) and the record written to ``train.json``.
    """
    settings.check_tasks(tasks)
    out = check_out_folder(out)
    found = resolve_clusters(model, tokenizer, tasks, spec.clustering, settings.max_length,
                             settings.batch_size, settings.seed)
    clusters = method_clusters(settings.method, tasks)
    config = settings.adapter_config()
    batches = cluster_batches(settings.batch_size, clusters)
    torch.manual_seed(settings.seed)  # the adapters' initial A
    framework = OnePlusN(model, tokenizer, settings.max_length)
    for name, members in clusters.items():
        framework.add_cluster(name, members, config)
    start = time.perf_counter()
    framework.train(settings.train_config(), batches, progress)
    seconds = time.perf_counter() - start
    prov = provenance(model, seed=settings.seed, method=settings.method)
    framework.save(out, provenance=prov)
    (out / TASKS_FILE).write_text(json.dumps({
        "format": "cgclora_lite.tasks", "format_version": 1, "task_file": spec.to_dict(),
        "clusters": {t.name: t.cluster for t in tasks}, "sizes": {t.name: t.sizes() for t in tasks},
        "data": {t.name: data_fingerprint(t) for t in tasks}}, indent=2) + "\n")
    record = {
        "method": settings.method, "settings": asdict(settings), "adapter_config": config.to_dict(),
        "clusters": {n: [t.name for t in m] for n, m in clusters.items()}, "batch_sizes": batches,
        "clusters_found": found, "trainable_parameters": framework.num_trainable(),
        "train_seconds": round(seconds, 1), "provenance": prov,
    }
    (out / TRAIN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return framework, record


# --- a trained framework, back ------------------------------------------------------------

def _framework_meta(folder: Path) -> dict:
    file = folder / FRAMEWORK_FILE
    if not file.is_file():
        found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else None
        raise FileNotFoundError(
            f"{folder} is not a trained framework folder (no {FRAMEWORK_FILE}; it holds "
            f"{found if found is not None else 'nothing: no such folder'}). Give a folder written "
            "by `train --out`, or a run's adapters/<method>/seed<N> folder.")
    return json.loads(file.read_text())


def framework_tasks(folder: str | Path, tasks_file: str | Path | None = None) -> list[Task] | None:
    """The data of a framework folder's tasks, read and checked without loading any model.

    With ``tasks_file``, the tasks of that file (all must be tasks of the framework). Otherwise
    the task definitions saved by ``train`` (``tasks.json``), read again and compared with the
    saved hashes; None for a folder without them (e.g. a run's adapters: pass ``tasks_file``).
    """
    folder = Path(folder)
    meta = _framework_meta(folder)
    known = [t["name"] for c in meta["clusters"].values() for t in c["tasks"]]
    if tasks_file is not None:
        _, tasks = load_task_file(tasks_file)
        unknown = [t.name for t in tasks if t.name not in known]
        if unknown:
            raise ValueError(f"tasks {unknown} of {tasks_file} are not tasks of the framework in "
                             f"{folder} ({known}): it can only answer the tasks it was trained on")
        return tasks
    saved_file = folder / TASKS_FILE
    if not saved_file.is_file():
        return None
    saved = json.loads(saved_file.read_text())
    spec = TaskFile.from_dict(saved["task_file"])
    tasks = load_tasks(spec)
    changed = []
    for i, (task, task_spec) in enumerate(zip(tasks, spec.tasks)):
        now = data_fingerprint(task)
        splits = [s for s in now if saved["data"].get(task.name, {}).get(s) != now[s]]
        if splits:
            changed.append(Problem(f"tasks[{i}]", None, (
                f"task {task.name!r}: the {' and '.join(splits)} examples read from "
                f"{task_spec.source.describe()} differ from those the framework was trained with, "
                "so its test split may now hold training rows. Restore the data, or evaluate on "
                "other data with --tasks-file")))
    if changed:
        raise TaskFileError(f"the data of {folder}", changed)
    for task in tasks:
        task.cluster = saved["clusters"].get(task.name, task.cluster)
    return tasks


def framework_task_names(folder: str | Path) -> list[str]:
    """The names of a framework folder's tasks (read from ``framework.json``, no model loaded)."""
    meta = _framework_meta(Path(folder))
    return [t["name"] for c in meta["clusters"].values() for t in c["tasks"]]


def load_framework(folder: str | Path, model: str | None = None) -> OnePlusN:
    """A saved framework on its central model: the one it names, or ``model`` (a name or folder,
    e.g. the same model moved elsewhere), which must have the weights the framework was trained
    on (``OnePlusN.load`` compares their fingerprints and refuses another model)."""
    _framework_meta(Path(folder))  # a clear error for a folder that is not a framework
    if model is None:
        return OnePlusN.load(folder)
    loaded, tokenizer = load_model(model)
    return OnePlusN.load(folder, loaded, tokenizer)


def open_framework(folder: str | Path, model: str | None = None,
                   tasks_file: str | Path | None = None) -> tuple[OnePlusN, list[Task] | None]:
    """``load_framework`` and ``framework_tasks`` together; the data is checked before the model
    loads, so a bad task file costs no model load."""
    tasks = framework_tasks(folder, tasks_file)
    return load_framework(folder, model), tasks


# --- evaluation ---------------------------------------------------------------------------

def evaluate_framework(framework: OnePlusN, tasks: Sequence[Task], split: str = "test",
                       limit: int | None = None, batch_size: int = 16, zero_shot: bool = False,
                       progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Score every task of ``tasks`` on ``split`` through its cluster; with ``zero_shot`` also the
    central model alone. Returns a table (one row per task: cluster, metric, n, score and its 95%
    bootstrap interval; with ``zero_shot``, the zero-shot score and the gain, a paired interval)
    and the raw results (``{"trained": {task: metrics}, "zero-shot": {...}}``, answers included).
    """
    trained, base = {}, {}
    for task in tqdm(tasks, desc=f"evaluate ({split})", disable=not progress):
        trained.update(framework.evaluate([task], split, limit, batch_size))
    if zero_shot:
        framework.deactivate()  # the central model alone
        for task in tqdm(tasks, desc=f"zero-shot ({split})", disable=not progress):
            base.update(evaluate_tasks(framework.model, framework.tokenizer, [task], split, limit,
                                       batch_size, prompt_budget(framework.max_length)))
    boot = Bootstrap({name: r["n"] for name, r in trained.items()}, seeds=1)
    rows = []
    for task in tasks:
        result = trained[task.name]
        score = boot.score(task.name, result["per_example"])
        row = {"task": task.name, "cluster": framework.cluster_of(task.name).name,
               "metric": task.metric, "n": result["n"], "score": score.mean, "low": score.low,
               "high": score.high}
        if zero_shot:
            reference = base[task.name]["per_example"]
            zero = boot.score(task.name, reference)
            gain = boot.difference(task.name, result["per_example"], reference)  # paired
            row.update({"zero-shot": zero.mean, "zero-shot low": zero.low, "zero-shot high": zero.high,
                        "gain": gain.mean, "gain low": gain.low, "gain high": gain.high})
        rows.append(row)
    return pd.DataFrame(rows), {"trained": trained, "zero-shot": base}


def table_markdown(table: pd.DataFrame) -> str:
    """``evaluate_framework``'s table as Markdown, intervals in brackets."""
    zero = "zero-shot" in table.columns
    head = ["task", "cluster", "metric", "n", "score [95% CI]"] + (
        ["zero-shot [95% CI]", "gain [95% CI]"] if zero else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.to_dict("records"):
        cells = [row["task"], row["cluster"], row["metric"], str(row["n"]),
                 f"{row['score']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"]
        if zero:
            cells += [f"{row['zero-shot']:.3f} [{row['zero-shot low']:.3f}, {row['zero-shot high']:.3f}]",
                      f"{row['gain']:+.3f} [{row['gain low']:+.3f}, {row['gain high']:+.3f}]"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- predictions --------------------------------------------------------------------------

def predict(framework: OnePlusN, requests: Sequence[tuple[str, str]], batch_size: int = 16,
            progress: bool = True) -> list[str]:
    """Greedy answers for ``(task, input)`` requests, in order.

    Every request is checked first (known task, non-empty input). Requests are then grouped by
    cluster (and answer length: ``evaluate.MAX_NEW_TOKENS`` of the task's metric, as in
    evaluation) and generated in batches of ``batch_size``; a batch may mix the tasks of one
    cluster, each row routed by its task id.
    """
    known = {t.name: (c.name, i, t) for c in framework.clusters.values() for i, t in enumerate(c.tasks)}
    check_requests(list(known), requests)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (task, _) in enumerate(requests):
        cluster, _, spec = known[task]
        groups.setdefault((cluster, MAX_NEW_TOKENS[spec.metric]), []).append(i)
    answers: list[str] = [""] * len(requests)
    with tqdm(total=len(requests), desc="predict", disable=not progress) as bar:
        for (cluster, max_new_tokens), indices in groups.items():
            framework.activate(cluster)
            members = framework.clusters[cluster].tasks
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                batch = [(known[requests[i][0]][1], Example(str(requests[i][1]), "", requests[i][0]))
                         for i in chunk]
                out = generate_answers(framework.model, framework.tokenizer, members, batch,
                                       batch_size, max_new_tokens, prompt_budget(framework.max_length))
                for i, answer in zip(chunk, out):
                    answers[i] = answer
                bar.update(len(chunk))
    return answers


def check_requests(tasks: Sequence[str], requests: Sequence[tuple[str, str]]) -> None:
    """Raise ``ValueError`` naming the rows (1-based) whose task is not one of ``tasks`` or whose
    input is empty, before anything is generated."""
    def rows(indices: list[int]) -> str:
        return ", ".join(str(i + 1) for i in indices[:10]) + ("..." if len(indices) > 10 else "")

    if not requests:
        raise ValueError("nothing to predict: no input rows")
    unknown = [i for i, (task, _) in enumerate(requests) if task not in tasks]
    if unknown:
        raise ValueError(f"unknown task {requests[unknown[0]][0]!r} in rows {rows(unknown)}; this "
                         f"framework answers {', '.join(tasks)}")
    empty = [i for i, (_, text) in enumerate(requests) if not str(text).strip()]
    if empty:
        raise ValueError(f"rows {rows(empty)} have an empty input: give every row a text to answer")


def read_requests(path: str | Path, task: str | None = None, input_column: str = "input",
                  task_column: str = "task") -> tuple[list[dict], list[tuple[str, str]]]:
    """The rows of a ``.csv`` / ``.json`` / ``.jsonl`` file to predict, and their (task, input)
    requests: ``task`` for every row, or each row's ``task_column``."""
    frame = read_table(path)
    columns = [str(c) for c in frame.columns]
    if input_column not in columns:
        raise MissingColumnError(f"column {input_column!r} not found in {path}; its columns: "
                                 f"{', '.join(columns)}. Name the input column with --input-column")
    if task is None and task_column not in columns:
        raise MissingColumnError(f"{path} has no {task_column!r} column to say each row's task "
                                 f"(its columns: {', '.join(columns)}): give --task NAME for all rows, "
                                 "or name the column with --task-column")
    rows = frame.to_dict("records")
    return rows, [(task if task is not None else str(row[task_column]).strip(), str(row[input_column]))
                  for row in rows]


def write_predictions(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` (dicts with the same keys) as ``.jsonl`` or ``.csv``, chosen by the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"{path}: predictions are written as .jsonl or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows), encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["answer"])
            writer.writeheader()
            writer.writerows(rows)
    return path
