"""The experiment: budget rule, step split, seesaw table, and `run --preset tiny` end to end."""

import json
import re

import pandas as pd
import pytest

from cgclora_lite.cli import main
from cgclora_lite.experiment import (
    CGC_METHODS,
    METHODS,
    PRESETS,
    load_tasks,
    method_clusters,
    method_config,
    modula_config,
    cluster_batches,
    seesaw_table,
)
from cgclora_lite.inject import count_parameters
from cgclora_lite.models import tiny_model
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


def test_clusters_and_the_examples_per_task_budget():
    tasks = [Task(n, c, "{input}", "accuracy") for n, c in
             [("a", "x"), ("b", "x"), ("c", "y"), ("d", "z"), ("e", "z")]]
    assert list(method_clusters("cgc-1+n", tasks)) == ["x", "y", "z"]
    assert list(method_clusters("moelora", tasks)) == ["all"]
    # 10 // 5 = 2 examples of each task per step: a cluster of T_c tasks trains on 2 * T_c
    assert cluster_batches(10, method_clusters("cgc-1+n", tasks)) == {"x": 4, "y": 2, "z": 4}
    assert cluster_batches(10, method_clusters("lora", tasks)) == {"all": 10}
    assert cluster_batches(8, {"all": tasks}) == {"all": 5}  # 8 // 5 = 1 of each
    with pytest.raises(ValueError, match="at least 5"):
        cluster_batches(4, {"all": tasks})


def _run(scores: dict[str, list[float]], seconds=None) -> dict:
    """A run_method-like result with per-example scores."""
    return {"scores": {t: {"score": sum(v) / len(v), "per_example": v} for t, v in scores.items()},
            "trainable_parameters": 7, "train_seconds": seconds}


def test_seesaw_table_intervals_and_losing_tasks():
    ones = [1.0] * 40
    half = [1.0, 0.0] * 20
    runs = {
        "per-task-lora": [_run({"t1": half, "t2": ones})],
        "lora": [_run({"t1": ones, "t2": half}, seconds=3.0)],  # t2 loses clearly, t1 wins
        "cgc-1+n": [_run({"t1": half, "t2": [1.0] * 39 + [0.0]})],  # t2 one answer below: noise
    }
    table = seesaw_table(runs)
    assert table.loc["lora", "tasks that lose"] == 1 and table.loc["lora", "tasks below reference"] == 1
    assert table.loc["cgc-1+n", "tasks that lose"] == 0 and table.loc["cgc-1+n", "tasks below reference"] == 1
    assert table.loc["lora", "avg change vs per-task-lora"] == pytest.approx(0.0)
    assert table.loc["lora", "t2 change high"] < 0 < table.loc["lora", "t1 change low"]
    assert table.loc["cgc-1+n", "average"] == pytest.approx((0.5 + 39 / 40) / 2)
    assert table.loc["per-task-lora", "t1 low"] < 0.5 < table.loc["per-task-lora", "t1 high"]
    assert table.loc["per-task-lora", "t2 low"] == table.loc["per-task-lora", "t2 high"] == 1.0
    assert table.loc["lora", "train seconds"] == 3.0 and pd.isna(table.loc["cgc-1+n", "train seconds"])


def test_run_tiny_preset_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--out", str(out), "--quiet", "--methods", "all"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.json", "results.md", "scores.png", "validation_curves.png",
            "gates_moelora_all.png", "gates_cgc-1plus1_all.png", "gates_cgc-1plusn_classify.png",
            "gates_cgc-1plusn_generate.png", "contributions_cgc-1plusn_classify.png"} <= files
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["runs"]) == ["base (zero-shot)", *METHODS]
    for method, (result,) in metrics["runs"].items():
        assert set(result["scores"]) == {"topic", "sentiment", "headline", "trivia"}, method
    (cgc,), (lora,) = metrics["runs"]["cgc-1+n"], metrics["runs"]["lora"]
    # every CGC method's whole framework, counted from the shapes: one adapter set per cluster
    # (1+N: two clusters of two tasks; the others: one cluster of four) of its budget config
    shapes = tiny_model(seed=0)
    for method in CGC_METHODS:
        clusters = {"cgc-1+n": [2, 2]}.get(method, [4])
        expected = sum(count_parameters(shapes, method_config(method), n)["trainable"] for n in clusters)
        assert metrics["runs"][method][0]["trainable_parameters"] == expected, method
    trained = {c: [r["step"] for r in h if "loss" in r] for c, h in cgc["history"].items()}
    assert trained == {"classify": [1, 2, 3, 4], "generate": [1, 2, 3, 4]}  # every set: all steps
    (modula,) = metrics["runs"]["modula-res"]
    stages = {c: len(h) for c, h in modula["history"].items()}
    assert stages == {"universal": 1, "classify": 1, "generate": 1, "router": 1}
    for variant in ("modula-flan", "modula-res"):
        assert (out / "adapters" / variant / "seed0" / "modula_config.json").is_file()
    prov = metrics["provenance"]
    assert prov["model"] == "tiny_model(seed=0)" and prov["seeds"] == [0] and "autocast" in prov
    assert cgc["seconds_per_step"] == pytest.approx(cgc["train_seconds"] / 8)  # 2 sets x 4 steps
    assert lora["seconds_per_step"] == pytest.approx(lora["train_seconds"] / 4)
    config = json.loads((out / "config.json").read_text())
    assert config["preset"]["name"] == "tiny" and "equal steps" in config["budget_rule"]
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
    framework = OnePlusN.load(run / "adapters" / "cgc-1+n" / "seed0")
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
    """docs/experiment.md's preset table: steps x examples per step, prompt tokens, lr, and the
    per-task sizes (trivia's from load_tasks: at most half its pairs for training, the rest tested)."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "experiment.md").read_text()
    documented = {}
    for line in text.splitlines():
        match = re.match(r"\| `(\w+)` \| (.*?) \| (.*?) \| (\d+) x (\d+) \| (\d+) \| ([\d.e-]+) \|$", line)
        if match:
            name, model, sizes, steps, batch, length, lr = match.groups()
            documented[name] = (model, sizes, int(steps), int(batch), int(length), float(lr))
    assert set(documented) == set(PRESETS)
    for name, (model, sizes, steps, batch, length, lr) in documented.items():
        preset = PRESETS[name]
        assert (preset.steps, preset.batch_size, preset.max_length, preset.lr) == (steps, batch, length, lr)
        assert (preset.model == "tiny") == model.startswith("random tiny")
        assert f"{preset.train:,} train" in sizes and f"{preset.validation} validation" in sizes
    assert "test: topic 200, sentiment 200, headline 100" in documented["cpu"][1]
    assert PRESETS["cpu"].test == {"topic": 200, "sentiment": 200, "headline": 100, "trivia": None}
    (trivia,) = load_tasks(PRESETS["cpu"], ["trivia"])
    assert trivia.sizes() == {"train": 130, "validation": 24, "test": 106}
    assert "240 train (trivia 130)" in documented["cpu"][1] and "(106)" in documented["cpu"][1]


def test_method_config_builds_each_methods_experts_from_rank_alpha_and_gate_options():
    shapes = {  # method: (common ranks, specific ranks per task, gated): the budget rule by hand
        "lora": ((12,), (), False), "per-task-lora": ((), (12,), False), "moelora": ((2,) * 6, (), True),
        "cgc-1+1": ((3, 3), (3, 3), True), "cgc-1+n": ((3, 3), (3, 3), True)}
    for method, (common, specific, gated) in shapes.items():
        config = method_config(method, r_active=12, alpha=6.0, gate_norm="scaled", gate_lr_scale=3.0)
        assert (config.common_ranks, config.specific_ranks) == (common, specific), method
        assert config.r_active == 12 and config.scaling == 0.5, method
        assert (config.gate, config.gate_norm, config.gate_lr_scale) == (
            ("task", "scaled", 3.0) if gated else ("none", "softmax", 1.0)), method
        default = method_config(method)  # the paper's gate at the adapters' rate
        assert (default.gate_norm, default.gate_lr_scale) == ("softmax", 1.0)
    with pytest.raises(ValueError, match="r_active must be a multiple of 4 for the gated methods, got 6"):
        method_config("cgc-1+n", r_active=6)


@pytest.mark.parametrize("amp, expected", [("0", "none"), ("1", "bfloat16")])
def test_autocast_name_is_what_training_and_scoring_use(monkeypatch, amp, expected):
    from torch import nn

    from cgclora_lite.experiment import autocast_name

    monkeypatch.setenv("CGCLORA_AMP", amp)  # overrides amp="auto", as the notebooks' tests do
    assert autocast_name(nn.Linear(2, 2), PRESETS["tiny"]) == expected
