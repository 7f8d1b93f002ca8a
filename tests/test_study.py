"""The study: its arms, the positive control's task, one arm end to end on the tiny model, and
the report rebuilt from the JSON alone."""

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from cgclora_lite.experiment import PRESETS
from cgclora_lite.stats import Bootstrap
from cgclora_lite.study import GROUPS, arms, best_gate, flipped, rank_choice, reference_arm, report, run_study
from cgclora_lite.tasks import Example, Task


def test_the_arms_cover_the_issue_s_ablations():
    plan = arms(GROUPS, PRESETS["cpu"])
    names = {(a.group, a.name) for a in plan}
    assert {("gate", f"{n} x{s}") for n in ("softmax", "scaled") for s in (1, 10, 100)} <= names
    assert ("gate", "gate off") in names
    assert {a.name for a in plan if a.group == "split"} == {f"K_c={c}, K_s={4 - c}" for c in (1, 2, 3, 4)}
    assert {a.method for a in plan if a.group == "methods"} >= {"lora", "per-task-lora", "cgc-1+n", "modula-res"}
    assert {a.preset["steps"] for a in plan if a.group == "budget"} == {72, 288}
    assert {a.preset["r_active"] for a in plan if a.group == "capacity"} == {2, 4, 16}
    # below r_active 4 cgc-1+n's four experts do not exist: one common and one specific of rank 1
    (small,) = [a for a in plan if a.name == "cgc-1+n, r_active 2"]
    assert small.method is None and small.preset == {"r_active": 2, "alpha": 4.0}
    assert small.config == dict(n_common=1, n_specific=1, rank_common=1, rank_specific=1)
    assert reference_arm(asdict(small), [a.name for a in plan if a.group == "capacity"]) == "per-task-lora, r_active 2"
    assert [a.method for a in plan if a.name.endswith("r_active 4")] == ["lora", "per-task-lora", "cgc-1+n"]
    with pytest.raises(ValueError, match="unknown study groups"):
        arms(["seesaw"], PRESETS["cpu"])


def test_the_positive_control_swaps_negative_and_positive_only():
    task = Task("sentiment", "classify", "Sentiment? {input}", "accuracy",
                labels=["negative", "neutral", "positive"],
                train=[Example("a", "negative", "sentiment"), Example("b", "neutral", "sentiment")],
                test=[Example("c", "positive", "sentiment")])
    copy = flipped(task)
    assert copy.name == "flipped" and copy.instruction == task.instruction
    assert [e.target for e in copy.train] == ["positive", "neutral"] and copy.test[0].target == "negative"
    assert [e.input for e in copy.train] == ["a", "b"]


def test_a_study_on_the_tiny_model_writes_json_and_a_report_that_the_json_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("CGCLORA_AMP", "0")  # full precision, recorded in the provenance
    out = tmp_path / "results"
    study = run_study(PRESETS["tiny"], groups=["control"], seeds=[0], out=out)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [a["name"] for a in saved["arms"]] == ["lora", "per-task-lora", "cgc-1+1"]
    run = saved["arms"][0]["runs"][0]
    assert set(run["val_loss"]) == {"sentiment", "flipped"} and set(run["scores"]) == {"sentiment", "flipped"}
    assert out.with_suffix(".md").read_text() == report(saved) == report(study)
    assert {a["git_commit"] for a in saved["arms"]} == {saved["provenance"]["git_commit"]}  # what ran
    assert saved["provenance"]["autocast"] == "none" and "threads, autocast none)" in report(saved)
    with pytest.raises(ValueError, match="no gate group"):
        best_gate(saved)
    saved["note"] = "A note on how this study ran."
    assert "\n\nA note on how this study ran.\n\n## control" in report(saved)
    out.with_suffix(".json").write_text(json.dumps(saved))
    resumed = run_study(PRESETS["tiny"], groups=["control"], seeds=[0], out=out)  # every arm done: none runs
    assert resumed["arms"] == saved["arms"] and resumed["note"] == saved["note"]
    assert resumed["earlier_provenance"] == [saved["provenance"]]
    assert "Resumed: arms measured by earlier processes" in out.with_suffix(".md").read_text()
    kept = out.with_suffix(".json").read_text()
    with pytest.raises(ValueError, match="another preset or other seeds"):
        run_study(PRESETS["tiny"], groups=["control"], seeds=[0, 1], out=out)
    with pytest.raises(ValueError, match="with {'gate_lr_scale': 10.0} where this one differs"):
        run_study(replace(PRESETS["tiny"], gate_lr_scale=3.0), groups=["control"], seeds=[0], out=out)
    assert out.with_suffix(".json").read_text() == kept  # nothing overwritten


def test_the_affinity_arm_trains_the_two_clusters_the_training_data_give(monkeypatch):
    from cgclora_lite import study
    from cgclora_lite.affinity import cluster_tasks, task_affinity
    from cgclora_lite.experiment import load_tasks
    from cgclora_lite.models import load_model

    (arm,) = [a for a in arms(["methods"], PRESETS["tiny"]) if a.clusters == "affinity"]
    model, tokenizer = load_model("tiny")
    trained = {}
    real = study.train_and_score
    monkeypatch.setattr(study, "train_and_score",
                        lambda m, t, clusters, *a, **k: trained.update(clusters) or real(m, t, clusters, *a, **k))
    result = study.run_arm(arm, model, tokenizer, PRESETS["tiny"], seed=1)
    tasks = load_tasks(PRESETS["tiny"])
    expected = cluster_tasks(task_affinity(model, tokenizer, tasks, batch_size=8, batches=2,
                                           max_length=PRESETS["tiny"].max_length, seed=1), n_clusters=2)
    assert {name: [t.name for t in members] for name, members in trained.items()} == expected
    assert result["clusters"] == expected and len(expected) == 2
    assert sorted(name for members in expected.values() for name in members) == sorted(t.name for t in tasks)


def test_the_study_command_stops_with_a_message_before_any_work(tmp_path):
    from cgclora_lite.cli import main

    out = tmp_path / "results"
    out.with_suffix(".json").write_text(json.dumps({"preset": {"name": "other"}, "seeds": [0], "arms": []}))
    with pytest.raises(SystemExit, match="cgclora_lite study: error: .* another preset"):
        main(["study", "--preset", "tiny", "--seeds", "0", "--out", str(out)])
    with pytest.raises(SystemExit, match="no arms \\['softmax x3'\\]"):
        main(["study", "--preset", "tiny", "--groups", "gate", "--arms", "softmax x3", "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new.json").exists()


def _arm(group, name, method, per_example):
    """A study arm as the JSON holds it, with one seed per row of ``per_example[task]``."""
    seeds = len(next(iter(per_example.values())))
    return {"group": group, "name": name, "method": method, "runs": [
        {"seed": s, "val_loss": {t: 1.0 for t in per_example}, "seconds_per_step": 1.0,
         "scores": {t: {"score": float(np.mean(v[s])), "per_example": list(v[s])} for t, v in per_example.items()}}
        for s in range(seeds)]}


def test_the_report_pairs_each_arm_with_its_reference_and_counts_only_clear_losses():
    rng = np.random.default_rng(0)
    ref = {"a": rng.integers(0, 2, (2, 200)).astype(float), "b": rng.integers(0, 2, (2, 200)).astype(float)}
    worse = {"a": ref["a"] * (rng.random((2, 200)) > 0.5), "b": ref["b"].copy()}  # a: half its hits lost
    worse["b"][0, np.flatnonzero(ref["b"][0])[:2]] = 0  # b: two hits lost, below but not clearly
    names = [("per-task-lora", ref), ("lora", worse), ("cgc-1+1", ref)]
    arms_ = [_arm("control", n, n, v) for n, v in names]
    arms_ += [_arm("budget", f"{n}, 72 steps", n, v) for n, v in names[:2]] + [_arm("gate", "gate off", None, ref)]
    names_ = [b["name"] for b in arms_[:3]]
    assert [reference_arm(a, names_) for a in arms_[:3]] == [None, "per-task-lora", "per-task-lora"]
    assert reference_arm(arms_[4], ["per-task-lora, 72 steps"]) == "per-task-lora, 72 steps"
    assert reference_arm({"group": "gate", "name": "softmax x1", "method": "cgc-1+n"}, ["gate off"]) == "gate off"
    assert reference_arm({"group": "methods", "name": "cgc-1+n, clusters by affinity", "method": None},
                         ["per-task-lora"]) == "per-task-lora"
    text = report({"provenance": {}, "preset": {"name": "x", "steps": 1, "batch_size": 1}, "seeds": [0, 1],
                   "arms": arms_})
    boot = Bootstrap({"a": 200, "b": 200}, 2)
    lose = boot.difference("a", worse["a"], ref["a"])
    below = boot.difference("b", worse["b"], ref["b"])
    assert lose.high < 0 and below.mean < 0 <= below.high  # a clear loss on a, noise on b
    row = f"| lora | per-task-lora | {lose:+.3f} | {below:+.3f} | "
    assert row + f"{boot.average_difference(worse, ref):+.3f} | 1 (2) |" in text
    assert "| cgc-1+1 | per-task-lora | +0.000 [+0.000, +0.000] | +0.000 [+0.000, +0.000] |" in text
    assert "| lora, 72 steps | per-task-lora, 72 steps |" in text
    gate = text.split("## gate")[1]
    assert "Paired changes" not in gate  # the reference alone: nothing to compare


def test_the_components_add_up_to_cgc_1_n_against_per_task_lora():
    rng = np.random.default_rng(1)
    scores = {name: {"a": rng.integers(0, 2, (3, 100)).astype(float)}
              for name in ("per-task-lora", "lora", "gate off", "cgc-1+n")}
    arms_ = [_arm("methods", n, n, scores[n]) for n in ("per-task-lora", "lora", "cgc-1+n")]
    arms_ += [_arm("gate", "gate off", None, scores["gate off"]), _arm("control", "lora", "lora", scores["cgc-1+n"])]
    study = {"provenance": {}, "preset": {"name": "x", "steps": 1, "batch_size": 1}, "seeds": [0, 1, 2]}
    text = report({**study, "arms": arms_})
    rows = [line for line in text.split("## components")[1].splitlines()
            if line.startswith("| ") and not line.startswith(("| step", "| ---"))]
    boot = Bootstrap({"a": 100}, 3)
    expected = [("lora", "per-task-lora"), ("gate off", "lora"), ("cgc-1+n", "gate off")]  # not control's lora
    assert [row.split(" | ")[1:3] for row in rows] == [list(pair) for pair in expected]
    for row, (arm, ref) in zip(rows, expected):
        assert f"| {boot.difference('a', scores[arm]['a'], scores[ref]['a']):+.3f} |" in row
    changes = [float(row.split(" | ")[3].split()[0]) for row in rows]
    total = scores["cgc-1+n"]["a"].mean() - scores["per-task-lora"]["a"].mean()
    assert sum(changes) == pytest.approx(total, abs=0.002)  # three rounded steps
    assert "## components" not in report({**study, "arms": arms_[:1] + arms_[3:]})  # no pair held


def test_arms_chosen_by_name_come_from_every_group_given(tmp_path):
    from cgclora_lite.study import check

    plan, saved = check(PRESETS["cpu"], ["methods", "gate", "control"], [0], tmp_path / "x",
                        ["lora", "gate off", "cgc-1+1", "lora"])
    assert [(a.group, a.name) for a in plan] == [("methods", "lora"), ("control", "lora"), ("gate", "gate off"),
                                                 ("methods", "cgc-1+1"), ("control", "cgc-1+1")]
    assert plan[1].tasks == "control" and saved is None


def test_a_setting_already_measured_is_reused_and_matches_a_fresh_run(tmp_path, monkeypatch):
    from cgclora_lite.study import setting

    monkeypatch.setenv("CGCLORA_AMP", "0")
    tiny = PRESETS["tiny"]
    by_name = {a.name: a for a in arms(["methods", "gate"], tiny)}
    # the preset's own gate is softmax x10: that gate arm trains what the methods group's cgc-1+n trains
    assert (tiny.gate_norm, tiny.gate_lr_scale) == ("softmax", 10.0)
    same = [a.name for a in by_name.values() if setting(asdict(a), tiny) == setting(asdict(by_name["cgc-1+n"]), tiny)]
    assert same == ["cgc-1+n", "softmax x10"]
    study = run_study(tiny, groups=["methods", "gate"], seeds=[0], out=tmp_path / "s", only=["cgc-1+n", "softmax x10"])
    measured, reused = study["arms"]
    assert reused["same_as"] == ["methods", "cgc-1+n"] and reused["runs"] == measured["runs"]
    assert "| softmax x10 (= methods / cgc-1+n) |" in report(study)
    fresh = run_study(tiny, groups=["gate"], seeds=[0], out=tmp_path / "f", only=["softmax x10"])["arms"][0]
    assert "same_as" not in fresh
    for key in ("val_loss", "scores"):  # seeded and deterministic: the reuse is what a run gives
        assert fresh["runs"][0][key] == measured["runs"][0][key]


def test_the_smallest_capacity_arm_trains_cgc_lora_of_active_rank_2_at_the_preset_s_scale(monkeypatch):
    from cgclora_lite import study
    from cgclora_lite.models import load_model

    monkeypatch.setenv("CGCLORA_AMP", "0")
    (arm,) = [a for a in arms(["capacity"], PRESETS["tiny"]) if a.name == "cgc-1+n, r_active 2"]
    configs = []
    real = study.train_and_score
    monkeypatch.setattr(study, "train_and_score",
                        lambda m, t, clusters, config, *a, **k: configs.append(config) or real(m, t, clusters, config, *a, **k))
    model, tokenizer = load_model("tiny")
    result = study.run_arm(arm, model, tokenizer, PRESETS["tiny"], seed=0)
    (config,) = configs
    assert (config.r_active, config.scaling, config.n_common, config.n_specific) == (2, 2.0, 1, 1)
    assert (config.gate_norm, config.gate_lr_scale) == (PRESETS["tiny"].gate_norm, PRESETS["tiny"].gate_lr_scale)
    assert sorted(result["val_loss"]) == sorted(result["scores"]) and len(result["scores"]) == 4


def test_each_method_at_the_rank_it_would_choose_on_validation_is_paired_with_per_task_lora_at_its_own():
    from cgclora_lite.study import _paired

    rng = np.random.default_rng(2)
    study = {"provenance": {}, "preset": {"name": "x", "steps": 1, "batch_size": 1, "r_active": 8},
             "seeds": [0, 1], "arms": []}
    losses = {"per-task-lora": {2: 0.9, 8: 1.2}, "lora": {2: 1.3, 8: 1.1}, "cgc-1+n": {2: 1.0, 8: 0.8}}
    for method, by_rank in losses.items():
        for rank, loss in by_rank.items():
            group, name = ("methods", method) if rank == 8 else ("capacity", f"{method}, r_active {rank}")
            arm = _arm(group, name, method, {"a": rng.integers(0, 2, (2, 100)).astype(float)})
            for run in arm["runs"]:
                run["val_loss"] = {"a": loss}
            study["arms"].append({**arm, "preset": {} if rank == 8 else {"r_active": rank}})
    text = report(study)
    section = text.split("## ranks chosen on validation")[1]
    assert "\n".join(rank_choice(study)) in section  # the report's section is rank_choice's table
    by_key = {(a["group"], a["name"]): a for a in study["arms"]}
    reference = by_key[("capacity", "per-task-lora, r_active 2")]  # per-task LoRA chooses rank 2
    boot_for = lambda values, seeds: Bootstrap({t: v.shape[1] for t, v in values.items()}, seeds)
    lora = _paired(by_key[("methods", "lora")], reference, boot_for)[1]
    cgc = _paired(by_key[("methods", "cgc-1+n")], reference, boot_for)[1]
    assert "| chosen r_active | test average | change vs per-task-lora at r_active 2 |" in section
    assert "| lora | 1.300 | 1.100 | 8 | " in section and section.split("| lora |")[1].split("\n")[0].endswith(f"| {lora:+.3f} |")
    assert section.split("| cgc-1+n |")[1].split("\n")[0].endswith(f"| {cgc:+.3f} |")
    assert "| per-task-lora | 0.900 | 1.200 | 2 | " in section
    del study["arms"][-1]  # cgc-1+n without rank 8: left out; without the capacity group: no section
    assert "| cgc-1+n |" not in report(study).split("## ranks chosen on validation")[1]
    study["arms"] = [a for a in study["arms"] if a["group"] != "capacity"]
    assert "## ranks chosen on validation" not in report(study)
