"""Your own tasks through the command line (``cli.main``), end to end on the tiny model: a CSV of
two new tasks and a task file, then ``train``, ``evaluate``, ``predict`` and ``export``; the peft
export gives the framework's logits; every kind of bad input stops with a clear message before any
model loads. The same path on the embedded model is the slow test at the end."""

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from cgclora_lite import CheckpointError, cli
from cgclora_lite.cli import main
from cgclora_lite.framework import OnePlusN
from cgclora_lite.models import load_tokenizer, tiny_model

ROOT = Path(__file__).parents[1]

TASK_FILE = """\
defaults:
  source: {file: numbers.csv, task_column: kind}
  input: question
  target: answer
tasks:
  - name: parity
    instruction: "Is this number even or odd? Answer with one word.\\n\\n{input}"
    metric: accuracy
    labels: [even, odd]
    sizes: {train: 24, validation: 4, test: 8}
    cluster: numbers
  - name: double
    instruction: "Write twice this number, in digits.\\n\\n{input}"
    metric: exact_match
    sizes: {train: 24, validation: 4, test: 8}
    cluster: arithmetic
"""


def number_rows() -> list[dict]:
    """Two synthetic tasks: a number -> even / odd, and a number -> twice it."""
    rows = [{"kind": "parity", "question": str(n), "answer": "even" if n % 2 == 0 else "odd"} for n in range(40)]
    rows += [{"kind": "double", "question": str(n), "answer": str(2 * n)} for n in range(40)]
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_tasks(folder: Path, text: str = TASK_FILE, rows: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "numbers.csv", rows or number_rows())
    (folder / "tasks.yaml").write_text(text)
    return folder / "tasks.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A framework trained through ``train`` on the tiny model (long enough for task-specific answers)."""
    root = tmp_path_factory.mktemp("own")
    tasks_file = write_tasks(root / "data")
    out = root / "fw"
    assert main(["train", "--tasks-file", str(tasks_file), "--model", "tiny", "--steps", "30", "--lr",
                 "0.05", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    return tasks_file, out


def test_train_writes_the_framework_folder(trained):
    tasks_file, out = trained
    assert {p.name for p in out.iterdir()} == {"framework.json", "clusters", "history.json", "tasks.json",
                                               "train.json", "training_curves.png"}
    record = json.loads((out / "train.json").read_text())
    assert record["method"] == "cgc-1+n" and record["clusters"] == {"numbers": ["parity"],
                                                                   "arithmetic": ["double"]}
    assert record["batch_sizes"] == {"numbers": 2, "arithmetic": 2}  # 4 // 2 tasks each per step
    assert record["settings"]["steps"] == 30 and record["provenance"]["model"] == "tiny_model(seed=0)"
    meta = json.loads((out / "framework.json").read_text())
    base_parameters = sum(p.numel() for p in tiny_model(seed=0).parameters())  # before any adapter
    assert meta["provenance"]["torch"] and meta["central_model_fingerprint"]["parameters"] == base_parameters
    history = json.loads((out / "history.json").read_text())
    assert {c: len(h) for c, h in history.items()} == {"numbers": 30, "arithmetic": 30}
    assert history["numbers"][-1]["loss"] < history["numbers"][0]["loss"]
    saved = json.loads((out / "tasks.json").read_text())
    assert saved["task_file"]["path"] == str(tasks_file.resolve())
    assert saved["sizes"]["parity"] == {"train": 24, "validation": 4, "test": 8}


def test_evaluate_prints_the_table_and_writes_every_answer(trained, capsys):
    _, out = trained
    assert main(["evaluate", "--framework", str(out), "--zero-shot", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| task | cluster | metric | n | score [95% CI] | zero-shot [95% CI] | gain [95% CI] |" in printed
    assert re.search(r"\| parity \| numbers \| accuracy \| 8 \| \d\.\d{3} \[", printed)
    result = json.loads((out / "evaluation_test.json").read_text())
    rows = {row["task"]: row for row in result["table"]}
    assert set(rows) == {"parity", "double"}
    for row in rows.values():
        assert row["low"] <= row["score"] <= row["high"] and row["n"] == 8
    assert len(result["results"]["trained"]["parity"]["answers"]) == 8
    framework = OnePlusN.load(out)  # the same scores as the library gives
    from cgclora_lite.workflow import framework_tasks

    scores = framework.evaluate(framework_tasks(out))
    assert {t: s["score"] for t, s in scores.items()} == {t: r["score"] for t, r in rows.items()}


def test_predict_routes_every_row_to_its_own_task(trained, tmp_path, capsys):
    _, out = trained
    rows = [{"task": task, "input": str(n)} for n in (3, 8, 11) for task in ("parity", "double")]
    write_csv(tmp_path / "requests.csv", rows)
    assert main(["predict", "--framework", str(out), "--file", str(tmp_path / "requests.csv"), "--out",
                 str(tmp_path / "answers.jsonl"), "--quiet"]) == 0
    answered = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [(a["task"], a["input"]) for a in answered] == [(r["task"], r["input"]) for r in rows]
    framework = OnePlusN.load(out)
    for task in ("parity", "double"):
        alone = framework.generate(task, ["3", "8", "11"])
        assert [a["answer"] for a in answered if a["task"] == task] == alone
    parity = [a["answer"] for a in answered if a["task"] == "parity"]
    double = [a["answer"] for a in answered if a["task"] == "double"]
    assert parity != double  # the tasks answer differently: routing matters
    capsys.readouterr()
    assert main(["predict", "--framework", str(out), "--task", "double", "--input", "3", "--input", "8",
                 "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == double[:2]


def test_export_peft_gives_the_framework_logits(trained, tmp_path, capsys):
    from peft import PeftModel

    _, out = trained
    assert main(["export", "--framework", str(out), "--task", "double", "--format", "peft", "--out",
                 str(tmp_path / "double_lora")]) == 0
    assert "AutoPeftModelForCausalLM" in capsys.readouterr().out
    framework = OnePlusN.load(out)
    ids = load_tokenizer()("Write twice this number: 12", return_tensors="pt").input_ids
    framework.activate("arithmetic")
    expected = framework.model(ids, task_ids=["double"]).logits
    peft_model = PeftModel.from_pretrained(tiny_model(seed=0), tmp_path / "double_lora").eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    readme = (tmp_path / "double_lora" / "README.md").read_text()
    assert "--enable-lora --lora-modules double=" in readme and "Write twice this number, in digits." in readme
    assert "AutoPeftModelForCausalLM.from_pretrained" in readme


def test_export_of_the_embedded_model_names_its_cached_folder(tmp_path, monkeypatch):
    """The adapter's base must be loadable: for the embedded model, its cache folder (a stand-in
    tiny model saved under that name here), with the hub name and the GGUF caveat in the README."""
    from peft import AutoPeftModelForCausalLM

    from cgclora_lite import CGCConfig
    from cgclora_lite.models import EMBEDDED_MODEL
    from cgclora_lite.tasks import Task

    tokenizer = load_tokenizer()  # the real one, before the cache points to the stand-in
    monkeypatch.setenv("CGCLORA_CACHE", str(tmp_path / "cache"))
    tiny_model(seed=3).save_pretrained(tmp_path / "cache" / EMBEDDED_MODEL)
    model = tiny_model(seed=3)
    model.name_or_path = model.config.name_or_path = EMBEDDED_MODEL
    framework = OnePlusN(model, tokenizer)
    cluster = framework.add_cluster("c", [Task("t", "c", "Say: {input}", "rouge_l")], CGCConfig())
    with torch.no_grad():
        for p in cluster.adapters.parameters():
            p.normal_(std=0.3)
    framework.export("t", tmp_path / "t_lora")
    config = json.loads((tmp_path / "t_lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "cache" / EMBEDDED_MODEL)
    readme = (tmp_path / "t_lora" / "README.md").read_text()
    assert f"HuggingFaceTB/{EMBEDDED_MODEL}" in readme and "Q4_1 GGUF" in readme
    assert "not the hub's original ones" in readme
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    expected = model(ids, task_ids=["t"]).logits
    served = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "t_lora").eval()
    torch.testing.assert_close(served(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


# --- bad input: a clear message, before any model loads -----------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any command loads a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    import cgclora_lite.models
    import cgclora_lite.workflow

    for module in (cli, cgclora_lite.workflow, cgclora_lite.models):
        monkeypatch.setattr(module, "load_model", refuse)


def bad(text=TASK_FILE, rows=None, extra=None):
    return {"text": text, "rows": rows, "extra": extra or {}}


BAD_INPUTS = {
    "empty data file": (bad(text=TASK_FILE.replace("numbers.csv", "empty.csv"), extra={"empty.csv": ""}),
                        "empty.csv is empty: it has no header and no rows"),
    "header only": (bad(text=TASK_FILE.replace("numbers.csv", "header.csv"),
                        extra={"header.csv": "kind,question,answer\n"}),
                    "has a header (kind, question, answer) but no rows"),
    "too few examples": (bad(text=TASK_FILE.replace("{train: 24, validation: 4, test: 8}\n    cluster: arith",
                                                    "{train: 34, validation: 4, test: 8}\n    cluster: arith")),
                         "task 'double' has 40 usable rows, but sizes ask for 34 + 4 + 8 = 46"),
    "duplicate names across clusters": (bad(text=TASK_FILE.replace("name: double", "name: parity")),
                                        "task name 'parity' is used twice: tasks[0] (cluster numbers) and "
                                        "tasks[1] (cluster arithmetic)"),
    "labels outside": (bad(rows=number_rows() + [{"kind": "parity", "question": "x", "answer": "maybe"}]),
                       "1 targets are not in labels ['even', 'odd']: 'maybe' (1 rows)"),
    "missing file": (bad(text=TASK_FILE.replace("numbers.csv", "numbres.csv")),
                     "data file numbres.csv not found"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_task_files_stop_train_before_the_model_loads(case, tmp_path, no_model_load):
    spec, message = BAD_INPUTS[case]
    tasks_file = write_tasks(tmp_path, spec["text"], spec["rows"])
    for name, content in spec["extra"].items():
        (tmp_path / name).write_text(content)
    with pytest.raises(SystemExit) as caught:
        main(["train", "--tasks-file", str(tasks_file), "--model", "tiny", "--out", str(tmp_path / "fw")])
    assert str(caught.value).startswith(f"error: {tasks_file} has ") and message in str(caught.value)
    assert not (tmp_path / "fw").exists()


def test_other_bad_train_options_stop_before_the_model_loads(trained, tmp_path, no_model_load):
    tasks_file, out = trained
    with pytest.raises(SystemExit, match="cannot hold one example of each of the 2 tasks"):
        main(["train", "--tasks-file", str(tasks_file), "--batch-size", "1", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="already holds a trained framework"):
        main(["train", "--tasks-file", str(tasks_file), "--out", str(out)])
    with pytest.raises(SystemExit):  # argparse: MoDULA has no per-task adapter to save
        main(["train", "--tasks-file", str(tasks_file), "--method", "modula-res", "--out", str(tmp_path / "b")])


def test_predict_and_export_check_their_input_before_the_model_loads(trained, tmp_path, no_model_load):
    _, out = trained
    write_csv(tmp_path / "mixed.csv", [{"task": "parity", "input": "3"}, {"task": "triple", "input": "3"},
                                       {"task": "double", "input": " "}])
    with pytest.raises(SystemExit, match=r"unknown task 'triple' in rows 2; this framework answers parity, double"):
        main(["predict", "--framework", str(out), "--file", str(tmp_path / "mixed.csv")])
    with pytest.raises(SystemExit, match=r"rows 3 have an empty input"):
        main(["predict", "--framework", str(out), "--file", str(tmp_path / "mixed.csv"), "--task", "parity"])
    write_csv(tmp_path / "plain.csv", [{"text": "3"}])
    with pytest.raises(SystemExit, match="column 'input' not found .* --input-column"):
        main(["predict", "--framework", str(out), "--file", str(tmp_path / "plain.csv")])
    with pytest.raises(SystemExit, match="has no 'task' column .* give --task NAME"):
        main(["predict", "--framework", str(out), "--file", str(tmp_path / "plain.csv"), "--input-column", "text"])
    with pytest.raises(SystemExit, match="--input needs --task"):
        main(["predict", "--framework", str(out), "--input", "3"])
    with pytest.raises(SystemExit, match="has no task 'triple'; its tasks: parity, double"):
        main(["export", "--framework", str(out), "--task", "triple", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="is not a trained framework folder"):
        main(["evaluate", "--framework", str(tmp_path)])


def test_a_framework_from_another_model_is_refused(trained, tmp_path):
    _, out = trained
    with pytest.raises(SystemExit, match=r"was trained on the central model 'tiny_model\(seed=0\)', but the "
                                         r"model given \('tiny_model\(seed=1\)'\) has other weights.*drop --model"):
        main(["evaluate", "--framework", str(out), "--model", "tiny_model(seed=1)", "--quiet"])
    tokenizer = load_tokenizer()
    with pytest.raises(CheckpointError, match="has other weights"):  # another size: caught before any shape
        OnePlusN.load(out, tiny_model(seed=0, hidden_size=32, num_heads=2, num_kv_heads=1), tokenizer)
    bf16 = tiny_model(seed=0).to(torch.bfloat16)  # the same weights in another precision are accepted
    assert list(OnePlusN.load(out, bf16, tokenizer).clusters) == ["numbers", "arithmetic"]


def test_the_fingerprint_samples_large_tensors_to_their_last_element():
    """Sampled positions are computed in integers: a float32 linspace overshoots past 2**24
    elements (the embedded model's embedding has 28M)."""
    from torch import nn

    from cgclora_lite.framework import model_fingerprint

    n = 2**24 + 4  # the last index, 2**24 + 3, is not a float32
    module = nn.Module()
    module.big = nn.Parameter(torch.randn(n), requires_grad=False)
    card = model_fingerprint(module, samples=3)
    picked = [module.big[i].item() for i in (0, (n - 1) // 2, n - 1)]
    assert card["parameters"] == n and card["values"][0][0] == "big"
    assert card["values"][0][1] == [round(v, 6) for v in picked]


def test_evaluate_refuses_data_that_changed_since_training(trained, tmp_path):
    tasks_file, out = trained
    copy = tmp_path / "fw"
    shutil.copytree(out, copy)
    rows = number_rows()
    rows[45]["answer"] = "9999"  # a double row
    changed = write_csv(tmp_path / "numbers.csv", rows)
    saved = json.loads((copy / "tasks.json").read_text())
    for task in saved["task_file"]["tasks"]:
        task["source"]["file"] = str(changed)
    (copy / "tasks.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"task 'double': the (train|validation|test).* examples read from .* "
                                         r"differ from those the framework was trained with"):
        main(["evaluate", "--framework", str(copy), "--quiet"])
    # --tasks-file scores on another file's data instead (here: the original one)
    assert main(["evaluate", "--framework", str(copy), "--tasks-file", str(tasks_file), "--tasks", "parity",
                 "--out", str(tmp_path / "eval.json"), "--quiet"]) == 0
    assert [row["task"] for row in json.loads((tmp_path / "eval.json").read_text())["table"]] == ["parity"]


def test_run_compares_the_methods_on_a_task_file(tmp_path):
    tasks_file = write_tasks(tmp_path / "data")
    metrics = cli.run_experiment(cli.PRESETS["tiny"], ["cgc-1+n"], out=tmp_path / "run", progress=False,
                                 tasks_file=tasks_file)
    for method, runs in metrics["runs"].items():
        assert set(runs[0]["scores"]) == {"parity", "double"}, method
    assert metrics["runs"]["cgc-1+n"][0]["clusters"] == {"numbers": ["parity"], "arithmetic": ["double"]}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["tasks_file"] == str(tasks_file) and config["tasks"]["double"]["test"] == 8


def test_every_command_explains_itself(capsys):
    for command, words in {"init": "synthetic", "train": "every problem is listed at once",
                           "evaluate": "bootstrap interval", "predict": "routed",
                           "export": "serve", "run": "--tasks-file"}.items():
        with pytest.raises(SystemExit) as caught:
            main([command, "--help"])
        assert caught.value.code == 0
        assert words in " ".join(capsys.readouterr().out.split()), command


def test_the_readme_section_runs_as_written(tmp_path, monkeypatch, capsys):
    """The shell commands of README.md's "Bring your own tasks", run in order, on the tiny model
    (``train`` gets ``--model tiny --steps 4``; every command ``--quiet`` where it has one)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Bring your own tasks"):]
    section = section[:section.index("\n## ", 3)]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert [c[3] for c in commands] == ["init", "train", "evaluate", "predict", "export"]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert command[:3] == ["python", "-m", "cgclora_lite"]
        args = command[3:]
        if args[0] == "train":
            args += ["--model", "tiny", "--steps", "4"]
        if args[0] != "init" and args[0] != "export":
            args += ["--quiet"]
        assert main(args) == 0, command
    assert (tmp_path / "mood_lora" / "adapter_config.json").is_file()
    assert "| mood | feelings | accuracy |" in capsys.readouterr().out


# --- the embedded model ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_few_dozen_steps_on_the_embedded_model_beat_zero_shot(tmp_path, capsys):
    """The same path on the embedded SmolLM2: two new tasks (synthetic, from the example data) in
    one CGC-LoRA cluster, 40 steps of 8 examples, then the trained framework against the central
    model alone on the test split, and the exported adapter served by peft from the model's cached
    folder."""
    from peft import AutoPeftModelForCausalLM

    from cgclora_lite.taskfile import example_rows

    rows = [r for r in example_rows() if r["task"] in ("mood", "opposite")]
    write_csv(tmp_path / "tasks.csv", rows)
    (tmp_path / "tasks.yaml").write_text("""\
defaults: {source: {file: tasks.csv, task_column: task}, input: text, target: answer}
tasks:
  - name: mood
    instruction: "How does the person in this sentence feel?\\n\\n{input}"
    metric: accuracy
    labels: [happy, sad]
    sizes: {train: 56, validation: 4, test: 20}
    cluster: new
  - name: opposite
    instruction: "What is the opposite of this word?\\n\\n{input}"
    metric: exact_match
    sizes: {train: 32, validation: 4, test: 12}
    cluster: new
""")
    out = tmp_path / "fw"
    assert main(["train", "--tasks-file", str(tmp_path / "tasks.yaml"), "--out", str(out), "--steps", "40",
                 "--batch-size", "8", "--lr", "2e-3", "--max-length", "64", "--quiet"]) == 0
    assert main(["evaluate", "--framework", str(out), "--zero-shot", "--quiet"]) == 0
    print(capsys.readouterr().out)
    table = {row["task"]: row for row in json.loads((out / "evaluation_test.json").read_text())["table"]}
    for task, row in table.items():
        print(f"{task}: zero-shot {row['zero-shot']:.3f} -> trained {row['score']:.3f}")
        assert row["score"] > row["zero-shot"], task
    assert sum(row["gain"] for row in table.values()) / len(table) >= 0.2

    assert main(["export", "--framework", str(out), "--task", "mood", "--out", str(tmp_path / "mood_lora")]) == 0
    framework = OnePlusN.load(out)
    ids = framework.tokenizer("How does the person feel? Anna won.", return_tensors="pt").input_ids
    framework.activate("new")
    expected = framework.model(ids, task_ids=["mood"]).logits
    served = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "mood_lora").eval()
    torch.testing.assert_close(served(input_ids=ids).logits, expected, rtol=1e-3, atol=1e-3)
