"""Task affinity and clustering on the tiny model with the real tokenizer: the measures recover
known groups of synthetic tasks, leave the model as it was, and feed the clustermap, the CLI and
``OnePlusN.add_clusters``."""

import json
import random

import matplotlib
import numpy as np
import pytest
import torch

from cgclora_lite import CGCConfig, attached_adapters, inject
from cgclora_lite.cli import main
from cgclora_lite.affinity import Affinity, cluster_tasks, task_affinity
from cgclora_lite.cgc import CGCLoRALinear
from cgclora_lite.tasks import Example, Task
from cgclora_lite.framework import OnePlusN
from cgclora_lite.models import load_tokenizer, tiny_model
from cgclora_lite.viz import affinity_clustermap

matplotlib.use("Agg")

COLOURS = ["red", "green", "blue", "yellow"]
ANIMAL_OF = dict(zip(COLOURS, ["dog", "cat", "fish", "bird"]))  # group B's fixed mapping
COPY = ["Repeat the first word: {input}", "Which word comes first? {input}",
        "Say the opening word of: {input}"]
CODE = ["Give the code word for the first word: {input}",
        "Translate the first word with the key: {input}"]


def synthetic_task(name: str, instruction: str, answer, seed: int, n: int = 16) -> Task:
    """Inputs are three random colours; the answer is ``answer(first colour)``."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        words = [rng.choice(COLOURS) for _ in range(3)]
        examples.append(Example(" ".join(words), answer(words[0]), name))
    return Task(name, "synthetic", instruction, "exact_match", train=examples)


def two_groups(seed: int) -> list[Task]:
    """Group A (copy1-3) answers with the input's first word; group B (code1-2) answers the same
    inputs with a fixed, conflicting word. Each task has its own wording and its own inputs.
    Listed interleaved, so that no clustering can succeed by keeping the order."""
    copy = [synthetic_task(f"copy{k + 1}", text, lambda w: w, 100 * seed + k)
            for k, text in enumerate(COPY)]
    code = [synthetic_task(f"code{k + 1}", text, ANIMAL_OF.get, 100 * seed + 50 + k)
            for k, text in enumerate(CODE)]
    return [copy[0], code[0], copy[1], code[1], copy[2]]


GROUPS = {"cluster1": ["copy1", "copy2", "copy3"], "cluster2": ["code1", "code2"]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def hand_made(values, tasks=("a", "b", "c", "d"), method="lookahead") -> Affinity:
    return Affinity.from_dict({"method": method, "tasks": list(tasks), "matrix": values})


@pytest.mark.parametrize("method", ["gradient", "lookahead"])
def test_affinity_recovers_two_groups_of_synthetic_tasks(tokenizer, method):
    for seed in (0, 1):
        tasks = two_groups(seed)
        affinity = task_affinity(tiny_model(seed=seed), tokenizer, tasks, method, batch_size=8,
                                 batches=2, lr=1.0, max_length=64, seed=seed)
        assert affinity.tasks == [t.name for t in tasks] and affinity.method == method
        assert cluster_tasks(affinity, 2) == GROUPS, (seed, affinity.matrix.round(3))
        S = affinity.symmetric()
        within = [S.loc[a, b] for members in GROUPS.values() for a in members for b in members if a != b]
        across = [S.loc[a, b] for a in GROUPS["cluster1"] for b in GROUPS["cluster2"]]
        assert min(within) > max(across), (seed, S.round(3))
        assert min(within) > 0 > np.mean(across), (seed, S.round(3))  # same rule helps, conflict hurts
    if method == "gradient":
        assert np.allclose(np.diag(affinity.matrix), 1) and np.allclose(S, affinity.matrix)


def test_model_is_left_exactly_as_before(tokenizer):
    model = tiny_model(seed=0).train()
    model.model.norm.weight.requires_grad_(False)  # a mix of flags, restored one by one
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    rng = torch.get_rng_state()
    tasks = two_groups(0)[:2]
    first = task_affinity(model, tokenizer, tasks, "lookahead", batches=1, lr=5.0, max_length=64)
    task_affinity(model, tokenizer, tasks, "gradient", batches=1, max_length=64)
    assert attached_adapters(model) is None
    assert not any(isinstance(m, CGCLoRALinear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())
    assert list(model.state_dict()) == list(weights)
    assert torch.equal(torch.get_rng_state(), rng)
    again = task_affinity(model, tokenizer, tasks, "lookahead", batches=1, lr=5.0, max_length=64)
    assert again.matrix.equals(first.matrix)  # same seed, same batches, same numbers


def test_errors_say_what_to_do(tokenizer):
    model, tasks = tiny_model(seed=0), two_groups(0)
    with pytest.raises(ValueError, match="at least two tasks"):
        task_affinity(model, tokenizer, tasks[:1])
    with pytest.raises(ValueError, match="method must be one of \\('gradient', 'lookahead'\\)"):
        task_affinity(model, tokenizer, tasks, method="hessian")
    with pytest.raises(ValueError, match="task-specific expert.*CGCConfig.lora"):
        task_affinity(model, tokenizer, tasks, config=CGCConfig(n_common=1, n_specific=1))
    no_data = Task("empty", "synthetic", "{input}", "exact_match")
    with pytest.raises(ValueError, match="'empty' has no 'train' examples"):
        task_affinity(model, tokenizer, [tasks[0], no_data])
    adapters = inject(model, CGCConfig.lora(rank=2), ["x"])
    with pytest.raises(RuntimeError, match="detach\\(\\) its adapters first"):
        task_affinity(model, tokenizer, tasks)
    adapters.detach()
    affinity = hand_made(np.eye(4).tolist())
    for bad in (0, 5, 1.5):
        with pytest.raises(ValueError, match="n_clusters must be an integer from 1 to the number "
                                             "of tasks \\(4"):
            cluster_tasks(affinity, bad)
    with pytest.raises(ValueError, match="linkage must be one of.*Ward"):
        cluster_tasks(affinity, 2, linkage="ward")
    with pytest.raises(ValueError, match="non-finite"):
        cluster_tasks(hand_made([[1, np.nan], [0, 1]], tasks="ab"), 2)


def test_cluster_names_follow_task_order_and_use_the_symmetric_affinity():
    # a and c help each other, b and d more so; M is asymmetric (c -> a is weak): the clusters
    # come from its symmetric part.
    M = [[0.9, -0.2, 0.6, -0.1],
         [-0.3, 0.8, -0.2, 0.5],
         [0.2, -0.1, 0.7, -0.2],
         [-0.1, 0.7, -0.3, 0.9]]
    affinity = hand_made(M)
    assert np.allclose(affinity.symmetric().loc["a", "c"], 0.4)
    assert cluster_tasks(affinity, 2) == {"cluster1": ["a", "c"], "cluster2": ["b", "d"]}
    assert cluster_tasks(affinity, 1) == {"cluster1": ["a", "b", "c", "d"]}
    assert cluster_tasks(affinity, 4) == {f"cluster{k + 1}": [t] for k, t in enumerate("abcd")}
    assert cluster_tasks(affinity, 3) == {"cluster1": ["a"], "cluster2": ["b", "d"], "cluster3": ["c"]}
    frame = affinity.to_frame()
    assert list(frame.columns) == ["source", "target", "affinity"] and len(frame) == 16
    assert frame.query("source == 'c' and target == 'a'")["affinity"].item() == 0.2
    assert Affinity.from_dict(json.loads(json.dumps(affinity.to_dict()))).matrix.equals(affinity.matrix)


def test_clustermap_orders_by_cluster_and_labels_everything():
    affinity = hand_made([[0.9, -0.2, 0.6, -0.1], [-0.3, 0.8, -0.2, 0.5],
                          [0.2, -0.1, 0.7, -0.2], [-0.1, 0.7, -0.3, 0.9]])
    clusters = cluster_tasks(affinity, 2)
    fig = affinity_clustermap(affinity, clusters, title="mine")
    heatmap = max(fig.axes, key=lambda ax: len(ax.texts))
    rows = [t.get_text() for t in heatmap.get_yticklabels()]
    cols = [t.get_text() for t in heatmap.get_xticklabels()]
    assert rows == cols and sorted(rows) == ["a", "b", "c", "d"]
    assert {frozenset(rows[:2]), frozenset(rows[2:])} == {frozenset("ac"), frozenset("bd")}
    values = [float(t.get_text()) for t in heatmap.texts]
    assert values == [affinity.matrix.loc[r, c] for r in rows for c in cols]  # the raw (asymmetric) matrix
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert [t.get_text() for t in legends[0].get_texts()] == ["cluster1", "cluster2"]
    assert fig._suptitle.get_text() == "mine"
    assert len(affinity_clustermap(affinity).axes) == len(fig.axes) - 2  # no cluster colour bars
    with pytest.raises(ValueError, match="tasks \\['d'\\] are in no cluster"):
        affinity_clustermap(affinity, {"cluster1": ["a", "b", "c"]})


def test_cli_writes_the_matrix_the_clusters_and_the_figure(tmp_path, capsys):
    main(["affinity", "--model", "tiny", "--tasks", "topic", "sentiment", "trivia", "--batches", "1",
          "--batch-size", "2", "--max-length", "64", "--clusters", "2", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "affinity.json").read_text())
    assert record["tasks"] == ["topic", "sentiment", "trivia"] and record["method"] == "gradient"
    assert np.array(record["matrix"]).shape == (3, 3)
    placed = sorted(t for members in record["clusters"].values() for t in members)
    assert placed == ["sentiment", "topic", "trivia"]
    assert len(record["clusters"]) == 2
    assert record["prior_clusters"] == {"classify": ["topic", "sentiment"], "generate": ["trivia"]}
    assert record["model"] == "tiny_model(seed=0)" and record["settings"]["batch_size"] == 2
    assert (tmp_path / "affinity.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "gradient affinity on tiny_model(seed=0)" in printed and "clusters: {'cluster1'" in printed


def test_framework_adds_the_clusters_affinity_finds(tokenizer):
    tasks = two_groups(0)
    framework = OnePlusN(tiny_model(seed=0), tokenizer, max_length=64)
    extra = synthetic_task("last", "Say the last word: {input}", lambda w: w, 7)
    framework.add_cluster("other", [extra], CGCConfig.lora(rank=2))  # active while measuring
    config = CGCConfig(n_common=1, n_specific=1, rank_common=2, rank_specific=2)
    assert framework.add_clusters(tasks, config, method="lookahead", lr=1.0) == GROUPS
    assert framework.affinity.method == "lookahead" and framework.affinity.tasks == [t.name for t in tasks]
    assert {n: c.task_names for n, c in framework.clusters.items()} == {"other": ["last"], **GROUPS}
    assert framework.active == "cluster2"
    framework.generate("copy2", "red blue green", max_new_tokens=1)  # routed to its new cluster
    assert framework.active == "cluster1"


def test_framework_takes_given_clusters_and_checks_them_first(tokenizer):
    tasks = two_groups(0)
    framework = OnePlusN(tiny_model(seed=0), tokenizer, max_length=64)
    config = CGCConfig.lora(rank=2)
    with pytest.raises(ValueError, match="tasks in no cluster \\['code2'\\]"):
        framework.add_clusters(tasks, config, clusters={"a": ["copy1", "copy2", "copy3"], "b": ["code1"]})
    with pytest.raises(ValueError, match="unknown tasks \\['copy4'\\]"):
        framework.add_clusters(tasks, config, clusters={"a": ["copy4"], **GROUPS})
    with pytest.raises(ValueError, match="tasks in two clusters \\['code1'\\]"):
        framework.add_clusters(tasks, config, clusters={"a": ["code1"], **GROUPS})
    assert framework.clusters == {} and attached_adapters(framework.model) is None  # nothing added
    prior = {"A": ["copy1", "copy2", "copy3"], "B": ["code1", "code2"]}
    assert framework.add_clusters(tasks, config, clusters=prior) == prior
    assert getattr(framework, "affinity", None) is None  # nothing was measured
    with pytest.raises(ValueError, match="cluster names in use already \\['A'\\]"):
        framework.add_clusters(tasks[:1], config, clusters={"A": ["copy1"]})
