"""The benchmark in smoke mode: it runs in seconds, its fused layers agree with the per-expert
loop, and it writes complete JSON. Timings are not checked (meaningless at this size)."""

import argparse
import json

import pytest

from cgclora_lite import bench


def parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    args.argv = ["bench", *argv]
    return args


def test_smoke_run_checks_fused_against_loop_and_writes_json(tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "bench.json"
    results = bench.run(parse(["--smoke", "--device", "cpu", "--out", str(out)]))
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
    assert provenance["device"] == "cpu" and provenance["versions"]["torch"]
    assert provenance["command"].startswith("python -m cgclora_lite bench --smoke")
    assert results["shape"]["hidden"] == bench.SHAPES["smoke"]["hidden"]
    assert "must-show criteria" in capsys.readouterr().out


def test_cli_options():
    args = parse(["--shape", "cpu", "--layers", "3", "--compile", "--no-sweeps", "--rank", "8"])
    assert (args.shape, args.layers, args.compile, args.sweeps, args.rank) == ("cpu", 3, True, False, 8)
    assert args.handler is bench.run
    with pytest.raises(SystemExit):
        parse(["--shape", "huge"])


def test_benchmark_from_python_takes_the_command_options(capsys):
    pytest.importorskip("peft")
    results = bench.benchmark(smoke=True, device="cpu", sweeps=False)
    assert results["provenance"]["command"] == "python -m cgclora_lite bench --smoke --device cpu --no-sweeps"
    assert results["checks"] and results["config"]["steps"] == 2  # smoke mode sets its own sizes
    with pytest.raises(TypeError, match="unknown benchmark options"):
        bench.benchmark(stepz=3)
