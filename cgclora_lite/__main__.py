"""Command line of cgclora_lite.

  python -m cgclora_lite run                      # the 1+N experiment, preset chosen for this machine
  python -m cgclora_lite run --preset tiny        # a seconds-long smoke run on a tiny random model
  python -m cgclora_lite run --methods lora cgc-1+n --steps 100 --out runs/mine
  python -m cgclora_lite export --run runs/mine --task sentiment --format peft --out sentiment_lora
  python -m cgclora_lite affinity --method gradient --clusters 2 --out runs/affinity

`run` trains CGC-LoRA in the 1+N pattern (one set of adapters per cluster of related tasks) and
its baselines (one LoRA for all tasks, one LoRA per task, MOELoRA, CGC-LoRA over all tasks,
MoDULA-Flan and MoDULA-Res) on the same data and budget, scores every task, and writes a run
folder: config.json, metrics.json, results.md (the seesaw table, also printed) and PNG figures. Everything runs offline on the
embedded SmolLM2-135M-Instruct and the default tasks.

`export` takes one task of a trained run and writes it as a plain peft LoRA adapter folder or as a
merged transformers model folder, either of which serves that task without cgclora_lite.

`affinity` measures how the tasks help or hurt each other through a fresh LoRA on the central model
(gradient cosine, or TAG's lookahead), clusters them into the N of 1+N, compares the clusters with
the prior ones (classify / generate), and writes affinity.json and affinity.png (a clustermap).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from .data import DEFAULT_CLUSTERS
from .experiment import METHODS, PRESETS, run_experiment


def _run(args: argparse.Namespace) -> None:
    preset_name = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[preset_name]
    if args.steps is not None:
        preset = replace(preset, steps=args.steps)
    if args.seed is not None:
        preset = replace(preset, seed=args.seed)
    run_experiment(preset, args.methods, args.model, args.tasks, args.out, progress=not args.quiet)


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .framework import OnePlusN

    if args.method.startswith("modula"):
        raise SystemExit(f"{args.method} cannot be exported as one LoRA or one merged model: its token "
                         "router mixes the experts differently for every token. Load it with "
                         "cgclora_lite.modula.load_modula(model, folder) instead.")
    folder = Path(args.run) / "adapters" / args.method
    if not folder.is_dir():
        found = sorted(p.name for p in (Path(args.run) / "adapters").glob("*"))
        raise SystemExit(f"{folder} not found: the run {args.run} saved adapters for {found or 'no method'}")
    framework = OnePlusN.load(folder)
    path = framework.export(args.task, args.out, args.format)
    how = ("peft.PeftModel.from_pretrained(base_model, folder)" if args.format == "peft"
           else "transformers.AutoModelForCausalLM.from_pretrained(folder)")
    print(f"exported task {args.task!r} of {args.method} ({args.format}) to {path}; load it with {how}")


def _affinity(args: argparse.Namespace) -> None:
    from .affinity import run_affinity

    run_affinity(args.model, args.tasks, args.method, args.clusters, args.out, batch_size=args.batch_size,
                 batches=args.batches, max_length=args.max_length, seed=args.seed,
                 **({} if args.lr is None else {"lr": args.lr}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cgclora_lite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tasks = [t for names in DEFAULT_CLUSTERS.values() for t in names]
    run = commands.add_parser(
        "run", help="the 1+N experiment: CGC-LoRA against its baselines, with the seesaw table",
        description="Train and compare the methods on the default offline tasks; write a run "
                    "folder and print the seesaw table. See README.md, 'Results'.")
    run.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="sizes: tiny (random tiny model, seconds), cpu (two cores, under 20 "
                          "minutes), gpu (a Colab-class GPU). Default: gpu if CUDA is available, else cpu")
    run.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                     help=f"methods to compare (default: all): {', '.join(METHODS)}")
    run.add_argument("--model", default=None,
                     help="a transformers causal LM name or folder instead of the preset's model "
                          "(default: the embedded SmolLM2-135M-Instruct; 'tiny': the random tiny model)")
    run.add_argument("--tasks", nargs="+", choices=tasks, default=None, metavar="TASK",
                     help=f"a subset of the default tasks ({', '.join(tasks)}); default: all")
    run.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: the preset's)")
    run.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's, 0)")
    run.add_argument("--out", default=None, help="run folder (default: runs/<preset>-<date>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=_run)

    export = commands.add_parser(
        "export", help="write one task of a trained run as a peft LoRA or a merged model",
        description="Export one task of a trained run (a folder written by `run`).")
    export.add_argument("--run", required=True, help="the run folder written by `run`")
    export.add_argument("--task", required=True, help="the task to export, e.g. sentiment")
    export.add_argument("--method", default="cgc-1+n", choices=METHODS,
                        help="which trained method's adapters (default: cgc-1+n)")
    export.add_argument("--format", default="peft", choices=["peft", "merged"],
                        help="peft: adapter_config.json + adapter_model.safetensors for "
                             "PeftModel.from_pretrained; merged: a full transformers model folder "
                             "(default: peft)")
    export.add_argument("--out", required=True, help="output folder")
    export.set_defaults(handler=_export)

    affinity = commands.add_parser(
        "affinity", help="measure inter-task affinity on the central model and cluster the tasks",
        description="Measure how the default tasks help or hurt each other through a fresh LoRA "
                    "on the central model, cluster them, and write affinity.json and affinity.png.")
    affinity.add_argument("--method", default="gradient", choices=["gradient", "lookahead"],
                          help="gradient: cosine of the tasks' adapter gradients (one backward per "
                               "task and batch); lookahead: TAG's 1 - L_j(after a step on i) / L_j "
                               "(T backward and T x (T + 1) forwards per batch). Default: gradient")
    affinity.add_argument("--model", default=None,
                          help="a transformers causal LM name or folder (default: the embedded "
                               "SmolLM2-135M-Instruct; 'tiny': the random tiny model)")
    affinity.add_argument("--tasks", nargs="+", choices=tasks, default=None, metavar="TASK",
                          help=f"a subset of the default tasks ({', '.join(tasks)}); default: all")
    affinity.add_argument("--clusters", type=int, default=2, help="number of clusters (default: 2)")
    affinity.add_argument("--batches", type=int, default=2, help="batches per task (default: 2)")
    affinity.add_argument("--batch-size", type=int, default=8, help="examples per batch (default: 8)")
    affinity.add_argument("--max-length", type=int, default=128, help="tokens per example (default: 128)")
    affinity.add_argument("--lr", type=float, default=None,
                          help="lookahead SGD step size (default: task_affinity's)")
    affinity.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    affinity.add_argument("--out", default=None, help="output folder (default: runs/affinity-<date>-<time>)")
    affinity.set_defaults(handler=_affinity)

    from . import bench

    bench.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.handler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
