"""The experiment: budget rule, step split, seesaw table, and `run --preset tiny` end to end."""

import json

import pandas as pd
import pytest

from cgclora_lite.cli import main
from cgclora_lite.experiment import (
    CGC_METHODS,
    METHODS,
    PRESETS,
    method_clusters,
    method_config,
    modula_config,
    seesaw_table,
    split_steps,
)
from cgclora_lite.tasks import Task


def test_every_method_has_the_same_active_rank_and_scale():
    configs = {m: method_config(m) for m in CGC_METHODS}
    assert {c.r_active for c in configs.values()} == {8}
    assert {c.scaling for c in configs.values()} == {2.0}
    assert [configs[m].method for m in CGC_METHODS] == ["lora", "per-task lora", "moelora", "cgc-lora", "cgc-lora"]
    with pytest.raises(ValueError, match="unknown method"):
        method_config("adapter")
    for variant in ("flan", "res"):  # MoDULA's dense router computes every expert for every token
        modula = modula_config(f"modula-{variant}", n_domains=2)
        assert modula.rank_universal + 2 * modula.rank_domain == 8 and modula.variant == variant
    with pytest.raises(ValueError, match="does not split"):
        modula_config("modula-res", n_domains=3)


def test_clusters_and_step_split():
    tasks = [Task(n, c, "{input}", "accuracy") for n, c in
             [("a", "x"), ("b", "x"), ("c", "y"), ("d", "z"), ("e", "z")]]
    assert list(method_clusters("cgc-1+n", tasks)) == ["x", "y", "z"]
    assert list(method_clusters("moelora", tasks)) == ["all"]
    shares = split_steps(48, method_clusters("cgc-1+n", tasks))
    # 48 x (2, 1, 2) / 5 = 19.2, 9.6, 19.2: floors 19, 9, 19, the step left to the largest remainder
    assert shares == {"x": 19, "y": 10, "z": 19}


def test_seesaw_table_counts_losing_tasks():
    scores = {"per-task-lora": {"t1": 0.8, "t2": 0.5}, "lora": {"t1": 0.9, "t2": 0.3},
              "cgc-1+n": {"t1": 0.8, "t2": 0.6}}
    table = seesaw_table(scores, {"per-task-lora": 10, "lora": 5, "cgc-1+n": 7}, {"lora": 1.0})
    assert table.loc["lora", "tasks that lose"] == 1 and table.loc["cgc-1+n", "tasks that lose"] == 0
    assert table.loc["lora", "avg change vs per-task-lora"] == pytest.approx(-0.05)
    assert table.loc["cgc-1+n", "average"] == pytest.approx(0.7)
    assert pd.isna(table.loc["cgc-1+n", "train seconds"])


def test_run_tiny_preset_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.json", "results.md", "scores.png", "training_curves.png",
            "gates_moelora_all.png", "gates_cgc-1plus1_all.png", "gates_cgc-1plusn_classify.png",
            "gates_cgc-1plusn_generate.png"} <= files
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["base (zero-shot)", *METHODS]
    for method, result in metrics["methods"].items():
        assert set(result["scores"]) == {"topic", "sentiment", "headline", "trivia"}, method
        assert all(0 <= s["score"] <= 1 for s in result["scores"].values())
    assert metrics["methods"]["cgc-1+n"]["trainable_parameters"] > metrics["methods"]["lora"]["trainable_parameters"]
    steps = {c: len(h) for c, h in metrics["methods"]["cgc-1+n"]["history"].items()}
    assert steps == {"classify": 2, "generate": 2}  # 4 steps shared by task count
    stages = {c: len(h) for c, h in metrics["methods"]["modula-res"]["history"].items()}
    assert stages == {"universal": 1, "classify": 1, "generate": 1, "router": 1}
    for variant in ("modula-flan", "modula-res"):
        assert (out / "adapters" / variant / "modula_config.json").is_file()
    assert metrics["provenance"]["torch"] and metrics["provenance"]["model"] == "tiny_model(seed=0)"
    config = json.loads((out / "config.json").read_text())
    assert config["preset"]["name"] == "tiny" and "equal active rank" in config["budget_rule"]
    results = (out / "results.md").read_text()
    assert all(f"| {m} |" in results for m in METHODS)
    assert "| method |" in capsys.readouterr().out  # the table is printed


def test_export_a_task_of_a_tiny_run(tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cgclora_lite.framework import OnePlusN
    from cgclora_lite.models import tiny_model

    run = tmp_path / "run"
    main(["run", "--preset", "tiny", "--methods", "cgc-1+n", "--out", str(run), "--quiet"])
    assert main(["export", "--run", str(run), "--task", "sentiment", "--out", str(tmp_path / "p")]) == 0
    assert main(["export", "--run", str(run), "--task", "trivia", "--format", "merged",
                 "--out", str(tmp_path / "m")]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    framework = OnePlusN.load(run / "adapters" / "cgc-1+n")
    ids = torch.tensor([[5, 6, 7, 8]])
    framework.activate("classify")
    expected = framework.model(ids, task_ids=["sentiment"]).logits
    peft_model = PeftModel.from_pretrained(tiny_model(seed=0), tmp_path / "p")
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    framework.activate("generate")
    expected = framework.model(ids, task_ids=["trivia"]).logits
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit, match="saved adapters for \\['cgc-1\\+n'\\]"):
        main(["export", "--run", str(run), "--method", "lora", "--task", "topic", "--out", str(tmp_path / "x")])


def test_run_rejects_unknown_tasks(tmp_path):
    with pytest.raises(SystemExit):
        main(["run", "--preset", "tiny", "--tasks", "summary", "--out", str(tmp_path)])


def test_presets_are_sized_as_documented():
    assert PRESETS["cpu"].model is None and PRESETS["tiny"].model == "tiny"
    assert PRESETS["gpu"].steps > PRESETS["cpu"].steps
