"""The GPU check: everything this project measures on a CUDA GPU, in one command, into one folder.

    make gpu-check OUT=gpu-results          # = python -m cgclora_lite.gpucheck --out gpu-results

On a CUDA machine it runs, in order, each writing into ``OUT`` with its provenance:

1. ``bench-eager.json`` and ``bench-compiled.json``: the fused layer's benchmark (``bench.run``) on
   the ``gpu`` shape, eager and under ``torch.compile``;
2. ``run/``: the experiment (``cli.run_experiment``) with the ``gpu`` preset, every method, the
   given seeds (default 0 1 2): ``results.md``, ``metrics.json``, figures;
3. ``summary.md``: the commands, the GPU, the wall time of each part, and the results table.

It refuses to start without CUDA (the numbers would not be GPU numbers) unless ``--allow-cpu``,
which the test suite uses with ``--preset tiny`` to check the whole path on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from . import bench
from .bench import BenchConfig
from .cli import run_experiment
from .experiment import METHODS, PRESETS
from .provenance import provenance


def gpu_check(out: str | Path, preset: str = "gpu", seeds: Sequence[int] = (0, 1, 2),
              methods: Sequence[str] = METHODS, allow_cpu: bool = False, bench_steps: int = 15) -> dict:
    """Run the benchmark (eager and compiled) and the experiment; write everything under ``out``."""
    if not torch.cuda.is_available() and not allow_cpu:
        raise SystemExit("no CUDA GPU here: the GPU check measures GPU numbers only. "
                         "(--allow-cpu runs it on the CPU, for testing the path.)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts: dict[str, float] = {}
    smoke = device == "cpu"  # a CPU run only checks the path: the smallest benchmark
    for name, compiled in (("bench-eager", False), ("bench-compiled", True)):
        start = time.perf_counter()
        bench.run(BenchConfig(device=device, compile=compiled and not smoke, steps=bench_steps,
                              smoke=smoke, sweeps=not smoke, out=str(out / f"{name}.json")))
        parts[name] = time.perf_counter() - start
    start = time.perf_counter()
    metrics = run_experiment(PRESETS[preset], methods, out=out / "run", progress=False, seeds=seeds)
    parts["run"] = time.perf_counter() - start
    summary = {"provenance": provenance(device=device, preset=preset, seeds=list(seeds),
                                        methods=list(methods)),
               "seconds": parts}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# GPU check", "", f"Device: {summary['provenance']['device_name']}; commit "
             f"{summary['provenance']['git_commit']}; {summary['provenance']['date']}.", "",
             "| part | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in parts.items()]
    lines += ["", "## The experiment", "", (out / "run" / "results.md").read_text()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return {"summary": summary, "metrics": metrics}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cgclora_lite.gpucheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for every result")
    parser.add_argument("--preset", default="gpu", choices=sorted(PRESETS), help="default: gpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: 0 1 2")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="default: every method")
    parser.add_argument("--bench-steps", type=int, default=15, help="timed benchmark steps (default 15)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (tests only)")
    args = parser.parse_args(argv)
    gpu_check(args.out, args.preset, args.seeds, args.methods, args.allow_cpu, args.bench_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
