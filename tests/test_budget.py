"""The budget rule, end to end with a spy on training: for every method, every adapter set takes the
same number of optimizer steps and every task sees the same number of training examples."""

import collections
from dataclasses import replace

import pytest
import torch

from cgclora_lite import experiment, framework, modula
from cgclora_lite.experiment import METHODS, PRESETS, load_tasks, run_method
from cgclora_lite.models import load_model

PRESET = replace(PRESETS["tiny"], steps=6, batch_size=8, validation=0, eval_every=0,
                 test={"topic": 1, "sentiment": 1, "headline": 1, "trivia": 1})


@pytest.fixture(scope="module")
def model_and_tasks():
    model, tokenizer = load_model("tiny")
    return model, tokenizer, load_tasks(PRESET)


def _spy(calls):
    """A stand-in for ``train.train`` that records every call's steps and examples per task."""
    from cgclora_lite.train import train as real_train

    def spy(adapters, batches, config, validation=None, progress=True):
        counts = collections.Counter()

        def counted():
            for batch in batches:
                counts.update(adapters.tasks[int(i)] for i in batch["task_ids"])
                yield batch

        history = real_train(adapters, counted(), config, validation, progress)
        calls.append({"set": id(adapters), "steps": config.steps, "examples": dict(counts)})
        return history

    return spy


@pytest.mark.parametrize("method", METHODS)
def test_every_set_takes_every_step_and_every_task_the_same_examples(method, model_and_tasks, monkeypatch):
    model, tokenizer, tasks = model_and_tasks
    calls = []
    monkeypatch.setattr(framework, "train", _spy(calls))
    monkeypatch.setattr(modula, "train", _spy(calls))
    run_method(method, model, tokenizer, tasks, PRESET, progress=False)
    per_task = PRESET.batch_size // len(tasks)  # 2 examples of each task per step
    examples = collections.Counter()
    steps_per_set = collections.Counter()
    for call in calls:
        examples.update(call["examples"])
        steps_per_set[call["set"]] += call["steps"]
    assert dict(examples) == {t.name: PRESET.steps * per_task for t in tasks}, calls
    if method.startswith("modula"):  # one set, its steps split over the three stages
        assert list(steps_per_set.values()) == [PRESET.steps]
    else:  # one set per cluster, each with every step
        clusters = experiment.method_clusters(method, tasks)
        assert list(steps_per_set.values()) == [PRESET.steps] * len(clusters)


def test_visible_rank_per_sample_is_the_same_for_every_method():
    from cgclora_lite.experiment import CGC_METHODS, method_config, modula_config

    ranks = {m: method_config(m).r_active for m in CGC_METHODS}
    modula_cfg = modula_config("modula-res")
    ranks["modula"] = modula_cfg.rank_universal + 2 * modula_cfg.rank_domain  # every expert, dense router
    assert set(ranks.values()) == {8}, ranks


def test_bf16_autocast_training_lowers_the_loss_like_fp32():
    from cgclora_lite import CGCConfig, inject
    from cgclora_lite.models import tiny_model
    from cgclora_lite.train import TrainConfig, evaluate_loss, train

    ids = torch.randint(0, 128, (6, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "task_ids": torch.tensor([0, 1] * 3)}
    losses = {}
    for amp in (False, True):
        torch.manual_seed(0)
        adapters = inject(tiny_model(seed=0, vocab_size=128), CGCConfig(), ["a", "b"])
        before = evaluate_loss(adapters, [batch])
        history = train(adapters, [batch], TrainConfig(steps=30, lr=2e-2, amp=amp), progress=False)
        losses[amp] = (before, evaluate_loss(adapters, [batch]), history)
    for amp, (before, after, _) in losses.items():
        assert after < 0.9 * before, amp
    assert losses[True][1] == pytest.approx(losses[False][1], rel=0.1)


def test_uneven_clusters_keep_the_rule(model_and_tasks, monkeypatch):
    """Three tasks in one cluster and one in the other: the big cluster's batches are three times
    larger, every task still sees batch_size // T examples per step, both sets take every step."""
    model, tokenizer, tasks = model_and_tasks
    by_name = {t.name: t for t in tasks}
    clusters = {"big": [by_name[n] for n in ("topic", "sentiment", "headline")], "small": [by_name["trivia"]]}
    batches = experiment.cluster_batches(PRESET.batch_size, clusters)
    assert batches == {"big": 6, "small": 2}
    calls = []
    monkeypatch.setattr(framework, "train", _spy(calls))
    experiment.train_and_score(model, tokenizer, clusters, experiment.method_config("cgc-1+n"),
                               experiment.train_config(PRESET), batches, PRESET.max_length, progress=False)
    assert [c["steps"] for c in calls] == [PRESET.steps, PRESET.steps]
    assert {t: n for c in calls for t, n in c["examples"].items()} == {t.name: PRESET.steps * 2 for t in tasks}
    with pytest.raises(ValueError, match="a batch of 3 examples cannot hold one example of each of the 4"):
        experiment.cluster_batches(3, clusters)
