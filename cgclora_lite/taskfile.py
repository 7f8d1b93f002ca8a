"""Task files: your own tasks and their clusters in one YAML (or JSON) file, checked up front.

A task file says, for every task, where its examples come from, how to prompt for it and how to
score it, and which tasks share a cluster (the N of 1+N) or that the affinity measure on the
central model should decide::

    tasks:
      - name: mood
        source: {file: tasks.csv, task_column: task}   # the rows of tasks.csv whose task is "mood"
        input: text                                     # the column of inputs
        target: answer                                  # the column of expected answers
        instruction: "How does the person feel? Answer happy or sad.\\n\\n{input}"
        metric: accuracy
        labels: [happy, sad]
        cluster: feelings

``examples/tasks.yaml`` is a commented example: the text of ``EXAMPLE_TASK_FILE``, which
``write_example(folder)`` (the ``init`` command) writes next to a small synthetic CSV.

Top-level keys: ``tasks`` (a list, required), ``defaults`` (task keys every task gets unless it
sets its own), ``clustering`` (``{n_clusters, method}``: how to group tasks that name no
cluster), ``seed`` (how rows are split, default 0) and ``version`` (1). Task keys:

===============  =========  =======================================================================
key              required   meaning
===============  =========  =======================================================================
name             yes        unique; letters, digits, ``_ . -``
source           yes        ``path.csv`` (or .json / .jsonl), ``{file: path, task_column: col,
                            task_value: value}`` (the rows whose column ``col`` holds ``value``,
                            by default the task's name) or ``{dataset: name, config, split}``
                            (``datasets``: a Hub id, online, or a local folder; may filter by a
                            task column too). Paths are relative to the task file.
input, target    yes        the columns of inputs and of expected answers
instruction      yes        the prompt, with the input's place marked ``{input}``
metric           yes        ``accuracy`` (labels), ``rouge_l`` (free text), ``exact_match``
labels           accuracy   the allowed answers; accuracy reads the label an answer begins with,
                            ignoring case ("sci-fi", "Négatif", "very good" all work)
sizes            no         ``{train, validation, test}``: counts (ints) or fractions of the usable
                            rows; default ``{train: 0.8, validation: 0.1, test: 0.1}``
cluster          no         the cluster's name; every task names one, or none does
max_input_words  no         cut longer inputs to this many words
===============  =========  =======================================================================

``load_task_file(path)`` reads and checks everything before any model is loaded: the structure
(unknown keys, with a suggestion; missing or mistyped values; duplicate keys and duplicate task
names; YAML's booleans where text is meant: ``[yes, no]`` are ``True`` and ``False`` unless
quoted), then each task's data (missing or empty files, missing columns, targets outside
``labels``, too few rows for the sizes). It reports *every* problem at once, each with its key
path and, for YAML, its line, in one ``TaskFileError`` (a ``ValueError``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .tasks import (METRICS, SPLITS, Task, _as_text, _split_counts, label_problems, read_dataset, read_table,
                    task_from_rows)

TASK_KEYS = {
    "name": "the task's name", "source": "where the examples come from",
    "input": "the column of inputs", "target": "the column of expected answers",
    "instruction": "the prompt, with an {input} slot", "metric": f"one of {', '.join(METRICS)}",
    "labels": "the allowed answers", "sizes": "{train, validation, test} counts or fractions",
    "cluster": "the cluster's name", "max_input_words": "cut longer inputs to this many words",
}
REQUIRED = ("name", "source", "input", "target", "instruction", "metric")
TOP_KEYS = ("version", "seed", "defaults", "clustering", "tasks")
SOURCE_KEYS = ("file", "dataset", "config", "split", "task_column", "task_value")
CLUSTERING_KEYS = ("n_clusters", "method")
AFFINITY_METHODS = ("gradient", "lookahead")
DEFAULT_SIZES = {"train": 0.8, "validation": 0.1, "test": 0.1}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SUFFIXES = (".yaml", ".yml", ".json")


class TaskFileError(ValueError):
    """A task file (or the data it points to) with problems; ``problems`` lists every one."""

    def __init__(self, source: str, problems: Sequence["Problem"]):
        self.source = source
        self.problems = sorted(problems, key=lambda p: p.line or 0)  # file order; stable otherwise
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        super().__init__(f"{source} has {count}:\n"
                         + "\n".join(f"  {p}" for p in self.problems))


@dataclass(frozen=True)
class Problem:
    """One problem: where (a key path such as ``tasks[1].source.file``, and the line) and what."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.path or "the file"
        return f"{where}{f' (line {self.line})' if self.line else ''}: {self.message}"


@dataclass
class Source:
    """Where a task's rows come from: a local ``file`` or a ``datasets`` name (``dataset``,
    ``config``, ``split``), optionally only the rows whose ``task_column`` holds ``task_value``."""

    file: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    task_column: str | None = None
    task_value: str | None = None

    def describe(self) -> str:
        where = self.file if self.file is not None else f"dataset {self.dataset!r} ({self.split})"
        return where + (f", rows with {self.task_column} = {self.task_value!r}" if self.task_column else "")


@dataclass
class TaskSpec:
    """One task as the file declares it (checked); ``to_task`` turns its rows into a ``Task``."""

    name: str
    source: Source
    input: str
    target: str
    instruction: str
    metric: str
    labels: list[str] | None = None
    sizes: dict = field(default_factory=lambda: dict(DEFAULT_SIZES))
    cluster: str | None = None
    max_input_words: int | None = None

    def size_tuple(self) -> tuple:
        return tuple(self.sizes[s] for s in SPLITS)


@dataclass
class Clustering:
    """How to group tasks that name no cluster: ``n_clusters`` clusters by ``method`` affinity
    (``affinity.task_affinity`` then ``affinity.cluster_tasks``)."""

    n_clusters: int = 2
    method: str = "gradient"


@dataclass
class TaskFile:
    """A checked task file: its tasks, how unnamed clusters are found (``clustering``, None when
    every task names its cluster), and the split ``seed``. Paths in it are absolute."""

    path: str | None
    tasks: list[TaskSpec]
    clustering: Clustering | None = None
    seed: int = 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict:
        """JSON-friendly (saved in a trained framework folder as ``tasks.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TaskFile":
        tasks = [TaskSpec(**{**t, "source": Source(**t["source"])}) for t in data["tasks"]]
        clustering = Clustering(**data["clustering"]) if data.get("clustering") else None
        return cls(data.get("path"), tasks, clustering, data.get("seed", 0))


# --- reading the file, with the line of every key ---------------------------------------------

def _path_text(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _yaml_lines(node, path: tuple, lines: dict, duplicates: list) -> None:
    """Fill ``lines`` with the 1-based line of every key path under ``node`` (a composed YAML
    node) and ``duplicates`` with ``(path, line, first line)`` of keys that appear twice."""
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                duplicates.append((path + (key,), line, seen[key]))
            seen[key] = line
            lines[path + (key,)] = line
            _yaml_lines(value_node, path + (key,), lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _yaml_lines(item, path + (i,), lines, duplicates)


def _parse(text: str, suffix: str, source: str) -> tuple[Any, dict, list[Problem]]:
    """The file's data, the line of every key path, and the problems found while parsing."""
    lines: dict = {(): 1}
    problems: list[Problem] = []
    if suffix == ".json":
        def pairs(items):
            keys = [k for k, _ in items]
            for key in sorted({k for k in keys if keys.count(k) > 1}):
                problems.append(Problem("", None, f"key {key!r} appears twice in one JSON object; "
                                                  "JSON keeps only the last: remove one"))
            return dict(items)

        try:
            return json.loads(text, object_pairs_hook=pairs), {}, problems
        except json.JSONDecodeError as error:
            raise TaskFileError(source, [Problem("", error.lineno, f"not valid JSON: {error.msg}")])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        what = getattr(error, "problem", None) or str(error)
        raise TaskFileError(source, [Problem("", mark.line + 1 if mark else None,
                                             f"not valid YAML: {what}")]) from None
    duplicates: list = []
    _yaml_lines(node, (), lines, duplicates)
    for path, line, first in duplicates:
        problems.append(Problem(_path_text(path), line, f"key {path[-1]!r} appears twice (also on "
                                f"line {first}); YAML keeps only the last one: remove one"))
    return data, lines, problems


class _Checker:
    """Collects problems with their key paths and lines (nearest enclosing key with a line)."""

    def __init__(self, lines: dict):
        self.lines, self.problems = lines, []

    def add(self, path: tuple, message: str) -> None:
        probe = path
        while probe and probe not in self.lines:
            probe = probe[:-1]
        problem = Problem(_path_text(path), self.lines.get(probe), message)
        if problem not in self.problems:  # a bad default is reported once, not once per task
            self.problems.append(problem)

    def unknown_keys(self, path: tuple, mapping: dict, known: Sequence[str]) -> None:
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                self.add(path + (key,), f"unknown key {key!r}; {hint}")

    def text(self, path: tuple, value: Any, what: str) -> str | None:
        """``value`` if it is non-empty text, else a problem (with YAML's boolean trap named)."""
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, bool):
            self.add(path, f"{what} must be text, but YAML read {value}: unquoted yes/no/on/off/"
                           f"true/false are booleans; quote it ('{'yes' if value else 'no'}')")
        elif value is None or isinstance(value, str):
            self.add(path, f"{what} is empty")
        else:
            self.add(path, f"{what} must be text, got {type(value).__name__} {value!r}: quote it")
        return None


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text"}.get(type(value), type(value).__name__)


def _check_sizes(check: _Checker, path: tuple, sizes: Any) -> dict | None:
    if not isinstance(sizes, dict):
        check.add(path, f"sizes must be a mapping {{train: ..., validation: ..., test: ...}}, got "
                        f"{_type_name(sizes)}")
        return None
    check.unknown_keys(path, sizes, SPLITS)
    missing = [s for s in SPLITS if s not in sizes]
    if missing:
        check.add(path, f"sizes needs train, validation and test; missing {', '.join(missing)}")
        return None
    values = [sizes[s] for s in SPLITS]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        check.add(path, f"sizes must be numbers >= 0, got {dict(zip(SPLITS, values))}")
        return None
    if all(isinstance(v, int) for v in values):
        result = dict(zip(SPLITS, values))
    elif max(values) <= 1 and sum(values) <= 1 + 1e-9:
        result = dict(zip(SPLITS, map(float, values)))
    else:
        check.add(path, f"sizes must be counts (all whole numbers) or fractions of the rows (each "
                        f"at most 1, summing to at most 1), got {dict(zip(SPLITS, values))}")
        return None
    for split in ("train", "test"):
        if result[split] == 0:
            check.add(path + (split,), f"{split} must be above 0: a task needs examples to "
                                       f"{'train on' if split == 'train' else 'be scored on'}")
    return result


def _check_source(check: _Checker, path: tuple, value: Any, name: str | None, folder: Path) -> Source | None:
    if isinstance(value, str):
        value = {"file": value}
    if not isinstance(value, dict):
        check.add(path, f"source must be a file path or a mapping {{file: ...}} / {{dataset: ...}}, "
                        f"got {_type_name(value)}")
        return None
    check.unknown_keys(path, value, SOURCE_KEYS)
    if ("file" in value) == ("dataset" in value):
        check.add(path, "source needs exactly one of file (a local .csv, .json or .jsonl) and "
                        "dataset (a `datasets` name or folder)")
        return None
    fields = {}
    for key in SOURCE_KEYS:
        if key in value:
            fields[key] = check.text(path + (key,), value[key], f"source {key}")
            if fields[key] is None:
                return None
    if "task_value" in fields and "task_column" not in fields:
        check.add(path + ("task_value",), "task_value needs task_column (the column to filter on)")
        return None
    if "task_column" in fields and "task_value" not in fields:
        fields["task_value"] = name
    if "file" in fields:
        file = Path(fields["file"]).expanduser()
        file = file if file.is_absolute() else (folder / file).resolve()
        if not file.is_file():
            check.add(path + ("file",), f"data file {fields['file']} not found (looked for {file}; "
                                        "a relative path starts from the task file's folder)")
            return None
        fields["file"] = str(file)
    return Source(**fields)


def _check_labels(check: _Checker, path: tuple, labels: Any) -> list[str] | None:
    if not isinstance(labels, list) or not labels:
        check.add(path, f"labels must be a non-empty list, got {_type_name(labels)}")
        return None
    texts = [check.text(path + (i,), label, "a label") for i, label in enumerate(labels)]
    if any(t is None for t in texts):
        return None
    for problem in label_problems(texts):  # what Task would refuse: empty, repeated, or alike
        check.add(path, problem)
    return texts


def _check_task(check: _Checker, path: tuple, task: dict, origins: dict, folder: Path) -> TaskSpec | None:
    """One task (defaults merged in; ``origins[key]`` is the path each value came from)."""
    def where(key: str) -> tuple:
        return origins.get(key, path + (key,))

    ok = True
    for key in REQUIRED:
        if key not in task:
            check.add(path, f"missing key {key!r} ({TASK_KEYS[key]})")
            ok = False
    if not ok:
        return None
    name = check.text(where("name"), task["name"], "name")
    if name is not None and not NAME.fullmatch(name):
        check.add(where("name"), f"task name {name!r}: use letters, digits and _ . - (it names "
                                 "the task on the command line and in files)")
        name = None
    texts = {key: check.text(where(key), task[key], key) for key in ("input", "target", "instruction")}
    if texts["instruction"] is not None and "{input}" not in texts["instruction"]:
        check.add(where("instruction"), "the instruction needs an {input} slot: where the input goes")
        texts["instruction"] = None
    metric = task["metric"]
    if metric not in METRICS:
        close = difflib.get_close_matches(str(metric), METRICS, n=1)
        check.add(where("metric"), f"metric must be one of {', '.join(METRICS)}, got {metric!r}"
                                   + (f"; did you mean {close[0]!r}?" if close else ""))
        metric = None
    labels = None
    if task.get("labels") is not None:
        labels = _check_labels(check, where("labels"), task["labels"])
        ok = ok and labels is not None
    elif metric == "accuracy":
        check.add(path, "metric accuracy needs labels: the list of allowed answers")
        ok = False
    sizes = _check_sizes(check, where("sizes"), task.get("sizes", dict(DEFAULT_SIZES)))
    cluster = None
    if task.get("cluster") is not None:
        cluster = check.text(where("cluster"), task["cluster"], "cluster")
        if cluster is not None and not NAME.fullmatch(cluster):
            check.add(where("cluster"), f"cluster name {cluster!r}: use letters, digits and _ . - "
                                        "(it names a folder)")
            cluster = None
        ok = ok and cluster is not None
    words = task.get("max_input_words")
    if words is not None and (isinstance(words, bool) or not isinstance(words, int) or words < 1):
        check.add(where("max_input_words"), f"max_input_words must be a whole number >= 1, got {words!r}")
        ok = False
    source = _check_source(check, where("source"), task["source"], name, folder)
    if not ok or None in (name, metric, sizes, source, *texts.values()):
        return None
    return TaskSpec(name, source, texts["input"], texts["target"], texts["instruction"], metric,
                    labels, sizes, cluster, words)


def _check_structure(data: Any, check: _Checker, folder: Path) -> tuple[TaskFile, list] | None:
    """The whole file's structure. Returns the spec (its well-formed tasks only) and, for each of
    them, ``(key path, origins)`` (where each key's value came from: the task or ``defaults``);
    None when the file has no task list at all. Problems go to ``check``."""
    if not isinstance(data, dict):
        check.add((), "a task file is a mapping with a `tasks:` list; got "
                       + ("nothing (the file is empty)" if data is None else _type_name(data)))
        return None
    check.unknown_keys((), data, TOP_KEYS)
    if data.get("version", 1) != 1:
        check.add(("version",), f"version {data['version']!r}: this cgclora_lite reads version 1")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        check.add(("seed",), f"seed must be a whole number >= 0, got {seed!r}")
        seed = 0
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        check.add(("defaults",), f"defaults must be a mapping of task keys, got {_type_name(defaults)}")
        defaults = {}
    check.unknown_keys(("defaults",), defaults, [k for k in TASK_KEYS if k != "name"])
    if "name" in defaults:
        check.add(("defaults", "name"), "a name cannot be a default: every task has its own")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        check.add(("tasks",), "tasks must be a non-empty list of tasks (each starts with `- name: ...`)"
                  if "tasks" in data else "missing key 'tasks': the list of tasks")
        return None
    specs, places, declared = [], [], []  # declared: (index, name, cluster) as written, valid or not
    for i, task in enumerate(tasks):
        path = ("tasks", i)
        if not isinstance(task, dict):
            check.add(path, f"a task must be a mapping of keys (name, source, ...), got {_type_name(task)}")
            continue
        check.unknown_keys(path, task, list(TASK_KEYS))
        merged = {**{k: v for k, v in defaults.items() if k in TASK_KEYS and k != "name"}, **task}
        origins = {k: ("defaults", k) for k in defaults if k not in task}
        declared.append((i, merged.get("name"), merged.get("cluster")))
        spec = _check_task(check, path, merged, origins, folder)
        if spec is not None:
            specs.append((i, spec))
            places.append((path, origins))
    first: dict = {}
    for i, name, cluster in declared:
        if not isinstance(name, str):
            continue
        if name in first:
            j, other = first[name]
            check.add(("tasks", i, "name"), f"task name {name!r} is used twice: tasks[{j}] "
                      f"(cluster {other}) and tasks[{i}] (cluster {cluster}); a task belongs to "
                      "one cluster and is routed by its name: rename one")
        else:
            first[name] = (i, cluster)
    named = [i for i, _, cluster in declared if cluster is not None]
    if named and len(named) < len(declared):
        for i, name, cluster in declared:
            if cluster is None:
                check.add(("tasks", i), f"task {name!r} names no cluster while others do: give "
                          "every task a cluster, or none (then `clustering` groups them by affinity)")
    clustering = None
    raw = data.get("clustering")
    if raw is not None:
        if named and len(named) == len(tasks):
            check.add(("clustering",), "every task names its cluster, so clustering would be "
                      "ignored: remove it, or remove the tasks' cluster keys")
        elif not isinstance(raw, dict):
            check.add(("clustering",), f"clustering must be a mapping {{n_clusters: 2, method: "
                                       f"gradient}}, got {_type_name(raw)}")
        else:
            check.unknown_keys(("clustering",), raw, CLUSTERING_KEYS)
            n = raw.get("n_clusters", 2)
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(tasks):
                check.add(("clustering", "n_clusters"), f"n_clusters must be a whole number from 1 "
                          f"to the number of tasks ({len(tasks)}), got {n!r}")
            method = raw.get("method", "gradient")
            if method not in AFFINITY_METHODS:
                check.add(("clustering", "method"), f"method must be one of "
                          f"{', '.join(AFFINITY_METHODS)}, got {method!r}")
            clustering = Clustering(n, method)
    elif not named:
        clustering = Clustering(min(2, len(tasks)))
    return TaskFile(None, [s for _, s in specs], clustering, seed), places


# --- the data -------------------------------------------------------------------------------

def _read_rows(spec: TaskSpec) -> tuple[list[dict], list[str]]:
    """The source's rows and columns (``ValueError`` / ``FileNotFoundError`` / any loader error)."""
    source = spec.source
    if source.file is not None:
        frame = read_table(source.file)
        return frame.to_dict("records"), [str(c) for c in frame.columns]
    keep = [c for c in (spec.input, spec.target, source.task_column) if c]
    return read_dataset(source.dataset, source.config, source.split, keep)


def _check_data(check: _Checker, path: tuple, origins: dict, spec: TaskSpec, seed: int) -> Task | None:
    """Read one task's rows, check them (columns, labels, sizes) and build the ``Task``."""
    def where(key: str) -> tuple:
        return origins.get(key, path + (key,))

    source_path = where("source")
    try:
        rows, columns = _read_rows(spec)
    except FileNotFoundError:
        check.add(source_path + (("file",) if spec.source.file else ()),
                  f"task {spec.name!r}: data file {spec.source.file} not found (a relative path "
                  "starts from the task file's folder)")
        return None
    except ValueError as error:
        check.add(source_path, f"task {spec.name!r}: {error}")
        return None
    except Exception as error:  # datasets raises many kinds (network, unknown name...)
        check.add(source_path, f"task {spec.name!r}: cannot load dataset {spec.source.dataset!r} "
                               f"({type(error).__name__}: {error}); a Hub id needs the network")
        return None
    missing = False
    for key, column in (("input", spec.input), ("target", spec.target),
                        ("task_column", spec.source.task_column)):
        if column is not None and column not in columns:
            at = source_path + ("task_column",) if key == "task_column" else where(key)
            check.add(at, f"task {spec.name!r}: column {column!r} not found in "
                          f"{spec.source.describe()}; its columns: {', '.join(columns)}")
            missing = True
    if missing:
        return None
    if spec.source.task_column is not None:
        values = [_as_text(row[spec.source.task_column]) for row in rows]
        kept = [row for row, value in zip(rows, values) if value == spec.source.task_value]
        if not kept:
            found = sorted({v for v in values if v is not None})
            check.add(source_path, f"task {spec.name!r}: no row has {spec.source.task_column} = "
                      f"{spec.source.task_value!r}; values found: {', '.join(found[:10]) or 'none'}"
                      f"{'...' if len(found) > 10 else ''} (set task_value to pick another)")
            return None
        rows = kept
    usable = [row for row in rows if _as_text(row[spec.input]) is not None
              and _as_text(row[spec.target]) is not None]
    if not usable:
        check.add(source_path, f"task {spec.name!r}: none of its {len(rows)} rows has both an input "
                               f"({spec.input!r}) and a target ({spec.target!r})")
        return None
    ok = True
    if spec.labels is not None:
        outside: dict[str, int] = {}
        for row in usable:
            target = _as_text(row[spec.target])
            if target not in spec.labels:
                outside[target] = outside.get(target, 0) + 1
        if outside:
            shown = ", ".join(f"{t!r} ({n} rows)" for t, n in sorted(outside.items())[:5])
            cased = [t for t in outside if t.lower() in spec.labels]
            hint = (f" (labels are compared exactly: {cased[0]!r} is not {cased[0].lower()!r})"
                    if cased else "")
            check.add(where("labels"), f"task {spec.name!r}: {sum(outside.values())} targets are not "
                      f"in labels {spec.labels}: {shown}{'...' if len(outside) > 5 else ''}{hint}; "
                      "add them to labels or fix those rows")
            ok = False
    counts = _split_counts(spec.size_tuple(), len(usable))
    skipped = len(rows) - len(usable)
    have = f"{len(usable)} usable rows" + (f" ({skipped} skipped: empty input or target)" if skipped else "")
    if sum(counts) > len(usable):
        check.add(where("sizes"), f"task {spec.name!r} has {have}, but sizes ask for "
                  f"{counts[0]} + {counts[1]} + {counts[2]} = {sum(counts)}: lower the sizes or add rows")
        ok = False
    elif counts[0] < 1 or counts[2] < 1:
        check.add(where("sizes"), f"task {spec.name!r} has {have}: the fractions give train "
                  f"{counts[0]}, validation {counts[1]}, test {counts[2]}; train and test need at "
                  "least one each: add rows or give counts")
        ok = False
    if not ok:
        return None
    return task_from_rows(usable, columns, spec.source.describe(), name=spec.name,
                          cluster=spec.cluster or "", instruction=spec.instruction,
                          input_column=spec.input, target_column=spec.target, metric=spec.metric,
                          labels=spec.labels, sizes=spec.size_tuple(), seed=seed,
                          max_input_words=spec.max_input_words)


def _check_file(path: str | Path) -> tuple[TaskFile | None, list, _Checker]:
    """Parse and check a task file's structure: the spec of its well-formed tasks (None if there
    is no task list), their places, and the checker holding every problem found. Raises
    ``TaskFileError`` only when the file cannot be read at all (missing, wrong suffix, not YAML)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise TaskFileError(str(path), [Problem("", None, f"a task file is .yaml, .yml or .json, "
                                                          f"not {path.suffix or 'without a suffix'!r}")])
    if not path.is_file():
        raise TaskFileError(str(path), [Problem("", None, f"task file not found ({path.resolve()})")])
    data, lines, problems = _parse(path.read_text(encoding="utf-8"), path.suffix.lower(), str(path))
    check = _Checker(lines)
    check.problems += problems
    result = _check_structure(data, check, path.resolve().parent)
    if result is None:
        return None, [], check
    spec, places = result
    spec.path = str(path.resolve())
    return spec, places, check


def read_task_file(path: str | Path) -> TaskFile:
    """Read and check a task file's structure (not its data); raise ``TaskFileError`` listing
    every problem. Relative data paths become absolute (from the task file's folder)."""
    spec, _, check = _check_file(path)
    if spec is None or check.problems:
        raise TaskFileError(str(path), check.problems)
    return spec


def load_task_file(path: str | Path) -> tuple[TaskFile, list[Task]]:
    """Read a task file and every task's data; check it all, then build the tasks.

    Returns the ``TaskFile`` and the ``Task`` list in file order (``cluster`` is ``""`` for every
    task when the file leaves clusters to ``clustering``: ``workflow.resolve_clusters`` fills it
    in). Raises ``TaskFileError`` listing every problem: those of the structure, and those of the
    data of every well-formed task (so one run shows everything to fix).
    """
    spec, places, check = _check_file(path)
    if spec is None:
        raise TaskFileError(str(path), check.problems)
    tasks = [_check_data(check, where, origins, task, spec.seed)
             for (where, origins), task in zip(places, spec.tasks)]
    if check.problems:
        raise TaskFileError(str(path), check.problems)
    return spec, tasks


def load_tasks(spec: TaskFile) -> list[Task]:
    """The tasks of an already checked ``TaskFile`` (e.g. one saved with a trained framework),
    with their data read again; ``TaskFileError`` if the data no longer passes the checks."""
    check = _Checker({})
    tasks = [_check_data(check, ("tasks", i), {}, t, spec.seed) for i, t in enumerate(spec.tasks)]
    if check.problems:
        raise TaskFileError(spec.path or "the saved task definitions", check.problems)
    return tasks


def data_fingerprint(task: Task) -> dict[str, str]:
    """A short hash of every split's examples (inputs and targets, in order): saved with a trained
    framework so that evaluating it later can tell whether the data changed since training."""
    return {split: hashlib.sha256(json.dumps([[e.input, e.target] for e in task.split(split)])
                                  .encode()).hexdigest()[:16] for split in SPLITS}


# --- the example: a documented task file and a small synthetic CSV ---------------------------

EXAMPLE_TASK_FILE = """\
# A cgclora_lite task file: your own tasks, how to prompt and score them, and their clusters.
#
#   python -m cgclora_lite init --out my_tasks     # writes this file and a small synthetic tasks.csv
#   python -m cgclora_lite train --tasks-file my_tasks/tasks.yaml --out my_framework
#
# Every problem in this file, or in the data it points to, is reported at once (key path and
# line) before any model is loaded. Reference: docs/own-tasks.md.

version: 1
seed: 0                  # fixes how each task's rows are split into train / validation / test

defaults:                # keys every task gets unless it sets its own
  source: {file: tasks.csv, task_column: task}   # one CSV for all tasks: a row belongs to the task
                                                 # named in its `task` column (paths are relative
                                                 # to this file; .csv, .json or .jsonl)
  input: text            # the column that holds the input
  target: answer         # the column that holds the expected answer
  sizes: {train: 0.7, validation: 0.1, test: 0.2}   # fractions of the rows, or counts: {train: 40, ...}

tasks:
  - name: mood
    instruction: "How does the person in this sentence most likely feel? Answer with one word: happy or sad.\\n\\n{input}"
    metric: accuracy     # accuracy (labels), rouge_l (free text) or exact_match (short answers)
    labels: [happy, sad] # accuracy reads the label the answer begins with, ignoring case
    cluster: feelings    # tasks of one cluster share CGC-LoRA experts; clusters never touch

  - name: opposite
    instruction: "Give the opposite of this word. Answer with one word.\\n\\n{input}"
    metric: exact_match
    cluster: words

  - name: plural
    instruction: "Write the plural of this English noun. Answer with the plural only.\\n\\n{input}"
    metric: exact_match
    cluster: words

# To let the central model decide the clusters instead, delete every `cluster:` line and add
#   clustering: {n_clusters: 2, method: gradient}   # task affinity, then 2 clusters
#
# Other sources of rows, per task or in defaults:
#   source: reviews.csv                          # a whole file: every row is an example
#   source: {file: all.jsonl, task_column: kind, task_value: review}
#   source: {dataset: some/name, split: train}   # a `datasets` name (online) or a local folder
"""

_HAPPY = ["won the spelling contest", "got a puppy for a birthday present", "finished the marathon",
          "found a forgotten banknote in an old coat", "heard that the exam went well",
          "spent the afternoon laughing with friends", "got the job offer", "scored the winning goal",
          "received a kind letter from a cousin", "baked a cake that came out perfect",
          "was picked for the school play", "saw a rainbow over the harbour"]
_SAD = ["lost the spelling contest", "missed the last train home", "broke a favourite mug",
        "heard that the old dog had died", "failed the driving test again", "sat alone at lunch all week",
        "got a rejection letter", "watched the rain cancel the picnic", "lost the house keys",
        "dropped the phone into a lake", "said goodbye to a best friend who moved away",
        "burnt the cake for the party"]
_WHO = ["Anna", "My brother", "The old farmer", "Our neighbour", "Leo", "The new student", "Grandpa", "Priya"]
_WHEN = ["yesterday", "this morning", "last weekend", "on Friday"]
_OPPOSITES = ("hot cold,tall short,fast slow,open closed,early late,full empty,rich poor,strong weak,"
              "young old,wet dry,loud quiet,hard soft,clean dirty,thick thin,wide narrow,deep shallow,"
              "first last,buy sell,win lose,push pull,above below,inside outside,always never,"
              "true false,love hate,day night,north south,east west,left right,begin end,top bottom,"
              "cheap expensive,safe dangerous,remember forget,accept refuse,awake asleep,before after,"
              "near far,laugh cry,ancient modern,smooth rough,question answer,friend enemy,arrive leave,"
              "give take,sweet sour,heavy light,up down")
_PLURALS = ("cat cats,box boxes,city cities,child children,mouse mice,leaf leaves,tooth teeth,bus buses,"
            "baby babies,knife knives,foot feet,man men,woman women,dish dishes,glass glasses,"
            "party parties,wolf wolves,toy toys,key keys,potato potatoes,hero heroes,person people,"
            "goose geese,sheep sheep,fish fish,story stories,church churches,fox foxes,lady ladies,"
            "shelf shelves,tomato tomatoes,photo photos,piano pianos,ox oxen,cactus cacti,day days,"
            "wish wishes,berry berries,life lives,half halves")


def example_rows(seed: int = 0, mood_rows: int = 80) -> list[dict[str, str]]:
    """The example's synthetic rows (written for this package, no third-party text): columns
    ``task``, ``text``, ``answer``. ``mood`` (sentence -> happy / sad, ``mood_rows`` rows, half
    each), ``opposite`` (word -> its opposite, 48 rows) and ``plural`` (noun -> plural, 40 rows)."""
    rng = random.Random(seed)
    rows = []
    for label, events in (("happy", _HAPPY), ("sad", _SAD)):
        sentences = [f"{who} {event} {when}." for who in _WHO for event in events for when in _WHEN]
        rows += [{"task": "mood", "text": s, "answer": label}
                 for s in rng.sample(sentences, mood_rows // 2)]
    rows += [{"task": "opposite", "text": a, "answer": b}
             for a, b in (pair.split() for pair in _OPPOSITES.split(","))]
    rows += [{"task": "plural", "text": a, "answer": b}
             for a, b in (pair.split() for pair in _PLURALS.split(","))]
    return rows


def write_example(folder: str | Path) -> Path:
    """Write ``tasks.yaml`` (``EXAMPLE_TASK_FILE``) and its ``tasks.csv`` (``example_rows``) into
    ``folder``; returns the task file's path. Existing files are not overwritten."""
    import csv

    folder = Path(folder)
    existing = [str(f) for f in (folder / "tasks.yaml", folder / "tasks.csv") if f.exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} exist already: choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.yaml").write_text(EXAMPLE_TASK_FILE, encoding="utf-8")
    with open(folder / "tasks.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["task", "text", "answer"])
        writer.writeheader()
        writer.writerows(example_rows())
    return folder / "tasks.yaml"
