"""The GPU check's path, on the CPU with the tiny preset (its GPU numbers need a GPU)."""

import json

import pytest
import torch

from cgclora_lite.gpucheck import gpu_check, main


def test_gpu_check_refuses_to_measure_a_cpu_as_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        main(["--out", str(tmp_path)])


def test_gpu_check_writes_every_part_with_provenance(tmp_path):
    gpu_check(tmp_path, preset="tiny", seeds=[0], methods=["lora", "cgc-1+n"], allow_cpu=True,
              bench_steps=1)
    for name in ("bench-eager.json", "bench-compiled.json", "summary.json", "summary.md",
                 "run/results.md", "run/metrics.json"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["seconds"]) == {"bench-eager", "bench-compiled", "run"}
    assert summary["provenance"]["preset"] == "tiny" and summary["provenance"]["git_commit"] is not None
    assert "| cgc-1+n |" in (tmp_path / "summary.md").read_text()
