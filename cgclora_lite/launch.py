"""Data-parallel training on several processes: ``torchrun`` launches one copy of this per rank.

    torchrun --standalone --nproc_per_node 2 -m cgclora_lite.launch --steps 3 --out runs/ddp
    torchrun --standalone --nproc_per_node 2 -m cgclora_lite.launch --engine trainer ...

Every rank builds the same model, adapters and **global batches** (the same task-balanced sampler
with the same seed), then keeps its own contiguous shard of each global batch: with W ranks and
a global batch of B rows, rank r gets rows ``[r*B/W, (r+1)*B/W)`` (sizes differ by at most one
when W does not divide B). Contiguous shards keep the task mix of a round-robin batch
(``[a, b, a, b, a, b, a, b]`` gives both ranks ``[a, b, a, b]``); strided shards ``r::W`` would
give each rank one task only.

Two engines train the shards as one run:

* ``train`` (default): our ``train.train``, whose ``distributed.GradientSync`` sums the adapter
  gradients over ranks, normalised by the global batch's answer tokens (see ``distributed.py``);
* ``trainer``: ``transformers.Trainer`` through ``hf.make_trainer``, which wraps the model in
  ``DistributedDataParallel`` and averages tokens across devices itself. Trainer draws its own
  batches (a seeded random order, per-device batches of B/W rows), not the task-balanced ones.

Each rank writes its adapter tensors to ``OUT/rank{r}.safetensors``, and rank 0 the history to
``OUT/history.json``: identical files on every rank are the test that the ranks stayed in step.
``python -m cgclora_lite.launch`` without ``torchrun`` is the single-process run on the same
global batches.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from .cgc import CGCConfig
from .data import MultiTaskDataset, task_balanced_loader
from .distributed import world
from .inject import CGCAdapters, inject
from .models import load_model
from .tasks import DEFAULT_CLUSTERS, load_default_tasks
from .train import TrainConfig, train


@dataclass
class RunSpec:
    """What every rank (and the single-process reference) builds identically.

    ``model``: a name for ``models.load_model`` (``"tiny"``: ``tiny_model(seed=0)`` with the
    embedded tokenizer); ``cluster``: a key of ``DEFAULT_CLUSTERS``; ``train_size``: training
    examples per task; ``batch_size``: rows of a *global* batch; ``steps`` optimizer steps.
    """

    model: str = "tiny"
    cluster: str = "classify"
    train_size: int = 8
    max_length: int = 64
    batch_size: int = 8
    steps: int = 3
    lr: float = 1e-2
    seed: int = 0
    config: CGCConfig = field(default_factory=lambda: CGCConfig(
        n_common=1, n_specific=1, rank_common=2, rank_specific=2))


def build(spec: RunSpec, device: torch.device | str = "cpu"):
    """The adapted model, tokenizer and training dataset of ``spec``: ``(adapters, tokenizer, data)``.

    The adapters are initialised from ``spec.seed`` (and broadcast from rank 0 by ``train``).
    """
    if spec.cluster not in DEFAULT_CLUSTERS:
        raise ValueError(f"cluster must be one of {list(DEFAULT_CLUSTERS)}, got {spec.cluster!r}")
    model, tokenizer = load_model(spec.model, device=device)
    names = DEFAULT_CLUSTERS[spec.cluster]
    tasks = [t for t in load_default_tasks(train=spec.train_size, validation=0, test=0)
             if t.name in names]
    data = MultiTaskDataset(tasks, tokenizer, "train", spec.max_length)
    torch.manual_seed(spec.seed)
    adapters = inject(model, spec.config, names)
    return adapters, tokenizer, data


def shard_loader(data: MultiTaskDataset, spec: RunSpec, pad_token_id: int, rank: int = 0,
                 world_size: int = 1) -> DataLoader:
    """This rank's batches: its shard of each of the ``spec.steps`` task-balanced global batches."""
    return task_balanced_loader(data, pad_token_id, spec.batch_size, spec.steps, spec.seed,
                                shard=(rank, world_size))


def train_config(spec: RunSpec) -> TrainConfig:
    """``train``'s settings for ``spec``: ``spec.steps`` steps at ``spec.lr``, no warm-up."""
    return TrainConfig(steps=spec.steps, lr=spec.lr, warmup=0.0, seed=spec.seed)


def run_train(spec: RunSpec, device="cpu", progress: bool = False) -> tuple[CGCAdapters, list[dict]]:
    """Train ``spec`` with ``train.train`` on this rank's shards (all of each batch when alone)."""
    rank, world_size = world()
    adapters, tokenizer, data = build(spec, device)
    loader = shard_loader(data, spec, tokenizer.pad_token_id, rank, world_size)
    return adapters, train(adapters, loader, train_config(spec), progress=progress)


def run_trainer(spec: RunSpec, out: Path, device="cpu") -> tuple[CGCAdapters, list[dict]]:
    """Train ``spec`` with ``transformers.Trainer`` (per-device batches of ``batch_size / W``)."""
    from transformers import TrainingArguments

    from .hf import make_trainer  # imports Trainer: slow, and only this engine needs it

    _, world_size = world()
    if spec.batch_size % world_size:
        raise ValueError(f"--engine trainer needs a global batch ({spec.batch_size}) divisible "
                         f"by the number of processes ({world_size})")
    adapters, tokenizer, data = build(spec, device)
    args = TrainingArguments(
        output_dir=str(out / "trainer"), remove_unused_columns=False, report_to=[],
        use_cpu=torch.device(device).type == "cpu", per_device_train_batch_size=spec.batch_size // world_size,
        max_steps=spec.steps, learning_rate=spec.lr, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, seed=spec.seed, save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = make_trainer(adapters, data, args, pad_token_id=tokenizer.pad_token_id)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    return adapters, history


def save_rank(adapters: CGCAdapters, out: Path, rank: int) -> Path:
    """Write this rank's adapter tensors to ``out/rank{rank}.safetensors``."""
    path = out / f"rank{rank}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in adapters.state_dict().items()}, str(path))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node W -m cgclora_lite.launch",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = RunSpec()
    parser.add_argument("--out", required=True, type=Path, help="folder for rank*.safetensors and history.json")
    parser.add_argument("--engine", choices=("train", "trainer"), default="train")
    parser.add_argument("--model", default=defaults.model, help="'tiny', 'embedded' or a local model folder")
    parser.add_argument("--cluster", default=defaults.cluster, choices=list(DEFAULT_CLUSTERS))
    parser.add_argument("--train-size", type=int, default=defaults.train_size, help="examples per task")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="rows of a global batch")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    spec = RunSpec(model=args.model, cluster=args.cluster, train_size=args.train_size,
                   max_length=args.max_length, batch_size=args.batch_size, steps=args.steps,
                   lr=args.lr, seed=args.seed)

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun sets WORLD_SIZE, RANK, ...
    device = torch.device("cpu")
    if launched and args.engine == "train":
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    try:
        if args.engine == "train":
            adapters, history = run_train(spec, device, progress=not launched)
        else:  # Trainer (accelerate) sets up the process group itself
            adapters, history = run_trainer(spec, args.out, device)
        rank, world_size = world()
        args.out.mkdir(parents=True, exist_ok=True)
        save_rank(adapters, args.out, rank)
        if rank == 0:
            (args.out / "history.json").write_text(json.dumps(
                {"engine": args.engine, "world_size": world_size, "history": history}, indent=1) + "\n")
            print(f"{args.engine} on {world_size} process(es): loss "
                  f"{history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}; adapters in {args.out}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
