"""The benchmark in smoke mode: it runs in seconds, its fused layers agree with the per-expert
loop, and it writes complete JSON. Timings are not checked (meaningless at this size)."""

import dataclasses
import json

import pytest
from conftest import require

from cgclora_lite import bench, cli
from cgclora_lite.bench import BenchConfig


def test_smoke_run_checks_fused_against_loop_and_writes_json(tmp_path, capsys):
    require("peft", "pip install -r requirements-test.txt")
    out = tmp_path / "bench.json"
    results = bench.run(BenchConfig(smoke=True, device="cpu", out=str(out)))
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))

    assert set(results["checks"]) == {"moelora", "cgc dense", "cgc gathered"}
    assert all(err < 1e-4 for err in results["checks"].values()), results["checks"]

    methods = [row["method"] for row in results["train"]]
    assert methods == ["base", "lora", "peft", "loop", "moelora", "cgc"]
    for row in results["train"]:
        assert row["step_ms"] > 0 and row["saved_mb"] > 0
    train = {row["method"]: row for row in results["train"]}
    assert train["base"]["trainable"] == 0 and train["lora"]["trainable"] == train["peft"]["trainable"]
    assert [row["call"] for row in results["inference"]] == [
        "base", "lora", "cgc merged", "cgc single-task", "cgc mixed-task"]
    assert [r["experts"] for r in results["sweeps"]["experts"]] == [1, 2]
    assert [r["tasks"] for r in results["sweeps"]["tasks"]] == [1, 4]
    assert all({"value", "limit", "pass"} <= set(c) for c in results["criteria"].values())

    provenance = results["provenance"]
    assert provenance["device"] == "cpu" and provenance["torch"] and provenance["cgclora_lite"]
    assert provenance["command"] == f"python -m cgclora_lite bench --device cpu --smoke --out {out}"
    assert provenance["dtype"] == "float32" and provenance["compile"] is False
    assert results["shape"]["hidden"] == bench.SHAPES["smoke"]["hidden"]
    assert "must-show criteria" in capsys.readouterr().out


def test_cli_options_build_the_config(monkeypatch):
    configs = []
    monkeypatch.setattr(bench, "run", configs.append)
    assert cli.main(["bench", "--shape", "cpu", "--layers", "3", "--compile", "--no-sweeps", "--rank", "8"]) == 0
    assert configs == [BenchConfig(shape="cpu", layers=3, compile=True, sweeps=False, rank=8)]
    cli.main(["bench"])
    assert configs[-1] == BenchConfig()  # the command's defaults are the config's
    with pytest.raises(SystemExit):
        cli.main(["bench", "--shape", "huge"])


def test_config_is_frozen_and_resolves_into_a_new_one():
    config = BenchConfig(smoke=True, device="cpu", rank=8)
    resolved = config.resolved()
    assert (resolved.shape, resolved.warmup, resolved.steps, resolved.dtype) == ("smoke", 1, 2, "float32")
    assert config.shape is None and config.steps == 15  # unchanged
    assert resolved.sizes == bench.SHAPES["smoke"]
    assert BenchConfig(shape="cpu", layers=1, seq=32).sizes == {**bench.SHAPES["cpu"], "layers": 1, "seq": 32}
    assert config.command() == "python -m cgclora_lite bench --device cpu --rank 8 --smoke"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3
    with pytest.raises(ValueError, match="shape must be one of"):
        BenchConfig(shape="huge")


def test_benchmark_from_python_takes_the_command_options(capsys):
    require("peft", "pip install -r requirements-test.txt")
    results = bench.benchmark(smoke=True, device="cpu", sweeps=False)
    assert results["provenance"]["command"] == "python -m cgclora_lite bench --device cpu --no-sweeps --smoke"
    assert results["checks"] and results["config"]["steps"] == 2  # smoke mode sets its own sizes
    with pytest.raises(TypeError, match="unknown benchmark options"):
        bench.benchmark(stepz=3)
