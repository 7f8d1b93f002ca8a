"""Command line: ``python -m cgclora_lite demo``.

``demo`` is a short, real demonstration on the embedded model, offline: it answers the test
questions of one cluster of tasks zero-shot, injects CGC-LoRA (task-common + task-specific experts
and a task gate), trains it on mixed-task batches, answers again, prints the gate weights each task
learned, and saves the adapters. On two CPU cores it takes about five minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import CGCConfig, __version__, inject
from .data import (DEFAULT_CLUSTERS, Collator, MultiTaskDataset, TaskBalancedSampler,
                   load_default_tasks)
from .evaluate import generate_answers, label_accuracy
from .models import load_model, model_summary
from .train import TrainConfig, train


def _accuracy_by_task(model, tokenizer, tasks, max_prompt_length) -> dict[str, float]:
    requests = [(t, ex) for t, task in enumerate(tasks) for ex in task.test]
    answers = generate_answers(model, tokenizer, tasks, requests, max_new_tokens=4,
                               max_prompt_length=max_prompt_length)
    scores = {}
    for t, task in enumerate(tasks):
        mine = [(a, ex.target) for (tid, ex), a in zip(requests, answers) if tid == t]
        scores[task.name] = label_accuracy(*zip(*mine))
    return scores


def demo(args: argparse.Namespace) -> dict:
    """Zero-shot, inject, train, evaluate, show the gates, save. Returns the results dict."""
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    print(f"cgclora_lite {__version__}: loading the model ({args.model or 'embedded SmolLM2-135M-Instruct'})")
    model, tokenizer = load_model(args.model)
    summary = model_summary(model)
    print(f"  {summary['name_or_path']}: {summary['num_parameters'] / 1e6:.1f}M parameters, "
          f"{summary['num_layers']} layers, {summary['dtype']} on {summary['device']}")

    names = DEFAULT_CLUSTERS[args.cluster]
    all_tasks = load_default_tasks(train=args.train, validation=0, test=args.test, seed=args.seed)
    tasks = [t for t in all_tasks if t.name in names]
    if any(t.labels is None for t in tasks):
        raise SystemExit(f"the demo scores label tasks; cluster {args.cluster!r} has free-text tasks")
    print(f"\ncluster {args.cluster!r}: tasks {names}, {args.train} training and {args.test} test examples each")

    prompt_room = args.max_length - 8  # evaluation sees inputs cut as in training
    zero_shot = _accuracy_by_task(model, tokenizer, tasks, prompt_room)
    print("zero-shot accuracy: " + ", ".join(f"{k} {v:.2f}" for k, v in zero_shot.items()))

    config = CGCConfig(n_common=2, n_specific=1, rank_common=4, rank_specific=4, alpha=24.0)
    adapters = inject(model, config, names)
    print(f"\ninjected CGC-LoRA: 2 common + 1 specific expert per task, rank 4 each "
          f"(r_active={config.r_active})\n  {adapters.report}")

    data = MultiTaskDataset(tasks, tokenizer, "train", max_length=args.max_length)
    sampler = TaskBalancedSampler(data, batch_size=args.batch_size, seed=args.seed,
                                  num_batches=args.steps)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=Collator(tokenizer.pad_token_id))
    history = train(adapters, loader, TrainConfig(steps=args.steps, lr=args.lr, seed=args.seed))
    print(f"training loss: first {history[0]['loss']:.3f}, last {history[-1]['loss']:.3f} "
          f"({history[-1]['seconds']:.0f} s)")

    trained = _accuracy_by_task(model, tokenizer, tasks, prompt_room)
    print("accuracy after training: " + ", ".join(f"{k} {v:.2f}" for k, v in trained.items()))

    gates = adapters.gate_weights()
    mean = gates.weights.mean(0)  # (task, expert), averaged over layers
    print("\ngate weights (mean over layers; each task may use the common experts and its own):")
    width = max(len(e) for e in gates.experts)
    print(" " * 10 + "".join(f"{e:>{width + 2}}" for e in gates.experts))
    for t, task in enumerate(gates.tasks):
        print(f"{task:<10}" + "".join(f"{w:>{width + 2}.3f}" for w in mean[t].tolist()))

    out = Path(args.out)
    adapters.save(out / "adapters")
    results = {
        "model": summary, "cluster": args.cluster, "tasks": names, "zero_shot": zero_shot,
        "trained": trained, "steps": args.steps, "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"], "seconds": time.perf_counter() - start,
        "torch": torch.__version__, "cgclora_lite": __version__,
    }
    (out / "demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved the adapters and demo.json to {out}/ (total {results['seconds']:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cgclora_lite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="a short real run on the embedded model (about 5 min on a CPU)")
    d.add_argument("--cluster", default="classify", choices=sorted(DEFAULT_CLUSTERS),
                   help="which cluster of default tasks to train (default: classify)")
    d.add_argument("--model", default=None, help="a transformers model name or folder (default: embedded)")
    d.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    d.add_argument("--batch-size", type=int, default=8, help="examples per step, tasks balanced (default: 8)")
    d.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    d.add_argument("--train", type=int, default=200, help="training examples per task (default: 200)")
    d.add_argument("--test", type=int, default=40, help="test examples per task (default: 40)")
    d.add_argument("--max-length", type=int, default=96, help="tokens per training example (default: 96)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
