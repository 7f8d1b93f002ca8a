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

import copy
import json
import statistics
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from .adapters import find_targets
from .cgc import GATHER_ABOVE, CGCConfig
from .inject import inject
from .lora import LoRALinear
from .models import tiny_model
from .provenance import provenance

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


@dataclass(frozen=True)
class BenchConfig:
    """The benchmark's settings, one field per option of ``python -m cgclora_lite bench``.

    Built by the command line or by ``benchmark(**options)``; never changed afterwards (``run``
    works on ``resolved()``, a new config with the defaults that depend on the machine filled in).
    """

    device: str | None = None
    """"cpu" or "cuda"; None: cuda if available."""
    shape: str | None = None
    """Model and batch sizes, a key of ``SHAPES``; None: gpu on cuda, else cpu."""
    layers: int | None = None
    """Override the shape's number of blocks."""
    batch: int | None = None
    """Override the shape's batch size."""
    seq: int | None = None
    """Override the shape's sequence length."""
    dtype: str | None = None
    """Base weights, "float32" or "bfloat16" (which also turns on bf16 autocast); None: bfloat16 on cuda."""
    rank: int = 16
    """Active rank r of every method."""
    dropout: float = 0.0
    """Adapter input dropout of every method, in training steps."""
    tasks: int = 8
    """Tasks in the CGC cluster, all in each batch."""
    common: int = 2
    """CGC task-common experts."""
    specific: int = 2
    """CGC task-specific experts per task."""
    warmup: int = 3
    """Untimed steps of each method."""
    steps: int = 15
    """Timed steps of each method."""
    compile: bool = False
    """``torch.compile`` every model."""
    sweeps: bool = True
    """Run the two sweeps (expert count, task count)."""
    smoke: bool = False
    """Seconds: the smoke shape, 1 warm-up and 2 timed steps, checks only (timings meaningless)."""
    threads: int | None = None
    """CPU threads for torch; None: torch's (1 in smoke mode)."""
    seed: int = 0
    """Random seed of the model, the batch and the adapters."""
    out: str | None = None
    """Write the results as JSON to this file."""

    def __post_init__(self):
        for name, allowed in [("device", ("cpu", "cuda")), ("shape", tuple(SHAPES)),
                              ("dtype", ("float32", "bfloat16"))]:
            if getattr(self, name) not in (None, *allowed):
                raise ValueError(f"{name} must be one of {allowed} or None, got {getattr(self, name)!r}")

    def resolved(self) -> BenchConfig:
        """This config with smoke mode's sizes applied and the device, shape and dtype chosen."""
        config = replace(self, shape="smoke", warmup=1, steps=2, sweeps=True) if self.smoke else self
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return replace(config, device=device,
                       shape=config.shape or ("gpu" if device == "cuda" else "cpu"),
                       dtype=config.dtype or ("bfloat16" if device == "cuda" else "float32"))

    @property
    def sizes(self) -> dict:
        """Model and batch sizes: ``SHAPES[shape]`` with the ``layers``, ``batch``, ``seq`` overrides."""
        overrides = {key: getattr(self, key) for key in ("layers", "batch", "seq")}
        return {**SHAPES[self.shape], **{k: v for k, v in overrides.items() if v is not None}}

    def command(self) -> str:
        """The equivalent command line: the options that differ from their defaults, in field order."""
        words = ["python -m cgclora_lite bench"]
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if f.name == "sweeps":
                words.append("--no-sweeps")
            elif value is True:
                words.append(f"--{f.name}")
            else:
                words.append(f"--{f.name} {value}")
        return " ".join(words)


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


def build(name: str, base, config: BenchConfig, device, *, experts=8, n_tasks=None,
          gathered=None) -> Method:
    """One method on its own copy of ``base``; see the module docstring for the names."""
    rank, alpha, batch, dropout = config.rank, 2.0 * config.rank, config.sizes["batch"], config.dropout
    if name == "base":
        return Method(name, copy.deepcopy(base))
    if name == "lora":
        model = _with_lora(copy.deepcopy(base), rank, alpha, dropout)
        return Method(name, model, params=[p for p in model.parameters() if p.requires_grad])
    if name == "peft":
        model = _with_peft(copy.deepcopy(base), rank, alpha, dropout)
        return Method(name, model, params=[p for p in model.parameters() if p.requires_grad])
    if name in ("loop", "moelora"):
        adapters_config = CGCConfig.moelora(n_experts=experts, rank=rank // experts, alpha=alpha,
                                            dropout=dropout, target_modules=PROJECTIONS)
        model, adapters, ids = _cgc(base, adapters_config, config.tasks, batch, device)
        if name == "loop":
            _use_loop(adapters)
        return Method(name, model, ids, adapters, adapters.parameters())
    if name == "cgc":
        per_expert = rank // (config.common + config.specific)
        adapters_config = CGCConfig(n_common=config.common, n_specific=config.specific,
                                    rank_common=per_expert, rank_specific=per_expert, alpha=alpha,
                                    dropout=dropout, target_modules=PROJECTIONS)
        model, adapters, ids = _cgc(base, adapters_config, n_tasks or config.tasks, batch, device, gathered)
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


def time_steps(methods: list[Method], embeds, labels, config: BenchConfig, amp) -> None:
    """Round-robin: each repetition runs one step of every method in turn; keeps post-warm-up times."""
    for rep in range(config.warmup + config.steps):
        for m in methods:
            seconds = _step(m, embeds, labels, amp)
            if rep >= config.warmup:
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
def time_inference(calls: dict, input_ids, config: BenchConfig, device) -> dict[str, list[float]]:
    """Seconds of each forward pass of each named callable (called with ``input_ids``), round-robin."""
    times = {name: [] for name in calls}
    for rep in range(config.warmup + config.steps):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call(input_ids)
            _sync(device)
            if rep >= config.warmup:
                times[name].append(time.perf_counter() - start)
    return times


# --- correctness ------------------------------------------------------------------------------
def check_fused_against_loop(base, config: BenchConfig, device) -> dict[str, float]:
    """Relative error of logits and adapter gradients, fused against the per-expert loop, for
    MOELoRA and CGC-LoRA (dense and gathered), with random non-zero B and gates, fp32."""
    input_ids = torch.randint(0, config.sizes["vocab"], (config.sizes["batch"], 8), device=device)
    errors = {}
    for name, gathered in [("moelora", None), ("cgc dense", False), ("cgc gathered", True)]:
        m = build(name.split()[0], base, config, device, gathered=gathered)
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
def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def run(config: BenchConfig) -> dict:
    """Run the benchmark ``config`` describes; print tables, return the results."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(config.threads or (1 if config.smoke else threads))
        if not config.compile:
            return _run(config)
        from torch._dynamo import config as dynamo_config

        # transformers' wrappers are one code object for every model copy: allow a graph per copy
        with dynamo_config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
            return _run(config)
    finally:
        torch.set_num_threads(threads)


def benchmark(**options) -> dict:
    """Run the benchmark from Python: ``benchmark(shape="cpu", layers=1, seq=32, steps=10)``.

    The keywords are ``BenchConfig``'s fields, the command's options (``--no-sweeps`` is
    ``sweeps=False``); the rest keep their defaults. The provenance records the equivalent
    command line.
    """
    known = {f.name for f in fields(BenchConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown benchmark options {unknown}; known: {sorted(known)}")
    return run(BenchConfig(**options))


def _run(config: BenchConfig) -> dict:
    command = config.command()
    config = config.resolved()
    device = torch.device(config.device)
    shape = config.sizes
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    amp = dtype != torch.float32
    torch.manual_seed(config.seed)
    base = _base_model(shape, device, dtype)
    record = provenance(device=device, command=command, dtype=config.dtype, autocast_bf16=amp,
                        adapter_dtype="float32 (package adapter_dtype='float32'; "
                                      "peft autocast_adapter_dtype=True)", compile=config.compile)
    results = {"provenance": record, "shape": shape,
               "config": {"rank": config.rank, "alpha": 2.0 * config.rank, "dropout": config.dropout,
                          "tasks": config.tasks, "common": config.common, "specific": config.specific,
                          "warmup": config.warmup, "steps": config.steps, "threads": torch.get_num_threads()}}
    print(f"cgclora_lite bench on {results['provenance']['device_name']} ({device.type}, {dtype}, "
          f"{'compiled' if config.compile else 'eager'}); shape {config.shape}: {shape}")

    results["checks"] = check_fused_against_loop(base, config, device)
    print("fused against per-expert loop, max relative error: "
          + ", ".join(f"{k} {v:.1e}" for k, v in results["checks"].items()))

    labels = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), device=device)
    embeds = base.get_input_embeddings()(labels).detach().requires_grad_(True)  # (B, L, d)

    methods = train_table(results, base, config, device, embeds, labels, amp)
    inference_table(results, methods, base, config, device, labels)
    del methods
    if config.sweeps:
        results["sweeps"] = sweeps(base, config, device, embeds, labels, amp)

    results["criteria"] = criteria(results)
    print("\nmust-show criteria (value, limit)"
          + (": smoke mode, tiny shape and 2 steps, so timings mean nothing" if config.smoke else ""))
    for name, c in results["criteria"].items():
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {name}: {c['value']:.3f} (limit {c['limit']})")
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {config.out}")
    return results


def train_table(results, base, config: BenchConfig, device, embeds, labels, amp) -> dict[str, Method]:
    """Time every method's training step side by side, size its memory; add ``results["train"]``."""
    methods = [_prepare(build(n, base, config, device), config.compile)
               for n in ("base", "lora", "peft", "loop", "moelora", "cgc")]
    time_steps(methods, embeds, labels, config, amp)
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


def inference_table(results, methods: dict[str, Method], base, config: BenchConfig, device, input_ids) -> None:
    """Forward passes: the CGC model merged for one task against the base; unmerged, a batch of
    all ``--tasks`` tasks against a single-task batch and plain LoRA. Adds ``results["inference"]``."""
    merged = _prepare(build("cgc", base, config, device), config.compile)
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
    }, input_ids, config, device)
    rows = [{"call": k, "ms": _median_ms(t), "iqr_%": _spread(t), "x_base": _ratio(t, times["base"]),
             "x_lora": _ratio(t, times["lora"]), "x_single-task": _ratio(t, times["cgc single-task"])}
            for k, t in times.items()]
    results["inference"] = rows
    print(f"\ninference forward, {input_ids.shape[0]} x {input_ids.shape[1]} tokens (median ms; "
          f"mixed-task: {config.tasks} tasks in the batch)\n"
          + _table(rows, ["call", "ms", "iqr_%", "x_base", "x_lora", "x_single-task"]))


def sweeps(base, config: BenchConfig, device, embeds, labels, amp) -> dict:
    """Expert count at fixed total rank (fused vs loop); task count (dense vs gathered)."""
    out = {}
    counts = [k for k in (1, 2, 4, 8, 16) if k <= config.rank] if not config.smoke else [1, 2]
    methods = [_prepare(build("lora", base, config, device), config.compile)]
    for k in counts:
        methods += [_prepare(build(n, base, config, device, experts=k), config.compile)
                    for n in ("moelora", "loop")]
    time_steps(methods, embeds, labels, config, amp)
    lora = methods[0].times
    rows = []
    for k, (fused, loop) in zip(counts, zip(methods[1::2], methods[2::2])):
        rows.append({"experts": k, "rank_each": config.rank // k, "fused_ms": _median_ms(fused.times),
                     "loop_ms": _median_ms(loop.times), "fused_x_lora": _ratio(fused.times, lora),
                     "loop_x_fused": _ratio(loop.times, fused.times)})
    out["experts"] = rows
    columns = ["experts", "rank_each", "fused_ms", "loop_ms", "fused_x_lora", "loop_x_fused"]
    print(f"\nsweep: MOELoRA experts at total rank {config.rank} (plain LoRA {_median_ms(lora):.1f} ms)\n"
          + _table(rows, columns))
    del methods

    task_counts = [t for t in (1, 2, 4, 8, 16) if t <= max(config.sizes["batch"], 2)]
    if config.smoke:
        task_counts = [1, 4]
    methods = [_prepare(build("lora", base, config, device), config.compile)]
    for t in task_counts:
        methods += [_prepare(build("cgc", base, config, device, n_tasks=t, gathered=g), config.compile)
                    for g in (False, True)]
    time_steps(methods, embeds, labels, config, amp)
    lora = methods[0].times
    rows = []
    for t, (dense, gathered) in zip(task_counts, zip(methods[1::2], methods[2::2])):
        total_rank = next(iter(dense.adapters.layers.values())).lora_A.shape[0]
        rows.append({"tasks": t, "total_rank": total_rank, "dense_ms": _median_ms(dense.times),
                     "gathered_ms": _median_ms(gathered.times),
                     "dense_x_lora": _ratio(dense.times, lora), "gathered_x_lora": _ratio(gathered.times, lora),
                     "default": "gathered" if total_rank > GATHER_ABOVE * config.rank else "dense"})
    out["tasks"] = rows
    columns = ["tasks", "total_rank", "dense_ms", "gathered_ms", "dense_x_lora", "gathered_x_lora",
               "default"]
    print(f"\nsweep: tasks in the cluster and the batch, CGC-LoRA {config.common}+{config.specific} "
          f"experts, active rank {config.rank} (plain LoRA {_median_ms(lora):.1f} ms)\n"
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
