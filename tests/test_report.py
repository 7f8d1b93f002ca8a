"""The experiment's report: the seesaw table's columns against hand-computed values, a run without
the reference method, missing scores, and results.md against metrics.json (synthetic runs, no
training)."""

import json
import math
import re

import numpy as np
import pytest

from cgclora_lite.experiment import (
    PRESETS,
    REFERENCE,
    results_markdown,
    seesaw_table,
    write_results,
)
from cgclora_lite.tasks import Example, Task

PROV = {"model": "synthetic", "dtype": "float32", "autocast": "none", "device": "cpu",
        "device_name": "test", "cpu_threads": 1, "torch": "x", "transformers": "x",
        "cgclora_lite": "x", "git_commit": "abc", "date": "today"}


def _run(scores: dict[str, list[float]], params: int = 7, seconds: float | None = None,
         per_step: float | None = None) -> dict:
    """One run_method-like result (one seed) with these per-example scores."""
    return {"scores": {t: {"score": float(np.mean(v)), "per_example": list(v)} for t, v in scores.items()},
            "trainable_parameters": params, "train_seconds": seconds, "seconds_per_step": per_step}


def _tasks(sizes: dict[str, int]) -> list[Task]:
    return [Task(name, "c", "{input}", "rouge_l", train=[Example("i", "t", name)] * 3,
                 test=[Example("i", "t", name)] * n) for name, n in sizes.items()]


def _interval(table, method: str, column: str) -> tuple[float, float, float]:
    row = table.loc[method]
    return row[column], row[f"{column} low"], row[f"{column} high"]


# --- change columns ----------------------------------------------------------------------------

REF_T1 = ([0.0, 0.25, 0.5, 0.75, 0.0, 0.25, 0.5, 0.75], [0.5, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25, 0.25])
REF_T2 = ([1.0] * 8, [1.0] * 7 + [0.0])


def _two_seed_runs() -> dict[str, list[dict]]:
    """Two seeds; the reference is not the first method. cgc-1+n is the reference + 0.25 on every
    t1 answer and - 0.5 on every t2 answer, in both seeds; lora is the reference with one t1
    answer of seed 0 lowered by 0.25."""
    cgc = [_run({"t1": [v + 0.25 for v in t1], "t2": [v - 0.5 for v in t2]})
           for t1, t2 in zip(REF_T1, REF_T2)]
    lowered = [REF_T1[0][0]] + REF_T1[0][1:3] + [REF_T1[0][3] - 0.25] + REF_T1[0][4:]
    lora = [_run({"t1": lowered, "t2": REF_T2[0]}), _run({"t1": REF_T1[1], "t2": REF_T2[1]})]
    reference = [_run({"t1": t1, "t2": t2}) for t1, t2 in zip(REF_T1, REF_T2)]
    return {"cgc-1+n": cgc, REFERENCE: reference, "lora": lora}


def test_per_task_change_columns_are_paired_differences_against_the_reference():
    table = seesaw_table(_two_seed_runs())
    # cgc-1+n = reference + 0.25 (t1) and - 0.5 (t2) on every answer of every seed: a paired
    # difference is that constant in every bootstrap replicate, so its interval is a point
    assert _interval(table, "cgc-1+n", "t1 change") == pytest.approx((0.25, 0.25, 0.25))
    assert _interval(table, "cgc-1+n", "t2 change") == pytest.approx((-0.5, -0.5, -0.5))
    assert _interval(table, "cgc-1+n", f"avg change vs {REFERENCE}") == pytest.approx((-0.125,) * 3)
    assert table.loc["cgc-1+n", "tasks that lose"] == 1 and table.loc["cgc-1+n", "tasks below reference"] == 1
    # the scores themselves: means over seeds and examples
    ref_t1, ref_t2 = np.mean(REF_T1), np.mean(REF_T2)  # 0.375 and 15 / 16
    assert table.loc[REFERENCE, "t1"] == pytest.approx(ref_t1)
    assert table.loc["cgc-1+n", "t1"] == pytest.approx(ref_t1 + 0.25)
    assert table.loc["cgc-1+n", "average"] == pytest.approx((ref_t1 + 0.25 + ref_t2 - 0.5) / 2)
    # the reference against itself: zero everywhere, no task lost
    for column in ("t1 change", "t2 change", f"avg change vs {REFERENCE}"):
        assert _interval(table, REFERENCE, column) == (0.0, 0.0, 0.0)
    assert table.loc[REFERENCE, "tasks that lose"] == 0 == table.loc[REFERENCE, "tasks below reference"]
    # lora: one answer of 16 (2 seeds x 8) is 0.25 lower: a change of -0.25 / 16; replicates
    # that miss that answer change by exactly 0, so the interval reaches 0: below, not losing
    change, low, high = _interval(table, "lora", "t1 change")
    assert change == pytest.approx(-0.25 / 16) and low < change and high == 0.0
    assert _interval(table, "lora", "t2 change") == (0.0, 0.0, 0.0)
    assert table.loc["lora", f"avg change vs {REFERENCE}"] == pytest.approx(-0.25 / 16 / 2)
    assert table.loc["lora", "tasks that lose"] == 0 and table.loc["lora", "tasks below reference"] == 1
    assert list(table.index) == ["cgc-1+n", REFERENCE, "lora"] and (table["seeds"] == 2).all()


def test_unpaired_noise_would_not_give_a_point_interval():
    """The point intervals above come from pairing: the scores' own intervals are wide."""
    table = seesaw_table(_two_seed_runs())
    _, low, high = _interval(table, "cgc-1+n", "t1")
    assert high - low > 0.2


# --- a run without the reference method ---------------------------------------------------------

def test_a_run_without_the_reference_has_no_change_columns_and_says_so():
    runs = {"lora": [_run({"t1": [1.0, 0.0], "t2": [0.5, 0.5]}, params=10)],
            "cgc-1+n": [_run({"t1": [0.0, 0.0], "t2": [1.0, 1.0]}, params=20, per_step=0.5)]}
    table = seesaw_table(runs)
    assert not [c for c in table.columns if "change" in c or "lose" in c or "below" in c]
    assert table.loc["cgc-1+n", "average"] == pytest.approx(0.5)
    markdown = results_markdown(table, _tasks({"t1": 2, "t2": 2}), PROV, PRESETS["tiny"], [0])
    header = markdown.splitlines()[0]
    assert header == ("| method | t1 (rouge-l) | t2 (rouge-l) | average | trainable params | s/step |")
    assert f"No {REFERENCE} row: no changes against it." in markdown and "A task loses" not in markdown
    assert ("| cgc-1+n | 0.000 [0.000, 0.000] | 1.000 [1.000, 1.000] | 0.500 [0.500, 0.500] | 20 | 0.50 |"
            in markdown)


def test_another_reference_names_its_columns_and_the_report_follows():
    runs = {"lora": [_run({"t1": [1.0, 0.0]})], "cgc-1+n": [_run({"t1": [1.0, 1.0]})]}
    table = seesaw_table(runs, reference="lora")
    assert _interval(table, "cgc-1+n", "t1 change") == pytest.approx((0.5, 0.0, 1.0))
    markdown = results_markdown(table, _tasks({"t1": 2}), PROV, PRESETS["tiny"], [0])
    assert "| avg change vs lora | tasks that lose (below) |" in markdown.splitlines()[0]
    assert ("| cgc-1+n | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | +0.500 [+0.000, +1.000] | 0 (0) |"
            in markdown)
    assert "against lora" in markdown


# --- missing scores ------------------------------------------------------------------------------

def test_a_run_without_a_parameter_count_shows_zero_trainable_parameters():
    zero_shot = _run({"t1": [0.0] * 4})
    del zero_shot["trainable_parameters"]
    table = seesaw_table({REFERENCE: [_run({"t1": [1.0] * 4}, params=9)], "base (zero-shot)": [zero_shot]})
    assert table.loc["base (zero-shot)", "trainable params"] == 0 and table.loc[REFERENCE, "trainable params"] == 9


def test_a_missing_score_is_skipped_in_the_means_and_never_a_loss():
    ones, zeros = [1.0] * 20, [0.0] * 20
    runs = {
        REFERENCE: [_run({"t1": ones, "t2": ones, "t3": zeros})],
        # t1: one NaN answer among zeros (were the NaN read as 0, t1 would clearly lose)
        "cgc-1+n": [_run({"t1": [math.nan] + zeros[1:], "t2": ones, "t3": [1.0] * 10 + [0.0] * 10})],
        "lora": [_run({"t1": ones, "t2": zeros})],  # no score at all for t3; t2 clearly loses
    }
    table = seesaw_table(runs)
    for method, task in (("cgc-1+n", "t1"), ("lora", "t3")):
        assert np.isnan(_interval(table, method, task)).all()
        assert np.isnan(_interval(table, method, f"{task} change")).all()
    assert table.loc["cgc-1+n", "average"] == pytest.approx((1.0 + 0.5) / 2)  # t2 and t3 only
    assert table.loc["cgc-1+n", f"avg change vs {REFERENCE}"] == pytest.approx((0.0 + 0.5) / 2)
    assert table.loc["cgc-1+n", "tasks that lose"] == 0 and table.loc["cgc-1+n", "tasks below reference"] == 0
    assert table.loc["lora", "average"] == pytest.approx(0.5)  # t1 and t2
    assert table.loc["lora", f"avg change vs {REFERENCE}"] == pytest.approx(-0.5)
    assert table.loc["lora", "tasks that lose"] == 1 and table.loc["lora", "tasks below reference"] == 1
    average, low, high = _interval(table, "cgc-1+n", "average")
    assert low <= average <= high and not np.isnan([low, high]).any()
    markdown = results_markdown(table, _tasks({"t1": 20, "t2": 20, "t3": 20}), PROV, PRESETS["tiny"], [0])
    row = next(line for line in markdown.splitlines() if line.startswith("| lora |"))
    assert row.split(" | ")[3] == "n/a" and "n/a: no score for that task" in markdown


@pytest.mark.filterwarnings("error::RuntimeWarning")  # NaN is written for what is missing, never a mean of nothing
def test_a_method_with_no_score_and_no_timing_is_missing_everywhere_without_a_warning():
    table = seesaw_table({REFERENCE: [_run({"t1": [1.0] * 4}, seconds=2.0, per_step=0.5)],
                          "cgc-1+n": [_run({"t1": [math.nan] * 4})]})  # no score, no time
    for column in ("t1", "average", "t1 change", f"avg change vs {REFERENCE}"):
        assert np.isnan(_interval(table, "cgc-1+n", column)).all(), column
    assert np.isnan(table.loc["cgc-1+n", ["train seconds", "s/step"]].astype(float)).all()
    assert table.loc[REFERENCE, ["train seconds", "s/step"]].tolist() == [2.0, 0.5]


# --- results.md and metrics.json ------------------------------------------------------------------

NUMBER = r"[+-]?\d+\.\d+"
CELL = re.compile(rf"^({NUMBER}) \[({NUMBER}), ({NUMBER})\]$")


def _markdown_table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return head, rows


def test_results_md_agrees_with_metrics_json(tmp_path):
    rng = np.random.default_rng(3)
    sizes = {"topic": 30, "headline": 12}
    tasks = _tasks(sizes)

    def seed_run(quality: float, params: int, per_step: float) -> dict:
        return _run({"topic": rng.binomial(1, quality, 30).astype(float).tolist(),
                     "headline": np.round(rng.uniform(0, quality, 12), 3).tolist()},
                    params=params, seconds=per_step * 4, per_step=per_step)

    runs = {"base (zero-shot)": [_run({"topic": [0.0] * 30, "headline": [0.1] * 12}, params=0)],
            "lora": [seed_run(0.6, 1234, 0.21), seed_run(0.6, 1234, 0.23)],
            REFERENCE: [seed_run(0.7, 4936, 0.3), seed_run(0.7, 4936, 0.34)],
            "cgc-1+n": [seed_run(0.5, 20480, 0.5), seed_run(0.5, 20480, 0.52)]}
    runs["cgc-1+n"][1]["scores"]["headline"]["per_example"][4] = math.nan  # a missing score
    table = seesaw_table(runs)
    markdown, _ = write_results(tmp_path, runs, table, tasks, PROV, PRESETS["tiny"], [0, 1],
                                total_seconds=12.5)
    assert (tmp_path / "results.md").read_text() == markdown
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["total_seconds"] == 12.5 and saved["provenance"] == PROV
    assert list(saved["runs"]) == list(runs) == list(saved["table"])
    head, rows = _markdown_table(markdown)
    assert list(rows) == list(runs)
    change = f"avg change vs {REFERENCE}"
    assert head == ["method", "topic (rouge-l)", "headline (rouge-l)", "average", change,
                    "tasks that lose (below)", "trainable params", "s/step"]
    checked = 0
    for method, cells in rows.items():
        row = saved["table"][method]
        for column, cell in zip(["topic", "headline", "average", change], cells[1:5]):
            if row[column] is None:  # NaN in the table: null in JSON, n/a in Markdown
                assert cell == "n/a", (method, column)
                continue
            numbers = [float(x) for x in CELL.match(cell).groups()]
            assert numbers == pytest.approx([row[column], row[f"{column} low"], row[f"{column} high"]],
                                            abs=5e-4), (method, column)
            checked += 1
        for task in ("topic", "headline"):  # and the scores are the means of the saved answers
            values = np.array([r["scores"][task]["per_example"] for r in saved["runs"][method]])
            if np.isnan(values).any():
                assert cells[head.index(f"{task} (rouge-l)")] == "n/a"
            else:
                assert float(CELL.match(cells[head.index(f"{task} (rouge-l)")]).group(1)) == \
                    pytest.approx(values.mean(), abs=5e-4)
        assert cells[5] == f"{int(row['tasks that lose'])} ({int(row['tasks below reference'])})"
        assert cells[6] == f"{saved['runs'][method][0]['trainable_parameters']:,}"
        per_step = [r["seconds_per_step"] for r in saved["runs"][method] if r["seconds_per_step"]]
        assert cells[7] == (f"{np.mean(per_step):.2f}" if per_step else "")
    assert checked == 4 * 4 - 1  # cgc-1+n's headline is n/a (its average and change: topic's)
    assert rows["cgc-1+n"][2] == "n/a" and "seeds [0, 1]" in markdown
    assert "test examples: topic 30, headline 12" in markdown


def test_train_config_takes_every_training_setting_from_the_preset():
    from dataclasses import replace

    from cgclora_lite.experiment import train_config

    preset = replace(PRESETS["tiny"], lr=0.123, warmup=0.25, eval_every=3, seed=7)
    config = train_config(preset)
    assert (config.steps, config.lr, config.warmup, config.eval_every, config.seed) == \
        (preset.steps, 0.123, 0.25, 3, 7)
