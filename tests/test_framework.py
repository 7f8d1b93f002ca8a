"""The 1+N framework on the tiny model with the real tokenizer and tasks: routing, errors,
training per cluster, merging, save/load."""

import pytest
import torch
from conftest import randomize

from cgclora_lite import CGCConfig, TaskRoutingError, attached_adapters
from cgclora_lite.framework import OnePlusN
from cgclora_lite.models import load_tokenizer, tiny_model
from cgclora_lite.tasks import group_by_cluster, load_default_tasks
from cgclora_lite.train import TrainConfig

CONFIG = CGCConfig(n_common=1, n_specific=1, rank_common=2, rank_specific=2)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tasks():
    return load_default_tasks(train=8, validation=4, test=3)


def make(tokenizer, tasks, randomized=True):
    framework = OnePlusN(tiny_model(seed=0), tokenizer, max_length=80)
    for name, members in group_by_cluster(tasks).items():
        cluster = framework.add_cluster(name, members, CONFIG)
        if randomized:
            randomize(cluster.adapters, std=0.3)
    return framework


def test_routes_each_task_to_its_cluster(tokenizer, tasks):
    framework = make(tokenizer, tasks)
    assert list(framework.clusters) == ["classify", "generate"]
    framework.generate("sentiment", "a tweet")
    assert framework.active == "classify"
    assert attached_adapters(framework.model) is framework.clusters["classify"].adapters
    framework.generate("trivia", ["a question", "another"], max_new_tokens=2)
    assert framework.active == "generate"
    assert framework.clusters["generate"].adapters.is_attached
    assert not framework.clusters["classify"].adapters.is_attached


def test_routing_errors(tokenizer, tasks):
    framework = make(tokenizer, tasks)
    with pytest.raises(TaskRoutingError, match="belongs to cluster 'generate', not 'classify'"):
        framework.generate("trivia", "a question", cluster="classify")
    with pytest.raises(TaskRoutingError, match="unknown task 'summary'.*'classify': \\['topic'"):
        framework.generate("summary", "text")
    with pytest.raises(ValueError, match="'topic' already belongs to cluster 'classify'"):
        framework.add_cluster("again", tasks[:1], CONFIG)
    with pytest.raises(KeyError, match="no cluster 'chat'"):
        framework.activate("chat")


def test_each_cluster_trains_on_its_own_tasks(tokenizer, tasks):
    framework = make(tokenizer, tasks, randomized=False)
    before = {n: {k: v.clone() for k, v in c.adapters.state_dict().items()}
              for n, c in framework.clusters.items()}
    histories = framework.train(TrainConfig(steps=2, lr=1e-2, eval_every=2), batch_size=4,
                                progress=False, steps_by_cluster={"generate": 3})
    assert [len(histories["classify"]), len(histories["generate"])] == [2, 3]
    assert "val_loss" in histories["classify"][-1]
    for name, cluster in framework.clusters.items():
        after = cluster.adapters.state_dict()
        assert any(not torch.equal(before[name][k], after[k]) for k in after), name
    assert framework.num_trainable() == sum(c.adapters.num_trainable() for c in framework.clusters.values())


def test_merge_for_one_task_gives_the_same_answers(tokenizer, tasks):
    framework = make(tokenizer, tasks)
    inputs = [ex.input for ex in tasks[2].test]  # headline
    unmerged = framework.generate("headline", inputs, max_new_tokens=4)
    framework.merge("headline")
    assert framework.clusters["generate"].adapters.merged_task == "headline"
    assert framework.generate("headline", inputs, max_new_tokens=4) == unmerged
    framework.unmerge()
    framework.generate("topic", "text")  # switching cluster works after a merge


def test_saved_and_loaded_framework_predicts_exactly_as_before(tokenizer, tasks, tmp_path):
    framework = make(tokenizer, tasks)
    before = framework.evaluate(tasks)
    framework.save(tmp_path / "fw")
    with pytest.raises(ValueError, match="pass the tokenizer"):
        OnePlusN.load(tmp_path / "fw", model=tiny_model(seed=0))
    loaded = OnePlusN.load(tmp_path / "fw")  # the tiny central model is rebuilt from its name
    assert list(loaded.clusters) == ["classify", "generate"]
    assert loaded.clusters["classify"].task_names == ["topic", "sentiment"]
    after = loaded.evaluate(tasks)
    assert {t: r["answers"] for t, r in after.items()} == {t: r["answers"] for t, r in before.items()}
    ids = tokenizer("some text", return_tensors="pt").input_ids
    framework.activate("classify")
    original = framework.model(ids, task_ids=["sentiment"]).logits
    loaded.activate("classify")
    assert torch.equal(loaded.model(ids, task_ids=["sentiment"]).logits, original)


# --- routing by task id, checked against an independent answer ------------------------------
# sentiment and trivia are task id 1 of their clusters: a router that sent every request to id 0
# (or to list order instead of the id) would pass the tests above but fails these.

def _direct_answers(framework, cluster, task_id, inputs, max_new_tokens):
    """Answers computed without ``OnePlusN``'s routing: the cluster's adapters attached by hand
    and ``task_id`` given explicitly to ``generate_answers``."""
    from cgclora_lite.evaluate import generate_answers
    from cgclora_lite.tasks import Example

    owner = framework.activate(cluster)
    tasks = framework.clusters[cluster].tasks
    requests = [(task_id, Example(x, "", tasks[task_id].name)) for x in inputs]
    assert owner.is_attached
    return generate_answers(framework.model, framework.tokenizer, tasks, requests,
                            max_new_tokens=max_new_tokens, max_prompt_length=framework._prompt_room())


@pytest.mark.parametrize("task, cluster, task_id", [("sentiment", "classify", 1), ("trivia", "generate", 1)])
def test_generate_routes_the_tasks_own_id(tokenizer, tasks, task, cluster, task_id):
    framework = make(tokenizer, tasks)
    assert framework.clusters[cluster].task_names[task_id] == task
    inputs = [ex.input for t in tasks for ex in t.test]
    routed = framework.generate(task, inputs, max_new_tokens=6)
    assert routed == _direct_answers(framework, cluster, task_id, inputs, 6)
    # the check has teeth: the other task of the cluster (id 0) answers differently
    assert routed != _direct_answers(framework, cluster, 0, inputs, 6)


def test_merged_task_with_id_one_equals_its_routed_logits(tokenizer, tasks):
    framework = make(tokenizer, tasks)
    ids = tokenizer(["some text", "other words here"], return_tensors="pt", padding=True)
    framework.activate("classify")
    with torch.no_grad():
        routed = framework.model(**ids, task_ids=["sentiment", "sentiment"]).logits  # (2, L, V)
        other = framework.model(**ids, task_ids=[0, 0]).logits
        framework.merge("sentiment")
        merged = framework.model(**ids).logits  # no task ids: the merged weights serve sentiment
    assert not torch.allclose(routed, other, atol=1e-3)
    torch.testing.assert_close(merged, routed, atol=1e-4, rtol=1e-4)


def test_evaluate_one_task_equals_generate(tokenizer, tasks):
    """``evaluate(tasks=[...])`` keeps task ids as positions in the cluster: a subset of one
    task with id 1 must give exactly ``generate``'s answers for that task."""
    framework = make(tokenizer, tasks)
    sentiment = next(t for t in tasks if t.name == "sentiment")
    result = framework.evaluate([sentiment])
    assert list(result) == ["sentiment"]
    expected = framework.generate("sentiment", [ex.input for ex in sentiment.test])
    assert result["sentiment"]["answers"] == expected
