"""Benchmark: CGC-LoRA against plain LoRA, peft, the per-expert loop and the frozen base, side by side.

    python -m cgclora_lite bench                          # CPU: a few minutes on 2 cores
    python -m cgclora_lite bench --device cuda --compile  # GPU, eager then torch.compile
    python -m cgclora_lite bench --smoke                  # seconds: a tiny shape, checks only

One process builds one random-weight model of SmolLM2-135M's layer shapes (``--shape``), copies
it once per method, adapts all 7 projections of every block and trains every copy on the *same*
batch. Training steps (forward, backward, AdamW) are timed round-robin, one step of each method in
turn, so that a noisy machine slows all of them alike; the table gives medians. Methods:

* ``base``: the frozen model, activation gradients only (the floor any adapter pays on top of);
* ``lora``: the package's ``LoRALinear``, rank r;
* ``peft``: peft's LoRA, rank r (adapters in fp32, like every adapter here);
* ``loop``: MOELoRA, 8 experts of rank r/8, computed expert by expert (``reference_forward``);
* ``moelora``: the same experts, fused (``CGCLoRALinear.forward``);
* ``cgc``: CGC-LoRA, ``--common`` + ``--specific`` experts of rank r/(K_c + K_s) for ``--tasks``
  tasks: the same active rank r, one task per sample, all tasks mixed in the batch.

Memory: the bytes autograd keeps for backward (saved activations, every device), the adapters'
weights, gradients and AdamW moments, and on CUDA the allocator's peak during a step. Inference:
the merged CGC model (one task) against the base, and the unmerged model on a batch that mixes
every task against a single-task batch and against plain LoRA. Sweeps: the expert count at fixed
total rank (fused against the loop), and the number of tasks (dense against gathered rank layout).
Every run first checks the fused layers against the per-expert loop (outputs and gradients).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .cgc import GATHER_ABOVE, CGCConfig
from .inject import find_targets, inject
from .lora import LoRALinear
from .models import tiny_model

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # SmolLM2-135M: d=576, 1536 MLP, 9 heads, 3 kv heads, 30 blocks
    "smoke": dict(hidden=64, intermediate=128, heads=4, kv_heads=2, layers=1, batch=8, seq=8, vocab=128),
    "cpu": dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=2, batch=8, seq=64,
                vocab=2048),
    "gpu": dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=30, batch=16, seq=1024,
                vocab=49152),
}
LIMITS = {  # the "must show" bounds
    "cgc / lora step": 1.05, "cgc / peft step": 1.0, "loop / moelora step at 8 experts (min)": 4.0,
    "fused step, most / fewest experts": 1.05, "cgc / peft saved activations": 1.05,
    "cgc / peft training memory (activations + adapter state)": 1.05, "cgc / peft peak memory": 1.05,
    "merged / base inference": 1.02, "mixed / single-task inference": 1.10,
    "cgc / base step, compiled (stretch)": 1.5,
}


@dataclass
class Method:
    """One adapted copy of the model and how to train it: ``ids`` are routed task ids or None."""

    name: str
    model: nn.Module
    ids: torch.Tensor | None = None
    adapters: object = None
    params: list = field(default_factory=list)
    call: object = None  # the model, or its compiled version
    optimizer: object = None
    times: list = field(default_factory=list)


# --- building the methods ---------------------------------------------------------------------
def _base_model(shape: dict, device, dtype) -> nn.Module:
    model = tiny_model(seed=0, vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                       intermediate_size=shape["intermediate"], num_layers=shape["layers"],
                       num_heads=shape["heads"], num_kv_heads=shape["kv_heads"],
                       max_position_embeddings=max(512, shape["seq"]))
    return model.to(device=device, dtype=dtype).requires_grad_(False)


def _with_lora(model: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    for name in find_targets(model, PROJECTIONS):
        model.set_submodule(name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return model


def _with_peft(model: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=PROJECTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a transformers deprecation peft triggers
        return get_peft_model(model, config)  # autocast_adapter_dtype=True: fp32 adapters


def _use_loop(adapters) -> None:
    """Make every adapted layer compute expert by expert (the readable reference)."""
    for layer in adapters.layers.values():
        layer.forward = layer.reference_forward


def _set_gathered(adapters, gathered: bool) -> None:
    for layer in adapters.layers.values():
        layer.gathered = gathered


def _cgc(base, config: CGCConfig, n_tasks: int, batch: int, device, gathered=None):
    model = copy.deepcopy(base)
    adapters = inject(model, config, [f"task{t}" for t in range(n_tasks)])
    if gathered is not None:
        _set_gathered(adapters, gathered)
    ids = (torch.arange(batch) % n_tasks).to(device)  # (B,): every task, round-robin
    return model, adapters, ids


def build(name: str, base, args, device, *, experts=8, n_tasks=None, gathered=None) -> Method:
    """One method on its own copy of ``base``; see the module docstring for the names."""
    rank, alpha, batch, dropout = args.rank, 2.0 * args.rank, args.shape_dict["batch"], args.dropout
    if name == "base":
        return Method(name, copy.deepcopy(base))
    if name == "lora":
        model = _with_lora(copy.deepcopy(base), rank, alpha, dropout)
        return Method(name, model, params=[p for p in model.parameters() if p.requires_grad])
    if name == "peft":
        model = _with_peft(copy.deepcopy(base), rank, alpha, dropout)
        return Method(name, model, params=[p for p in model.parameters() if p.requires_grad])
    if name in ("loop", "moelora"):
        config = CGCConfig.moelora(n_experts=experts, rank=rank // experts, alpha=alpha,
                                   dropout=dropout, target_modules=PROJECTIONS)
        model, adapters, ids = _cgc(base, config, args.tasks, batch, device)
        if name == "loop":
            _use_loop(adapters)
        return Method(name, model, ids, adapters, adapters.parameters())
    if name == "cgc":
        per_expert = rank // (args.common + args.specific)
        config = CGCConfig(n_common=args.common, n_specific=args.specific, rank_common=per_expert,
                           rank_specific=per_expert, alpha=alpha, dropout=dropout,
                           target_modules=PROJECTIONS)
        model, adapters, ids = _cgc(base, config, n_tasks or args.tasks, batch, device, gathered)
        return Method(name, model, ids, adapters, adapters.parameters())
    raise ValueError(f"unknown method {name!r}")


# --- measuring --------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(m: Method, embeds, labels, amp) -> torch.Tensor:
    with torch.autocast(embeds.device.type, torch.bfloat16, enabled=amp):
        if m.adapters is None:
            return m.call(inputs_embeds=embeds, labels=labels).loss
        with m.adapters.route(m.ids):
            return m.call(inputs_embeds=embeds, labels=labels).loss


def _step(m: Method, embeds, labels, amp) -> float:
    """One training step (forward, backward, AdamW); returns seconds."""
    device = embeds.device
    _sync(device)
    start = time.perf_counter()
    _loss(m, embeds, labels, amp).backward()
    if m.optimizer is not None:
        m.optimizer.step()
        m.optimizer.zero_grad(set_to_none=True)
    _sync(device)
    embeds.grad = None
    return time.perf_counter() - start


def _memory(m: Method, embeds, labels, amp) -> dict:
    """Bytes kept for backward (saved activations, parameters excluded), adapter state, peak."""
    frozen = {p.untyped_storage().data_ptr() for p in m.model.parameters()}
    frozen |= {b.untyped_storage().data_ptr() for b in m.model.buffers()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    device = embeds.device
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(m, embeds, labels, amp)
    loss.backward()
    if m.optimizer is not None:
        m.optimizer.step()
        m.optimizer.zero_grad(set_to_none=True)
    embeds.grad = None
    state = sum(p.numel() * p.element_size() for p in m.params) * 4  # weight, grad, 2 AdamW moments
    out = {"saved_mb": sum(saved.values()) / 2**20, "adapter_state_mb": state / 2**20}
    out["train_mb"] = out["saved_mb"] + out["adapter_state_mb"]
    if device.type == "cuda":
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
    return out


def _prepare(m: Method, compile_: bool, lr: float = 1e-4) -> Method:
    m.model.train()
    m.call = torch.compile(m.model) if compile_ else m.model
    if m.params:
        m.optimizer = torch.optim.AdamW(m.params, lr=lr, fused=True)  # one kernel per step
    return m


def time_steps(methods: list[Method], embeds, labels, args, amp) -> None:
    """Round-robin: each repetition runs one step of every method in turn; keeps post-warm-up times."""
    for rep in range(args.warmup + args.steps):
        for m in methods:
            seconds = _step(m, embeds, labels, amp)
            if rep >= args.warmup:
                m.times.append(seconds)


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _ratio(times: list[float], reference: list[float]) -> float:
    """Median over repetitions of the time ratio to the reference method in that repetition (the
    two ran back to back, so a slow spell of a shared machine cancels out)."""
    return statistics.median(a / b for a, b in zip(times, reference))


def _spread(times: list[float]) -> float:
    """Interquartile range over the median, in percent: how noisy this method's steps were."""
    if len(times) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return 100 * (q3 - q1) / statistics.median(times)


@torch.inference_mode()
def time_inference(calls: dict, input_ids, args, device) -> dict[str, list[float]]:
    """Seconds of each forward pass of each named callable (called with ``input_ids``), round-robin."""
    times = {name: [] for name in calls}
    for rep in range(args.warmup + args.steps):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call(input_ids)
            _sync(device)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return times


# --- correctness ------------------------------------------------------------------------------
def check_fused_against_loop(base, args, device) -> dict[str, float]:
    """Relative error of logits and adapter gradients, fused against the per-expert loop, for
    MOELoRA and CGC-LoRA (dense and gathered), with random non-zero B and gates, fp32."""
    input_ids = torch.randint(0, args.shape_dict["vocab"], (args.shape_dict["batch"], 8), device=device)
    errors = {}
    for name, gathered in [("moelora", None), ("cgc dense", False), ("cgc gathered", True)]:
        m = build(name.split()[0], base, args, device, gathered=gathered)
        m.model.float().eval()  # eval: no dropout (inject leaves new layers in training mode)
        with torch.no_grad():
            for p in m.params:
                p.normal_(std=0.05)
        results = []
        for loop in (False, True):
            if loop:
                _use_loop(m.adapters)
            with m.adapters.route(m.ids):
                logits = m.model(input_ids).logits
            grads = torch.autograd.grad(logits.square().mean(), m.params)
            results.append((logits.detach(), grads))
        (fused, g_fused), (ref, g_ref) = results
        pairs = [(fused, ref)] + list(zip(g_fused, g_ref))
        errors[name] = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in pairs)
    return errors


# --- the run ----------------------------------------------------------------------------------
def _provenance(args, device, dtype) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cgclora_lite": __version__}
    for package in ("transformers", "peft"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    return {
        "device": device.type, "device_name": name, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "versions": versions, "git": commit,
        "dtype": str(dtype).removeprefix("torch."), "autocast_bf16": dtype != torch.float32,
        "adapter_dtype": "float32 (package adapter_dtype='float32'; peft autocast_adapter_dtype=True)",
        "compile": args.compile, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m cgclora_lite " + " ".join(args.argv),
    }


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by ``args`` (see ``add_parser``); print tables, return results."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or (1 if args.smoke else threads))
        if not args.compile:
            return _run(args)
        from torch._dynamo import config as dynamo_config

        # transformers' wrappers are one code object for every model copy: allow a graph per copy
        with dynamo_config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def benchmark(**options) -> dict:
    """Run the benchmark from Python: ``benchmark(shape="cpu", layers=1, seq=32, steps=10)``.

    The keywords are the command's options (``--no-sweeps`` is ``sweeps=False``); the rest keep
    the command's defaults. The provenance records the equivalent command line.
    """
    parser = argparse.ArgumentParser(add_help=False)
    command = add_parser(parser.add_subparsers())
    known = {a.dest for a in command._actions}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown benchmark options {unknown}; known: {sorted(known - {'help'})}")
    args = command.parse_args([])
    for key, value in options.items():
        setattr(args, key, value)
    args.argv = ["bench"] + [f"--{k.replace('_', '-')}" if v is True else
                             f"--no-{k}" if (k == "sweeps" and v is False) else
                             f"--{k.replace('_', '-')} {v}" for k, v in options.items()]
    return run(args)


def _run(args: argparse.Namespace) -> dict:
    if args.smoke:
        args.shape, args.warmup, args.steps, args.sweeps = "smoke", 1, 2, True
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.shape = args.shape or ("gpu" if device.type == "cuda" else "cpu")
    shape = dict(SHAPES[args.shape])
    for key in ("layers", "batch", "seq"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    args.shape_dict = shape
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    amp = dtype != torch.float32
    args.argv = getattr(args, "argv", None) or sys.argv[1:]
    torch.manual_seed(args.seed)
    base = _base_model(shape, device, dtype)
    results = {"provenance": _provenance(args, device, dtype), "shape": shape,
               "config": {"rank": args.rank, "alpha": 2.0 * args.rank, "dropout": args.dropout,
                          "tasks": args.tasks, "common": args.common, "specific": args.specific,
                          "warmup": args.warmup, "steps": args.steps, "threads": torch.get_num_threads()}}
    print(f"cgclora_lite bench on {results['provenance']['device_name']} ({device.type}, {dtype}, "
          f"{'compiled' if args.compile else 'eager'}); shape {args.shape}: {shape}")

    results["checks"] = check_fused_against_loop(base, args, device)
    print("fused against per-expert loop, max relative error: "
          + ", ".join(f"{k} {v:.1e}" for k, v in results["checks"].items()))

    labels = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), device=device)
    embeds = base.get_input_embeddings()(labels).detach().requires_grad_(True)  # (B, L, d)

    methods = train_table(results, base, args, device, embeds, labels, amp)
    inference_table(results, methods, base, args, device, labels)
    del methods
    if args.sweeps:
        results["sweeps"] = sweeps(base, args, device, embeds, labels, amp)

    results["criteria"] = criteria(results)
    print("\nmust-show criteria (value, limit)"
          + (": smoke mode, tiny shape and 2 steps, so timings mean nothing" if args.smoke else ""))
    for name, c in results["criteria"].items():
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {name}: {c['value']:.3f} (limit {c['limit']})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return results


def train_table(results, base, args, device, embeds, labels, amp) -> dict[str, Method]:
    """Time every method's training step side by side, size its memory; add ``results["train"]``."""
    methods = [_prepare(build(n, base, args, device), args.compile)
               for n in ("base", "lora", "peft", "loop", "moelora", "cgc")]
    time_steps(methods, embeds, labels, args, amp)
    by_name = {m.name: m for m in methods}
    rows = []
    for m in methods:
        row = {"method": m.name, "step_ms": _median_ms(m.times), "iqr_%": _spread(m.times),
               "min_ms": 1e3 * min(m.times), **_memory(m, embeds, labels, amp),
               "trainable": sum(p.numel() for p in m.params)}
        row.update({f"x_{ref}": _ratio(m.times, by_name[ref].times) for ref in ("base", "lora", "peft")})
        rows.append({**row, "times_ms": [round(1e3 * t, 3) for t in m.times]})
    results["train"] = rows
    columns = ["method", "step_ms", "iqr_%", "x_base", "x_lora", "x_peft", "saved_mb", "train_mb",
               "trainable"]
    if device.type == "cuda":
        columns.insert(6, "peak_mb")
    print("\ntraining step (median ms, its interquartile range in %; median paired ratios to base, "
          "lora, peft; memory in MiB)\n" + _table(rows, columns))
    return by_name


def inference_table(results, methods: dict[str, Method], base, args, device, input_ids) -> None:
    """Forward passes: the CGC model merged for one task against the base; unmerged, a batch of
    all ``--tasks`` tasks against a single-task batch and plain LoRA. Adds ``results["inference"]``."""
    merged = _prepare(build("cgc", base, args, device), args.compile)
    merged.adapters.merge("task0")
    cgc = methods["cgc"]
    single = torch.zeros_like(cgc.ids)  # (B,): every sample task 0

    def routed(m: Method, ids):
        def call(input_ids):
            with m.adapters.route(ids):
                return m.call(input_ids)
        return call

    for m in [*methods.values(), merged]:
        m.model.eval()
    times = time_inference({
        "base": methods["base"].call, "lora": methods["lora"].call, "cgc merged": routed(merged, single),
        "cgc single-task": routed(cgc, single), "cgc mixed-task": routed(cgc, cgc.ids),
    }, input_ids, args, device)
    rows = [{"call": k, "ms": _median_ms(t), "iqr_%": _spread(t), "x_base": _ratio(t, times["base"]),
             "x_lora": _ratio(t, times["lora"]), "x_single-task": _ratio(t, times["cgc single-task"])}
            for k, t in times.items()]
    results["inference"] = rows
    print(f"\ninference forward, {input_ids.shape[0]} x {input_ids.shape[1]} tokens (median ms; "
          f"mixed-task: {args.tasks} tasks in the batch)\n"
          + _table(rows, ["call", "ms", "iqr_%", "x_base", "x_lora", "x_single-task"]))


def sweeps(base, args, device, embeds, labels, amp) -> dict:
    """Expert count at fixed total rank (fused vs loop); task count (dense vs gathered)."""
    out = {}
    counts = [k for k in (1, 2, 4, 8, 16) if k <= args.rank] if not args.smoke else [1, 2]
    methods = [_prepare(build("lora", base, args, device), args.compile)]
    for k in counts:
        methods += [_prepare(build(n, base, args, device, experts=k), args.compile)
                    for n in ("moelora", "loop")]
    time_steps(methods, embeds, labels, args, amp)
    lora = methods[0].times
    rows = []
    for k, (fused, loop) in zip(counts, zip(methods[1::2], methods[2::2])):
        rows.append({"experts": k, "rank_each": args.rank // k, "fused_ms": _median_ms(fused.times),
                     "loop_ms": _median_ms(loop.times), "fused_x_lora": _ratio(fused.times, lora),
                     "loop_x_fused": _ratio(loop.times, fused.times)})
    out["experts"] = rows
    columns = ["experts", "rank_each", "fused_ms", "loop_ms", "fused_x_lora", "loop_x_fused"]
    print(f"\nsweep: MOELoRA experts at total rank {args.rank} (plain LoRA {_median_ms(lora):.1f} ms)\n"
          + _table(rows, columns))
    del methods

    task_counts = [t for t in (1, 2, 4, 8, 16) if t <= max(args.shape_dict["batch"], 2)]
    if args.smoke:
        task_counts = [1, 4]
    methods = [_prepare(build("lora", base, args, device), args.compile)]
    for t in task_counts:
        methods += [_prepare(build("cgc", base, args, device, n_tasks=t, gathered=g), args.compile)
                    for g in (False, True)]
    time_steps(methods, embeds, labels, args, amp)
    lora = methods[0].times
    rows = []
    for t, (dense, gathered) in zip(task_counts, zip(methods[1::2], methods[2::2])):
        total_rank = next(iter(dense.adapters.layers.values())).lora_A.shape[0]
        rows.append({"tasks": t, "total_rank": total_rank, "dense_ms": _median_ms(dense.times),
                     "gathered_ms": _median_ms(gathered.times),
                     "dense_x_lora": _ratio(dense.times, lora), "gathered_x_lora": _ratio(gathered.times, lora),
                     "default": "gathered" if total_rank > GATHER_ABOVE * args.rank else "dense"})
    out["tasks"] = rows
    columns = ["tasks", "total_rank", "dense_ms", "gathered_ms", "dense_x_lora", "gathered_x_lora",
               "default"]
    print(f"\nsweep: tasks in the cluster and the batch, CGC-LoRA {args.common}+{args.specific} "
          f"experts, active rank {args.rank} (plain LoRA {_median_ms(lora):.1f} ms)\n"
          + _table(rows, columns))
    return out


def criteria(results: dict) -> dict:
    """The issue's must-show ratios from this run, each with its limit and whether it holds."""
    train = {r["method"]: r for r in results["train"]}
    inf = {row["call"]: row for row in results["inference"]}
    values = {
        "cgc / lora step": train["cgc"]["x_lora"],
        "cgc / peft step": train["cgc"]["x_peft"],
        "loop / moelora step at 8 experts (min)": _ratio(train["loop"]["times_ms"], train["moelora"]["times_ms"]),
        "cgc / peft saved activations": train["cgc"]["saved_mb"] / train["peft"]["saved_mb"],
        "cgc / peft training memory (activations + adapter state)":
            train["cgc"]["train_mb"] / train["peft"]["train_mb"],
        "merged / base inference": inf["cgc merged"]["x_base"],
        "mixed / single-task inference": inf["cgc mixed-task"]["x_single-task"],
    }
    if "peak_mb" in train["cgc"]:
        values["cgc / peft peak memory"] = train["cgc"]["peak_mb"] / train["peft"]["peak_mb"]
    if "sweeps" in results:
        fused = [r["fused_x_lora"] for r in results["sweeps"]["experts"]]
        values["fused step, most / fewest experts"] = fused[-1] / fused[0]
    if results["provenance"]["compile"]:
        values["cgc / base step, compiled (stretch)"] = train["cgc"]["x_base"]
    out = {}
    for name, value in values.items():
        limit = LIMITS[name]
        ok = value >= limit if "(min)" in name else value <= limit
        out[name] = {"value": value, "limit": limit, "pass": bool(ok)}
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` command to an argparse sub-parser set; its handler is ``run``."""
    p = subparsers.add_parser(
        "bench", help="time and size CGC-LoRA against LoRA, peft, the per-expert loop and the base",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="model and batch sizes: " + "; ".join(
                       f"{k}: {v['layers']} blocks of d={v['hidden']}, {v['batch']} x {v['seq']} tokens"
                       for k, v in SHAPES.items()) + " (default: gpu on cuda, else cpu)")
    p.add_argument("--layers", type=int, default=None, help="override the shape's number of blocks")
    p.add_argument("--batch", type=int, default=None, help="override the shape's batch size")
    p.add_argument("--seq", type=int, default=None, help="override the shape's sequence length")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="base weights; bfloat16 also turns on bf16 autocast (default: bfloat16 on cuda)")
    p.add_argument("--rank", type=int, default=16, help="active rank r of every method (default 16)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="adapter input dropout of every method, in training steps (default 0)")
    p.add_argument("--tasks", type=int, default=8,
                   help="tasks in the CGC cluster, all in each batch (default 8)")
    p.add_argument("--common", type=int, default=2, help="CGC task-common experts (default 2)")
    p.add_argument("--specific", type=int, default=2,
                   help="CGC task-specific experts per task (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each method (default 3)")
    p.add_argument("--steps", type=int, default=15, help="timed steps of each method (default 15)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--no-sweeps", dest="sweeps", action="store_false", help="skip the two sweeps")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: tiny shape, 2 timed steps, checks fused == loop (timings meaningless)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; 1 with --smoke). On a shared machine "
                        "1 avoids threads waiting on each other for a busy core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.set_defaults(handler=run)
    return p
