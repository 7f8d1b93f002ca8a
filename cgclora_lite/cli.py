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
import json
import time
from dataclasses import asdict, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Sequence

import torch

from . import bench
from .affinity import cluster_tasks, task_affinity
from .bench import SHAPES, BenchConfig
from .data import prompt_budget
from .evaluate import evaluate_tasks
from .experiment import (
    BUDGET_RULE,
    METHODS,
    PRESETS,
    Preset,
    method_clusters,
    results_markdown,
    run_method,
    seesaw_table,
)
from .framework import OnePlusN
from .models import load_model
from .provenance import provenance
from .tasks import DEFAULT_CLUSTERS, load_default_tasks

# --- run: the 1+N experiment and its run folder ----------------------------------------------

def run_experiment(preset: Preset, methods: Sequence[str] = METHODS, model_name: str | None = None,
                   task_names: Sequence[str] | None = None, out: str | Path | None = None,
                   progress: bool = True) -> dict:
    """The ``run`` command: the experiment, written to a run folder; returns the metrics dict.

    The folder holds ``config.json``, ``metrics.json``, ``results.md``, PNG figures
    (``scores.png``, ``training_curves.png``, ``gates_<method>_<cluster>.png``) and each method's
    trained adapters under ``adapters/<method>/`` (a saved ``OnePlusN``: see ``export``).
    """
    import matplotlib.pyplot as plt  # with viz: slow imports that only writing figures needs

    from . import viz

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    start = time.perf_counter()
    model_name = model_name if model_name is not None else preset.model
    if model_name == "tiny":  # the tiny model's weights follow the run's seed
        model_name = f"tiny_model(seed={preset.seed})"
    model, tokenizer = load_model(model_name)
    tasks = load_default_tasks(train=preset.train, validation=preset.validation, test=preset.test,
                               seed=preset.seed)
    if task_names:
        missing = sorted(set(task_names) - {t.name for t in tasks})
        if missing:
            raise ValueError(f"unknown tasks {missing}; default tasks: {[t.name for t in tasks]}")
        tasks = [t for t in tasks if t.name in task_names]
    out = Path(out or f"runs/{preset.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(model, seed=preset.seed)
    (out / "config.json").write_text(json.dumps({
        "preset": asdict(preset), "methods": list(methods), "tasks": [t.name for t in tasks],
        "task_clusters": {t.name: t.cluster for t in tasks}, "budget_rule": BUDGET_RULE,
        "provenance": prov}, indent=2) + "\n")

    print(f"zero-shot: {getattr(model, 'name_or_path', '')} on {len(tasks)} tasks", flush=True)
    base = evaluate_tasks(model, tokenizer, tasks, max_prompt_length=prompt_budget(preset.max_length))
    results = {"base (zero-shot)": {"scores": base, "trainable_parameters": 0, "train_seconds": None}}
    for method in methods:
        clusters = {n: [t.name for t in m] for n, m in method_clusters(method, tasks).items()}
        print(f"\n== {method}: clusters {clusters}", flush=True)
        results[method] = run_method(method, model, tokenizer, tasks, preset, progress,
                                     save_to=out / "adapters" / method)

    table = seesaw_table({m: {t: s["score"] for t, s in r["scores"].items()} for m, r in results.items()},
                         {m: r["trainable_parameters"] for m, r in results.items()},
                         {m: r["train_seconds"] for m, r in results.items() if r["train_seconds"]})
    markdown = results_markdown(table, tasks, prov, preset)
    (out / "results.md").write_text(markdown)
    for name, figure in viz.run_figures(results).items():
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
    metrics = {
        "provenance": prov, "total_seconds": time.perf_counter() - start,
        "methods": {m: {k: v for k, v in r.items() if k != "gates"} for m, r in results.items()},
        "table": json.loads(table.to_json(orient="index")),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    print("\n" + markdown + f"\nwrote {out}/ in {metrics['total_seconds']:.0f} s")
    return metrics


def _run(args: argparse.Namespace) -> None:
    preset_name = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[preset_name]
    if args.steps is not None:
        preset = replace(preset, steps=args.steps)
    if args.seed is not None:
        preset = replace(preset, seed=args.seed)
    run_experiment(preset, args.methods, args.model, args.tasks, args.out, progress=not args.quiet)


def _export(args: argparse.Namespace) -> None:
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
    """The ``affinity`` command: measure, cluster, compare with the prior clusters, write, print.

    Loads the central model (``--model``: None the embedded SmolLM2, ``"tiny"`` the random tiny
    model of ``--seed``, else a name or folder) and the default tasks (``--tasks``: a subset), runs
    ``affinity.task_affinity`` and ``affinity.cluster_tasks``, and writes ``affinity.json`` (the
    matrix, settings, clusters, the prior ``DEFAULT_CLUSTERS`` and whether they match) and
    ``affinity.png`` (``viz.affinity_clustermap``) into ``--out`` (default
    ``runs/affinity-<date>-<time>``).
    """
    import matplotlib.pyplot as plt  # with viz: slow imports that only this command needs

    from .viz import affinity_clustermap

    start = time.perf_counter()
    model, tokenizer = load_model(f"tiny_model(seed={args.seed})" if args.model == "tiny" else args.model)
    tasks = load_default_tasks(train=args.batches * args.batch_size, validation=0, test=0, seed=args.seed)
    if args.tasks:
        tasks = [t for t in tasks if t.name in args.tasks]
    options = {} if args.lr is None else {"lr": args.lr}
    affinity = task_affinity(model, tokenizer, tasks, args.method, batch_size=args.batch_size,
                             batches=args.batches, max_length=args.max_length, seed=args.seed, **options)
    clusters = cluster_tasks(affinity, args.clusters)
    prior = {name: [t for t in members if t in affinity.tasks] for name, members in DEFAULT_CLUSTERS.items()}
    prior = {name: members for name, members in prior.items() if members}
    same = {frozenset(m) for m in clusters.values()} == {frozenset(m) for m in prior.values()}
    out = Path(args.out or f"runs/affinity-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    name = getattr(model, "name_or_path", None)
    record = {**affinity.to_dict(), "model": name, "clusters": clusters, "prior_clusters": prior,
              "matches_prior": same, "seconds": round(time.perf_counter() - start, 1)}
    (out / "affinity.json").write_text(json.dumps(record, indent=2) + "\n")
    fig = affinity_clustermap(affinity, clusters, title=f"Task affinity ({args.method}), {name}")
    fig.savefig(out / "affinity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"{args.method} affinity on {name} (rows: source task i, columns: target task j):")
    print(affinity.matrix.round(3).to_string())
    print(f"clusters: {clusters}")
    print(f"prior clusters: {prior} ({'the same grouping' if same else 'a different grouping'})")
    print(f"wrote {out}/affinity.json and affinity.png in {record['seconds']:.0f} s")


def _bench(args: argparse.Namespace) -> None:
    bench.run(BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)}))


def _add_bench(commands) -> None:
    """The ``bench`` command: one option per ``bench.BenchConfig`` field, with its default."""
    d = BenchConfig()
    p = commands.add_parser(
        "bench", help="time and size CGC-LoRA against LoRA, peft, the per-expert loop and the base",
        description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device, help="default: cuda if available")
    p.add_argument("--shape", choices=sorted(SHAPES), default=d.shape,
                   help="model and batch sizes: " + "; ".join(
                       f"{k}: {v['layers']} blocks of d={v['hidden']}, {v['batch']} x {v['seq']} tokens"
                       for k, v in SHAPES.items()) + " (default: gpu on cuda, else cpu)")
    p.add_argument("--layers", type=int, default=d.layers, help="override the shape's number of blocks")
    p.add_argument("--batch", type=int, default=d.batch, help="override the shape's batch size")
    p.add_argument("--seq", type=int, default=d.seq, help="override the shape's sequence length")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype,
                   help="base weights; bfloat16 also turns on bf16 autocast (default: bfloat16 on cuda)")
    p.add_argument("--rank", type=int, default=d.rank, help=f"active rank r of every method (default {d.rank})")
    p.add_argument("--dropout", type=float, default=d.dropout,
                   help=f"adapter input dropout of every method, in training steps (default {d.dropout:g})")
    p.add_argument("--tasks", type=int, default=d.tasks,
                   help=f"tasks in the CGC cluster, all in each batch (default {d.tasks})")
    p.add_argument("--common", type=int, default=d.common, help=f"CGC task-common experts (default {d.common})")
    p.add_argument("--specific", type=int, default=d.specific,
                   help=f"CGC task-specific experts per task (default {d.specific})")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"untimed steps of each method (default {d.warmup})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"timed steps of each method (default {d.steps})")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--no-sweeps", dest="sweeps", action="store_false", help="skip the two sweeps")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: tiny shape, 2 timed steps, checks fused == loop (timings meaningless)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads for torch (default: torch's; 1 with --smoke). On a shared machine "
                        "1 avoids threads waiting on each other for a busy core")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="write the results as JSON to this file")
    p.set_defaults(handler=_bench)


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

    _add_bench(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.handler(args)
    return 0

