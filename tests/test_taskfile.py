"""Task files (``taskfile``) and the file loaders' bad-input errors (``tasks``): the example, every
problem reported at once with its key path and line, the data checks, the saved form, and clusters
found by affinity (tiny model, no hub)."""

import csv
import json
from pathlib import Path

import pytest

from cgclora_lite import tasks as T
from cgclora_lite.taskfile import (EXAMPLE_TASK_FILE, TaskFile, TaskFileError, data_fingerprint, example_rows,
                                   load_task_file, load_tasks, read_task_file, write_example)

ROOT = Path(__file__).parents[1]


def write_csv(path, rows, fields=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def problems(error: TaskFileError) -> dict[str, tuple]:
    """``{key path: (line, messages joined)}`` of every problem."""
    found: dict = {}
    for p in error.problems:
        line, text = found.get(p.path, (p.line, ""))
        found[p.path] = (line, f"{text} | {p.message}" if text else p.message)
    return found


# --- the example --------------------------------------------------------------------------

def test_the_repository_example_is_the_one_init_writes_and_it_loads(tmp_path):
    assert (ROOT / "examples" / "tasks.yaml").read_text() == EXAMPLE_TASK_FILE
    path = write_example(tmp_path / "mine")
    spec, tasks = load_task_file(path)
    assert [(t.name, t.cluster, t.metric) for t in tasks] == [
        ("mood", "feelings", "accuracy"), ("opposite", "words", "exact_match"),
        ("plural", "words", "exact_match")]
    assert [t.sizes() for t in tasks] == [{"train": 56, "validation": 8, "test": 16},
                                          {"train": 35, "validation": 4, "test": 9},
                                          {"train": 28, "validation": 4, "test": 8}]
    assert tasks[0].labels == ["happy", "sad"] and "{input}" in tasks[0].instruction
    assert spec.clustering is None and spec.seed == 0
    mood = [r for r in example_rows() if r["task"] == "mood"]
    assert sorted({r["answer"] for r in mood}) == ["happy", "sad"] and len(mood) == 80
    with pytest.raises(FileExistsError, match="exist already"):
        write_example(tmp_path / "mine")


def test_splits_are_deterministic_and_saved_specs_read_the_same_data(tmp_path):
    path = write_example(tmp_path)
    spec, tasks = load_task_file(path)
    _, again = load_task_file(path)
    assert [data_fingerprint(t) for t in tasks] == [data_fingerprint(t) for t in again]
    restored = TaskFile.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec
    assert [data_fingerprint(t) for t in load_tasks(restored)] == [data_fingerprint(t) for t in tasks]
    assert all(not set(map(str, t.test)) & set(map(str, t.train)) for t in tasks)  # no leak


# --- structure problems: every one, with its path and line ----------------------------------

BAD = """\
version: 1
seed: -1
defaults:
  input: text
  target: answer
tasks:
  - name: mood
    source: {file: tasks.csv, task_column: task}
    instruction: "How do they feel? {input}"
    metric: acuracy
    labels: [yes, no]
    cluster: a
  - name: mood
    source: missing.csv
    instruction: "no slot here"
    metric: exact_match
    cluster: b
  - name: plural
    source: {file: tasks.csv, task_column: task}
    instrucion: "{input}"
    metric: exact_match
  - name: opposite
    source: {file: tasks.csv, task_column: task}
    instruction: "{input}"
    metric: exact_match
    sizes: {train: 2, validation: 0, tset: 1}
    cluster: c
    cluster: d
"""


def test_every_structure_problem_is_reported_with_its_key_path_and_line(tmp_path):
    write_example(tmp_path)
    (tmp_path / "bad.yaml").write_text(BAD)
    with pytest.raises(TaskFileError) as caught:
        load_task_file(tmp_path / "bad.yaml")
    found = problems(caught.value)
    expected = {
        "seed": (2, "whole number >= 0"),
        "tasks[0].metric": (10, "did you mean 'accuracy'"),
        "tasks[0].labels[0]": (11, "YAML read True"),
        "tasks[0].labels[1]": (11, "YAML read False"),
        "tasks[1].name": (13, "'mood' is used twice: tasks[0] (cluster a) and tasks[1] (cluster b)"),
        "tasks[1].source.file": (14, "missing.csv not found"),
        "tasks[1].instruction": (15, "needs an {input} slot"),
        "tasks[2]": (18, "missing key 'instruction' (the prompt, with an {input} slot) | task 'plural' "
                         "names no cluster while others do"),
        "tasks[2].instrucion": (20, "did you mean 'instruction'"),
        "tasks[3].sizes.tset": (26, "did you mean 'test'"),
        "tasks[3].sizes": (26, "missing test"),
        "tasks[3].cluster": (28, "appears twice (also on line 27)"),
    }
    assert set(found) == set(expected)
    for path, (line, words) in expected.items():
        assert found[path][0] == line and words in found[path][1], (path, found[path])
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'bad.yaml'} has 13 problems:")
    assert "  tasks[1].source.file (line 14): data file missing.csv not found" in text
    assert [p.line for p in caught.value.problems] == sorted(p.line for p in caught.value.problems)
    with pytest.raises(TaskFileError):
        read_task_file(tmp_path / "bad.yaml")  # the structure alone already fails
    assert issubclass(TaskFileError, ValueError)


@pytest.mark.parametrize("text, path, words", [
    ("tasks: [", "", "not valid YAML"),
    ("", "", "nothing (the file is empty)"),
    ("tasks: []", "tasks", "non-empty list"),
    ("task: []", "task", "did you mean 'tasks'"),
    ("clustering: {n_clusters: 2}\ntasks:\n  - {name: a, source: d.csv, input: i, target: t, "
     "instruction: '{input}', metric: rouge_l, cluster: x}", "clustering", "would be ignored"),
    ("clustering: {n_clusters: 5, method: nearest}\ntasks:\n  - {name: a, source: d.csv, input: i, "
     "target: t, instruction: '{input}', metric: rouge_l}", "clustering.n_clusters", "from 1 to the number"),
    ("tasks:\n  - {name: 'a b', source: d.csv, input: i, target: t, instruction: '{input}', "
     "metric: accuracy, labels: [Very good, bad]}", "tasks[0].name", "letters, digits"),
    ("tasks:\n  - {name: a, source: d.csv, input: i, target: t, instruction: '{input}', metric: accuracy}",
     "tasks[0]", "accuracy needs labels"),
    ("tasks:\n  - {name: a, source: {file: d.csv, dataset: x}, input: i, target: t, "
     "instruction: '{input}', metric: rouge_l}", "tasks[0].source", "exactly one of file"),
    ("tasks:\n  - {name: a, source: d.csv, input: i, target: t, instruction: '{input}', metric: rouge_l, "
     "sizes: {train: 0.9, validation: 0.1, test: 0.0}}", "tasks[0].sizes.test", "test must be above 0"),
])
def test_structure_problems(tmp_path, text, path, words):
    write_csv(tmp_path / "d.csv", [{"i": "x", "t": "y"}])
    (tmp_path / "tasks.yaml").write_text(text)
    with pytest.raises(TaskFileError) as caught:
        load_task_file(tmp_path / "tasks.yaml")
    found = problems(caught.value)
    assert path in found and words in found[path][1], found


def test_labels_that_accuracy_cannot_tell_apart_are_refused(tmp_path):
    write_csv(tmp_path / "d.csv", [{"i": "x", "t": "Very good"}])
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n  - {name: a, source: d.csv, input: i, target: t, instruction: '{input}', "
        "metric: accuracy, labels: [Very good, very GOOD, bad, bad]}\n")
    with pytest.raises(TaskFileError) as caught:
        load_task_file(tmp_path / "tasks.yaml")
    messages = [p.message for p in caught.value.problems]
    assert any("labels ['Very good', 'very GOOD'] differ only in case" in m for m in messages)
    assert any("labels repeat ['bad']" in m for m in messages)


def test_labels_of_several_words_cases_and_scripts_are_accepted(tmp_path):
    rows = [{"i": f"x{n}", "t": label} for n in range(4) for label in ("Very good", "Sci-fi", "négatif")]
    write_csv(tmp_path / "d.csv", rows)
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n  - {name: a, source: d.csv, input: i, target: t, instruction: '{input}', "
        "metric: accuracy, labels: [Very good, Sci-fi, négatif], sizes: {train: 6, validation: 3, "
        "test: 3}}\n", encoding="utf-8")
    _, (task,) = load_task_file(tmp_path / "tasks.yaml")
    assert task.labels == ["Very good", "Sci-fi", "négatif"] and len(task.test) == 3


def test_json_task_files_are_read_and_their_duplicate_keys_reported(tmp_path):
    write_example(tmp_path)
    spec = {"defaults": {"source": {"file": "tasks.csv", "task_column": "task"}, "input": "text",
                         "target": "answer"},
            "tasks": [{"name": "plural", "instruction": "{input}", "metric": "exact_match"}]}
    (tmp_path / "tasks.json").write_text(json.dumps(spec))
    _, tasks = load_task_file(tmp_path / "tasks.json")
    assert [t.name for t in tasks] == ["plural"] and tasks[0].cluster == ""  # left to clustering
    (tmp_path / "dup.json").write_text('{"tasks": [], "tasks": [{"name": "x"}]}')
    with pytest.raises(TaskFileError, match="key 'tasks' appears twice in one JSON object"):
        load_task_file(tmp_path / "dup.json")
    with pytest.raises(TaskFileError, match=r"\.yaml, \.yml or \.json"):
        load_task_file(tmp_path / "tasks.csv")
    with pytest.raises(TaskFileError, match="task file not found"):
        load_task_file(tmp_path / "nope.yaml")


# --- data problems: every one, before any model loads ----------------------------------------

def test_every_data_problem_is_reported_at_once(tmp_path):
    write_example(tmp_path)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("text,answer\n")
    write_csv(tmp_path / "few.csv", [{"text": f"w{i}", "answer": f"W{i}"} for i in range(5)])
    write_csv(tmp_path / "cased.csv", [{"text": f"s{i}", "answer": ["Happy", "sad"][i % 2]} for i in range(20)])
    (tmp_path / "tasks.yaml").write_text("""\
defaults: {input: text, target: answer, source: {file: tasks.csv, task_column: task}}
tasks:
  - {name: mood, instruction: "{input}", metric: accuracy, labels: [happy]}
  - {name: opposite, instruction: "{input}", metric: exact_match, sizes: {train: 40, validation: 4, test: 9}}
  - {name: other, instruction: "{input}", metric: exact_match}
  - {name: empty, source: empty.csv, instruction: "{input}", metric: exact_match}
  - {name: header, source: header.csv, instruction: "{input}", metric: exact_match}
  - {name: few, source: few.csv, instruction: "{input}", metric: exact_match}
  - {name: column, source: few.csv, input: question, instruction: "{input}", metric: rouge_l}
  - {name: cased, source: cased.csv, instruction: "{input}", metric: accuracy, labels: [happy, sad]}
""")
    with pytest.raises(TaskFileError) as caught:
        load_task_file(tmp_path / "tasks.yaml")
    found = problems(caught.value)
    assert set(found) == {"tasks[0].labels", "tasks[1].sizes", "defaults.source", "tasks[3].source",
                          "tasks[4].source", "tasks[5].sizes", "tasks[6].input", "tasks[7].labels"}
    assert found["tasks[0].labels"][1] == ("task 'mood': 40 targets are not in labels ['happy']: 'sad' (40 "
                                           "rows); add them to labels or fix those rows")
    assert ("10 targets are not in labels ['happy', 'sad']: 'Happy' (10 rows) (labels are compared "
            "exactly: 'Happy' is not 'happy')") in found["tasks[7].labels"][1]
    assert "48 usable rows, but sizes ask for 40 + 4 + 9 = 53" in found["tasks[1].sizes"][1]
    assert "no row has task = 'other'; values found: mood, opposite, plural" in found["defaults.source"][1]
    assert found["defaults.source"][0] == 1
    assert "is empty: it has no header and no rows" in found["tasks[3].source"][1]
    assert "has a header (text, answer) but no rows" in found["tasks[4].source"][1]
    assert "5 usable rows: the fractions give train 5, validation 0, test 0" in found["tasks[5].sizes"][1]
    assert "column 'question' not found" in found["tasks[6].input"][1] and "its columns: text, answer" \
        in found["tasks[6].input"][1]


def test_rows_with_an_empty_input_or_target_are_skipped_and_counted(tmp_path):
    rows = [{"text": f"w{i}", "answer": f"W{i}" if i % 2 else ""} for i in range(10)]
    write_csv(tmp_path / "d.csv", rows)
    (tmp_path / "tasks.yaml").write_text(
        "tasks:\n  - {name: a, source: d.csv, input: text, target: answer, instruction: '{input}', "
        "metric: exact_match, sizes: {train: 4, validation: 0, test: 2}}\n")
    with pytest.raises(TaskFileError, match=r"5 usable rows \(5 skipped: empty input or target\), but sizes "
                                            r"ask for 4 \+ 0 \+ 2 = 6"):
        load_task_file(tmp_path / "tasks.yaml")


# --- the loaders of tasks.py: bad input is a ValueError naming the fix -----------------------

FILE_TASK = dict(name="toy", cluster="mine", instruction="Answer: {input}", input_column="q",
                 target_column="a", metric="exact_match")


def test_task_from_file_bad_inputs(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty: it has no header and no rows"):
        T.task_from_file(tmp_path / "empty.csv", **FILE_TASK)
    (tmp_path / "header.csv").write_text("q,a\n")
    with pytest.raises(ValueError, match=r"has a header \(q, a\) but no rows"):
        T.task_from_file(tmp_path / "header.csv", **FILE_TASK)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        T.task_from_file(tmp_path / "empty.jsonl", **FILE_TASK)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="no rows"):
        T.task_from_file(tmp_path / "list.json", **FILE_TASK)
    (tmp_path / "object.json").write_text('{"q": "x", "a": "y"}')
    with pytest.raises(ValueError, match="must hold a list of records"):
        T.task_from_file(tmp_path / "object.json", **FILE_TASK)
    with pytest.raises(FileNotFoundError, match="missing.csv not found"):
        T.task_from_file(tmp_path / "missing.csv", **FILE_TASK)
    write_csv(tmp_path / "rows.csv", [{"q": f"q{i}", "a": f"a{i}"} for i in range(6)])
    with pytest.raises(ValueError, match="column 'answer' not found .* available columns: q, a") as caught:
        T.task_from_file(tmp_path / "rows.csv", **{**FILE_TASK, "target_column": "answer"})
    assert isinstance(caught.value, KeyError) and not str(caught.value).startswith("'")  # old catchers
    with pytest.raises(ValueError, match=r"sizes ask for 4 \+ 1 \+ 2 = 7 examples, but .* has 6 usable rows"):
        T.task_from_file(tmp_path / "rows.csv", **FILE_TASK, sizes=(4, 1, 2))
    write_csv(tmp_path / "blank.csv", [{"q": "", "a": "x"}, {"q": "y", "a": ""}])
    with pytest.raises(ValueError, match="no row of .* has both an input"):
        T.task_from_file(tmp_path / "blank.csv", **FILE_TASK)


# --- clusters found by affinity ---------------------------------------------------------------

def test_open_clusters_are_found_on_the_central_model(tmp_path):
    from cgclora_lite.models import load_model
    from cgclora_lite.workflow import resolve_clusters

    write_example(tmp_path)
    text = EXAMPLE_TASK_FILE.replace("    cluster: feelings", "").replace("    cluster: words", "")
    (tmp_path / "auto.yaml").write_text(text + "clustering: {n_clusters: 2, method: gradient}\n")
    spec, tasks = load_task_file(tmp_path / "auto.yaml")
    assert [t.cluster for t in tasks] == ["", "", ""] and spec.clustering.n_clusters == 2
    model, tokenizer = load_model("tiny")
    found = resolve_clusters(model, tokenizer, tasks, spec.clustering, max_length=48, batch_size=2)
    assert sorted(map(sorted, found["clusters"].values())) in (
        [["mood"], ["opposite", "plural"]], [["mood", "opposite"], ["plural"]],
        [["mood", "plural"], ["opposite"]])
    assert found["affinity"]["tasks"] == ["mood", "opposite", "plural"]
    assert {t.cluster for t in tasks} == set(found["clusters"])
    assert resolve_clusters(model, tokenizer, tasks, spec.clustering) is None  # all named now
    for task in tasks:
        task.cluster = ""
    one = resolve_clusters(model, tokenizer, tasks, spec.clustering.__class__(n_clusters=1))
    assert one["clusters"] == {"cluster1": ["mood", "opposite", "plural"]} and one["affinity"] is None
