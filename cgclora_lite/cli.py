"""Command line of cgclora_lite.

  python -m cgclora_lite run                      # the 1+N experiment, preset chosen for this machine
  python -m cgclora_lite run --preset tiny        # a seconds-long smoke run on a tiny random model
  python -m cgclora_lite run --methods lora cgc-1+n --steps 100 --out runs/mine
  python -m cgclora_lite export --run runs/mine --task sentiment --format peft --out sentiment_lora
  python -m cgclora_lite affinity --method gradient --clusters 2 --out runs/affinity
  python -m cgclora_lite init --out my_tasks      # your own tasks: an example task file and CSV
  python -m cgclora_lite train --tasks-file my_tasks/tasks.yaml --out my_framework
  python -m cgclora_lite evaluate --framework my_framework
  python -m cgclora_lite predict --framework my_framework --task mood --input "Tom lost his keys."
  python -m cgclora_lite export --framework my_framework --task mood --out mood_lora

`run` trains CGC-LoRA in the 1+N pattern (one set of adapters per cluster of related tasks) and
its baselines (one LoRA for all tasks, one LoRA per task, MOELoRA, CGC-LoRA over all tasks,
MoDULA-Flan and MoDULA-Res) on the same data and budget, scores every task, and writes a run
folder: config.json, metrics.json, results.md (the seesaw table, also printed) and PNG figures. Everything runs offline on the
embedded SmolLM2-135M-Instruct and the default tasks.

`export` takes one task of a trained run and writes it as a plain peft LoRA adapter folder or as a
merged transformers model folder, either of which serves that task without cgclora_lite.

`train`, `evaluate` and `predict` do the same on your own tasks, declared in a task file
(`init` writes an example): train a framework, score it, answer new inputs.

`affinity` measures how the tasks help or hurt each other through a fresh LoRA on the central model
(gradient cosine, or TAG's lookahead), clusters them into the N of 1+N, compares the clusters with
the prior ones (classify / generate), and writes affinity.json and affinity.png (a clustermap).
"""

from __future__ import annotations

import argparse
import functools
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
from .cgc import GATE_NORMS
from .data import prompt_budget
from .evaluate import evaluate_tasks
from .experiment import (
    BUDGET_RULE,
    DEMO_METHODS,
    METHODS,
    PRESETS,
    Preset,
    autocast_name,
    load_tasks,
    method_clusters,
    run_method,
    seesaw_table,
    write_results,
)
from .framework import OnePlusN
from .models import load_model
from .provenance import provenance
from .tasks import DEFAULT_CLUSTERS, load_default_tasks

# --- run: the 1+N experiment and its run folder ----------------------------------------------

def run_experiment(preset: Preset, methods: Sequence[str] = DEMO_METHODS, model_name: str | None = None,
                   task_names: Sequence[str] | None = None, out: str | Path | None = None,
                   progress: bool = True, seeds: Sequence[int] | None = None,
                   tasks_file: str | Path | None = None) -> dict:
    """The ``run`` command: the experiment, written to a run folder; returns the metrics dict.

    ``tasks_file``: your own tasks (``taskfile``) instead of the default ones, at the sizes the
    file gives; checked before the model loads, open clusters found by affinity after.

    Every method is trained once per seed in ``seeds`` (default: the preset's seed) on the same
    tasks (split with a fixed data seed, so every seed and method is scored on the same test
    examples) and scored with 95% bootstrap intervals (``experiment.seesaw_table``).

    The folder holds ``config.json``, ``metrics.json`` (every run's metrics, per-example scores,
    histories, gate and contribution summaries, and the table), ``results.md``, PNG figures
    (``scores.png``, ``validation_curves.png``, ``gates_<method>_<cluster>.png``,
    ``contributions_<method>_<cluster>.png``) and each method's trained adapters under
    ``adapters/<method>/seed<seed>/`` (a saved ``OnePlusN``: see ``export``).
    """
    import matplotlib.pyplot as plt  # with viz: slow imports that only writing figures needs

    from . import viz

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    seeds = list(seeds) if seeds else [preset.seed]
    start = time.perf_counter()
    model_name = model_name if model_name is not None else preset.model
    if model_name == "tiny":  # the tiny model's weights follow the first seed
        model_name = f"tiny_model(seed={seeds[0]})"
    own = None
    if tasks_file is not None:  # every problem of the file and its data, before the model loads
        from .taskfile import load_task_file

        own = load_task_file(tasks_file)
    model, tokenizer = load_model(model_name)
    if own is None:
        tasks = load_tasks(preset, task_names)
    else:
        from .workflow import file_tasks

        tasks = file_tasks(own[1], own[0], model, tokenizer, preset.max_length, seeds[0], task_names)
    out = Path(out or f"runs/{preset.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(model, seeds=seeds, autocast=autocast_name(model, preset))
    (out / "config.json").write_text(json.dumps({
        "preset": asdict(preset), "seeds": seeds, "methods": list(methods),
        "tasks": {t.name: {"cluster": t.cluster, "metric": t.metric, **t.sizes()} for t in tasks},
        "budget_rule": BUDGET_RULE, "tasks_file": str(tasks_file) if tasks_file else None,
        "provenance": prov}, indent=2) + "\n")

    print(f"zero-shot: {getattr(model, 'name_or_path', '')} on {len(tasks)} tasks", flush=True)
    base = evaluate_tasks(model, tokenizer, tasks, max_prompt_length=prompt_budget(preset.max_length))
    runs = {"base (zero-shot)": [{"scores": base, "trainable_parameters": 0}]}
    for method in methods:
        clusters = {n: [t.name for t in m] for n, m in method_clusters(method, tasks).items()}
        for seed in seeds:
            print(f"\n== {method}, seed {seed}: clusters {clusters}", flush=True)
            runs.setdefault(method, []).append(run_method(
                method, model, tokenizer, tasks, replace(preset, seed=seed), progress,
                save_to=out / "adapters" / method / f"seed{seed}"))

    table = seesaw_table(runs)
    for name, figure in viz.run_figures(runs, table, [t.name for t in tasks]).items():
        figure.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(figure)
    markdown, metrics = write_results(out, runs, table, tasks, prov, preset, seeds,
                                      total_seconds=time.perf_counter() - start)
    print("\n" + markdown + f"\nwrote {out}/ in {metrics['total_seconds']:.0f} s")
    return metrics


def _study(args: argparse.Namespace) -> None:
    from .study import GROUPS, check, run_study

    preset = PRESETS[args.preset or ("gpu" if torch.cuda.is_available() else "cpu")]
    try:  # bad input: a message, before any work
        check(preset, args.groups or GROUPS, args.seeds, args.out, args.arms)
    except ValueError as error:
        raise SystemExit(f"cgclora_lite study: error: {error}") from None
    run_study(preset, args.groups or GROUPS, args.seeds, args.out, progress=not args.quiet,
              model_name=args.model, only=args.arms)


def _run(args: argparse.Namespace) -> None:
    preset_name = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[preset_name]
    if args.steps is not None:
        preset = replace(preset, steps=args.steps)
    if args.gate_norm is not None:
        preset = replace(preset, gate_norm=args.gate_norm)
    if args.gate_lr_scale is not None:
        preset = replace(preset, gate_lr_scale=args.gate_lr_scale)
    methods = list(METHODS) if args.methods == ["all"] else args.methods
    run_experiment(preset, methods, args.model, args.tasks, args.out, progress=not args.quiet,
                   seeds=args.seeds, tasks_file=args.tasks_file)


def _export(args: argparse.Namespace) -> None:
    if args.framework is not None:  # a framework folder written by `train`
        return _export_folder(args, Path(args.framework), f"the framework in {args.framework}")
    if args.method.startswith("modula"):
        raise SystemExit(f"{args.method} cannot be exported as one LoRA or one merged model: its token "
                         "router mixes the experts differently for every token. Load it with "
                         "cgclora_lite.modula.load_modula(model, folder) instead.")
    folder = Path(args.run) / "adapters" / args.method
    if not folder.is_dir():
        found = sorted(p.name for p in (Path(args.run) / "adapters").glob("*"))
        raise SystemExit(f"{folder} not found: the run {args.run} saved adapters for {found or 'no method'}")
    seeds = sorted(p.name for p in folder.glob("seed*"))
    if seeds:  # one trained framework per seed
        chosen = f"seed{args.seed}" if args.seed is not None else seeds[0]
        if chosen not in seeds:
            raise SystemExit(f"{folder} has no {chosen}: the run trained seeds {seeds}")
        folder = folder / chosen
    _export_folder(args, folder, args.method)


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


# --- your own tasks: init, train, evaluate, predict (workflow.py, taskfile.py) -----------------

def _user_errors(handler):
    """Run a command; bad input (a task file's problems, a missing file, a framework that does not
    fit its model...) ends it with the error's message instead of a traceback."""
    @functools.wraps(handler)
    def run(*args, **kwargs) -> None:
        try:
            handler(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError) as error:  # TaskFileError,
            raise SystemExit(f"error: {error}") from error  # CheckpointError: ValueErrors too
    return run


def _machine_preset() -> Preset:
    """The preset whose training values are this machine's defaults: gpu with CUDA, else cpu."""
    return PRESETS["gpu" if torch.cuda.is_available() else "cpu"]


@_user_errors
def _init(args: argparse.Namespace) -> None:
    from .taskfile import write_example

    path = write_example(args.out)
    print(f"wrote {path} (a documented task file) and {path.parent / 'tasks.csv'} (synthetic rows of "
          f"three tasks). Edit them or point the file at your own data, then:\n"
          f"  python -m cgclora_lite train --tasks-file {path} --out my_framework")


@_user_errors
def _train(args: argparse.Namespace) -> None:
    """The ``train`` command: check the task file and its data, then load the model and train."""
    from .taskfile import load_task_file
    from .workflow import TrainSettings, check_out_folder, train_framework

    spec, tasks = load_task_file(args.tasks_file)  # every problem, before the model loads
    preset = _machine_preset()
    batch_size = args.batch_size
    if batch_size is None and preset.batch_size < len(tasks):  # one example of each task per step
        batch_size = len(tasks)
        print(f"batch size {batch_size}: one example of each task per step (the preset's "
              f"{preset.batch_size} is too small for {len(tasks)} tasks)")
    settings = TrainSettings.from_preset(preset, method=args.method, steps=args.steps,
                                         batch_size=batch_size, lr=args.lr,
                                         max_length=args.max_length, seed=args.seed)
    settings.check_tasks(tasks)
    out = check_out_folder(args.out)
    print(f"{len(tasks)} tasks from {args.tasks_file}: " + ", ".join(
        f"{t.name} ({t.metric}; {t.sizes()['train']} train / {t.sizes()['test']} test)" for t in tasks),
        flush=True)
    model, tokenizer = load_model(args.model)
    framework, record = train_framework(model, tokenizer, spec, tasks, settings, out,
                                        progress=not args.quiet)
    import matplotlib.pyplot as plt  # with viz and pandas: slow imports that only the figure needs
    import pandas

    from .viz import training_curves

    history = [{"method": settings.method, "cluster": name, **step}
               for name, cluster in framework.clusters.items() for step in cluster.history]
    figure = training_curves(pandas.DataFrame(history), title=f"Training loss, {settings.method}")
    figure.savefig(out / "training_curves.png", dpi=110)
    plt.close(figure)
    clusters = "; ".join(f"{name}: {', '.join(members)}" for name, members in record["clusters"].items())
    print(f"trained {settings.method} on {getattr(model, 'name_or_path', '?')} in "
          f"{record['train_seconds']:.0f} s ({settings.steps} steps per cluster; "
          f"{record['trainable_parameters']:,} trainable parameters); clusters: {clusters}\n"
          f"saved to {out}/. Next:\n"
          f"  python -m cgclora_lite evaluate --framework {out}\n"
          f"  python -m cgclora_lite predict --framework {out} --task {tasks[0].name} --input '...'\n"
          f"  python -m cgclora_lite export --framework {out} --task {tasks[0].name} "
          f"--out {tasks[0].name}_lora")


@_user_errors
def _evaluate(args: argparse.Namespace) -> None:
    """The ``evaluate`` command: the tasks' data checked, the framework loaded, every task scored."""
    from .workflow import evaluate_framework, framework_tasks, load_framework, table_markdown

    tasks = framework_tasks(args.framework, args.tasks_file)  # checked before the model loads
    if tasks is None:
        raise SystemExit(f"error: {args.framework} has no saved task data (it was not written by "
                         "`train`): give the tasks to evaluate with --tasks-file F")
    if args.tasks:
        unknown = sorted(set(args.tasks) - {t.name for t in tasks})
        if unknown:
            raise SystemExit(f"error: unknown tasks {unknown}; tasks: {[t.name for t in tasks]}")
        tasks = [t for t in tasks if t.name in args.tasks]
    framework = load_framework(args.framework, args.model)
    table, raw = evaluate_framework(framework, tasks, args.split, args.limit, args.batch_size,
                                    args.zero_shot, progress=not args.quiet)
    out = Path(args.out) if args.out else Path(args.framework) / f"evaluation_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"split": args.split, "limit": args.limit,
                               "table": table.to_dict("records"), "results": raw,
                               "provenance": provenance(framework.model)}, indent=1, default=float) + "\n")
    print(f"\n{args.split} split of {args.framework} ({getattr(framework.model, 'name_or_path', '?')}):\n")
    print(table_markdown(table))
    print(f"\n95% percentile-bootstrap intervals over the {args.split} examples (one trained "
          f"model: they cover the luck of the test sample, not of training). Wrote {out}")


@_user_errors
def _predict(args: argparse.Namespace) -> None:
    """The ``predict`` command: requests checked against the framework's tasks, then answered."""
    from .workflow import (
        check_requests,
        framework_task_names,
        load_framework,
        predict,
        read_requests,
        write_predictions,
    )

    if args.input is not None:
        if args.task is None:
            raise SystemExit("error: --input needs --task NAME (the task to answer)")
        rows = [{"input": text} for text in args.input]
        requests = [(args.task, text) for text in args.input]
    else:
        rows, requests = read_requests(args.file, args.task, args.input_column, args.task_column)
    check_requests(framework_task_names(args.framework), requests)  # before the model loads
    framework = load_framework(args.framework, args.model)
    answers = predict(framework, requests, args.batch_size, progress=not args.quiet)
    results = [{**row, "task": task, "answer": answer}
               for row, (task, _), answer in zip(rows, requests, answers)]
    if args.out:
        path = write_predictions(args.out, results)
        print(f"wrote {len(results)} answers to {path}")
    elif args.input is not None:
        print("\n".join(answers))
    else:
        print("".join(json.dumps(row, default=str) + "\n" for row in results), end="")


@_user_errors
def _export_folder(args: argparse.Namespace, folder: Path, what: str) -> None:
    """Export ``args.task`` of the framework saved in ``folder`` (the task checked before the
    model loads); the export's README.md says how to load and serve it."""
    from .workflow import framework_task_names

    names = framework_task_names(folder)
    if args.task not in names:
        raise SystemExit(f"error: {what} has no task {args.task!r}; its tasks: {', '.join(names)}")
    framework = OnePlusN.load(folder)
    path = framework.export(args.task, args.out, args.format)
    how = ("peft.AutoPeftModelForCausalLM.from_pretrained(folder) (or "
           "PeftModel.from_pretrained(base_model, folder))" if args.format == "peft"
           else "transformers.AutoModelForCausalLM.from_pretrained(folder)")
    print(f"exported task {args.task!r} of {what} ({args.format}) to {path}; load it with {how}; "
          f"{path / 'README.md'} says how to serve it")


def _add_own_task_commands(commands) -> None:
    """The commands for your own tasks: ``init``, ``train``, ``evaluate``, ``predict``."""
    from .experiment import CGC_METHODS

    d = _machine_preset()
    init = commands.add_parser(
        "init", help="write a documented example task file and a small synthetic CSV to start from",
        description="Write tasks.yaml (a commented task file: three tasks, two clusters) and "
                    "tasks.csv (synthetic rows) into a folder, to run as they are or to edit.")
    init.add_argument("--out", required=True, help="the folder to write them into")
    init.set_defaults(handler=_init)

    train = commands.add_parser(
        "train", help="train the 1+N framework (or another method) on the tasks of your task file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train CGC-LoRA adapters on your own tasks and save the trained framework to a folder\n"
            "for evaluate, predict and export. The tasks come from a task file (YAML or JSON): each\n"
            "task's data file and columns, instruction, metric, labels, split sizes and cluster\n"
            "(see examples/tasks.yaml, docs/own-tasks.md; `init` writes an example).\n\n"
            "The task file and its data are checked first: every problem is listed at once, before\n"
            "any model loads. Clusters the file leaves open are found by task affinity on the\n"
            f"central model. Defaults follow this machine's `run` preset ({d.name}).\n\n"
            "  python -m cgclora_lite train --tasks-file my_tasks/tasks.yaml --out my_framework"))
    train.add_argument("--tasks-file", required=True, metavar="FILE",
                       help="the task file (.yaml, .yml or .json) declaring your tasks")
    train.add_argument("--out", required=True, metavar="DIR",
                       help="folder for the trained framework (must not hold one already)")
    train.add_argument("--model", default=None,
                       help="the central model: a transformers causal LM name (online) or folder "
                            "(default: the embedded SmolLM2-135M-Instruct, offline; 'tiny': a "
                            "random tiny model for smoke tests)")
    train.add_argument("--method", default="cgc-1+n", choices=CGC_METHODS,
                       help="cgc-1+n: CGC-LoRA, one adapter set per cluster (default); cgc-1+1: "
                            "CGC-LoRA over all tasks; lora: one LoRA for all; per-task-lora; moelora")
    train.add_argument("--steps", type=int, default=None,
                       help=f"optimizer steps per cluster (default {d.steps})")
    train.add_argument("--batch-size", type=int, default=None,
                       help=f"examples per step, shared equally by the tasks (default {d.batch_size}, "
                            "or the number of tasks if larger)")
    train.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr:g})")
    train.add_argument("--max-length", type=int, default=None,
                       help=f"tokens per example; longer inputs are cut (default {d.max_length})")
    train.add_argument("--seed", type=int, default=None, help="training seed (default 0)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate", help="score a trained framework on its tasks: the metrics table with intervals",
        description="Score every task of a framework folder (written by `train`) on a split of "
                    "its data, read again from the task file's sources and checked against what "
                    "training saw. Prints a table (score and 95% bootstrap interval per task) "
                    "and writes it with every answer to FRAMEWORK/evaluation_<split>.json.")
    evaluate.add_argument("--framework", required=True, metavar="DIR", help="the folder written by `train`")
    evaluate.add_argument("--split", default="test", choices=["test", "validation", "train"],
                          help="which examples to score (default: test)")
    evaluate.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="only these tasks")
    evaluate.add_argument("--tasks-file", default=None, metavar="FILE",
                          help="score on the data of this task file instead (tasks matched by name)")
    evaluate.add_argument("--zero-shot", action="store_true",
                          help="also score the central model alone, and the gain over it")
    evaluate.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    evaluate.add_argument("--batch-size", type=int, default=16,
                          help="prompts per generation batch (default 16)")
    evaluate.add_argument("--model", default=None,
                          help="load the central model from here instead of the name the framework "
                               "saved (e.g. a moved folder); it must be the same model")
    evaluate.add_argument("--out", default=None, metavar="FILE",
                          help="the JSON file to write (default: FRAMEWORK/evaluation_<split>.json)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser(
        "predict", help="answer new inputs with a trained framework (one task, or a task per row)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Answer inputs with a framework folder written by `train`, in batches: --input TEXT\n"
            "(repeatable) with --task, or --file F (.csv, .json or .jsonl) with an input column and\n"
            "either --task for every row or a task column (rows of different tasks are each routed\n"
            "to their task's cluster).\n\n"
            "  python -m cgclora_lite predict --framework my_framework --task mood --input 'Tom lost his keys.'\n"
            "  python -m cgclora_lite predict --framework my_framework --file new.csv --out answers.csv"))
    predict.add_argument("--framework", required=True, metavar="DIR", help="the folder written by `train`")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", action="append", metavar="TEXT",
                        help="an input to answer (repeat for several); needs --task")
    source.add_argument("--file", metavar="F", help="a .csv, .json or .jsonl file of inputs")
    predict.add_argument("--task", default=None,
                         help="the task of every input (with --file: overrides a task column)")
    predict.add_argument("--input-column", default="input", help="--file's input column (default: input)")
    predict.add_argument("--task-column", default="task",
                         help="--file's column naming each row's task, used without --task (default: task)")
    predict.add_argument("--out", default=None, metavar="F",
                         help="write the rows with their answers to a .jsonl or .csv file (default: "
                              "print the answers; JSON lines for --file)")
    predict.add_argument("--batch-size", type=int, default=16,
                         help="prompts per generation batch (default 16)")
    predict.add_argument("--model", default=None,
                         help="load the central model from here instead of the name the framework "
                              "saved; it must be the same model")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(handler=_predict)


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
    run.add_argument("--methods", nargs="+", choices=[*METHODS, "all"], default=list(DEMO_METHODS),
                     metavar="METHOD", help=f"methods to compare, or 'all' ({', '.join(METHODS)}); "
                                            f"default: {' '.join(DEMO_METHODS)}")
    run.add_argument("--model", default=None,
                     help="a transformers causal LM name or folder instead of the preset's model "
                          "(default: the embedded SmolLM2-135M-Instruct; 'tiny': the random tiny model)")
    run.add_argument("--tasks", nargs="+", choices=tasks, default=None, metavar="TASK",
                     help=f"a subset of the default tasks ({', '.join(tasks)}); default: all")
    run.add_argument("--tasks-file", default=None, metavar="FILE",
                     help="compare the methods on your own tasks, declared in this task file "
                          "(see `train --help`), instead of the default ones")
    run.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: the preset's)")
    run.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                     help="training seeds: every method is trained once per seed and the intervals "
                          "cover the seeds too (default: the preset's, 0)")
    run.add_argument("--gate-norm", choices=GATE_NORMS, default=None,
                     help="the gated methods' gate: softmax (weights sum to 1, the paper's) or scaled "
                          "(K x softmax: a fresh layer equals the ungated sum); default: the preset's")
    run.add_argument("--gate-lr-scale", type=float, default=None,
                     help="the gate parameters' learning rate over the adapters' (default: the preset's)")
    run.add_argument("--out", default=None, help="run folder (default: runs/<preset>-<date>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=_run)

    study = commands.add_parser(
        "study", help="the study: seeds, ablations of the gate and the experts, budget and capacity "
                      "curves, a positive control; writes OUT.json and OUT.md",
        description="Run the study's groups of arms (see cgclora_lite/study.py) at every seed; "
                    "select on validation loss, report test scores with 95%% intervals.")
    study.add_argument("--groups", nargs="+", default=None, metavar="GROUP",
                       help="methods, gate, split, budget, capacity, control (default: all)")
    study.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="sizes (default: gpu if CUDA is available, else cpu)")
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                       help="training seeds (default: 0 1 2)")
    study.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                       help="only the arms of these names, in every group given, in this order (e.g. 'scaled x10' "
                            "'gate off'; lora is an arm of both methods and control)")
    study.add_argument("--model", default=None, help="a model name or folder instead of the preset's")
    study.add_argument("--out", default="results/study",
                       help="output path without suffix: OUT.json and OUT.md (default: results/study; the "
                            "committed study is docs/results); an existing OUT.json of the same preset and "
                            "seeds is resumed, one of another is refused")
    study.add_argument("--quiet", action="store_true", help="no progress bars")
    study.set_defaults(handler=_study)

    export = commands.add_parser(
        "export", help="write one task of a trained run or framework as a peft LoRA or a merged model",
        description="Export one task of a trained run (a folder written by `run`) or framework (a "
                    "folder written by `train`) as a plain peft LoRA adapter or a merged model; "
                    "its README.md says how to load and serve it (peft, vLLM).")
    trained = export.add_mutually_exclusive_group(required=True)
    trained.add_argument("--run", help="a run folder written by `run` (see --method, --seed)")
    trained.add_argument("--framework", metavar="DIR", help="a framework folder written by `train`")
    export.add_argument("--task", required=True, help="the task to export, e.g. sentiment")
    export.add_argument("--method", default="cgc-1+n", choices=METHODS,
                        help="which trained method's adapters (default: cgc-1+n)")
    export.add_argument("--seed", type=int, default=None,
                        help="which seed's adapters, for a run of several seeds (default: the first)")
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

    _add_own_task_commands(commands)
    _add_bench(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.handler(args)
    return 0

