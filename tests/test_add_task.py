"""Adding a task to a trained cluster: existing tasks unchanged bit for bit, the new task learns."""

import pytest
import torch
from conftest import randomize

from cgclora_lite import CGCConfig, CheckpointError, inject, load_adapters
from cgclora_lite.cgc import CGCLoRALinear
from cgclora_lite.models import tiny_model
from cgclora_lite.train import TrainConfig, train

CONFIGS = {
    "cgc dense": CGCConfig(n_common=2, n_specific=1, rank_common=2, rank_specific=2),
    "cgc shared gate": CGCConfig(n_common=1, n_specific=2, rank_common=2, rank_specific=[1, 3],
                                 gate_scope="shared"),
    "per-task lora (gathered)": CGCConfig.per_task_lora(rank=4),
    "moelora (gate row only)": CGCConfig.moelora(n_experts=3, rank=2),
    "cgc (gathered)": CGCConfig(n_common=1, n_specific=1, rank_common=2, rank_specific=2),
}


def batch(n=6, seq=7, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def trained(config, tasks=("a", "b"), gathered=None):
    model = tiny_model(seed=0, vocab_size=128)
    adapters = inject(model, config, list(tasks))
    randomize(adapters, std=0.3)  # stands for a trained cluster
    if gathered is not None:
        for layer in adapters.layers.values():
            layer.gathered = gathered
    return model, adapters


def learn(adapters, task_id, steps=30, lr=3e-2):
    """A few steps on a fixed next-token batch routed to ``task_id``; returns the losses."""
    ids = ((torch.arange(10) * 7 + 5) % 128).expand(4, -1)  # (4, 10): a fixed sequence to learn
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
            "task_ids": torch.full((4,), task_id)}
    history = train(adapters, [data], TrainConfig(steps=steps, lr=lr, warmup=0.0, schedule="constant"),
                    progress=False)
    return [h["loss"] for h in history]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_existing_tasks_are_bit_identical_and_new_task_learns(name):
    model, adapters = trained(CONFIGS[name], gathered=name.endswith("(gathered)"))
    ids, task_ids = batch(), torch.tensor([0, 1, 1, 0, 0, 1])
    with torch.no_grad():
        before = model(ids, task_ids=task_ids).logits
        generated = model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), task_ids=[0, 1], max_new_tokens=5, do_sample=False)
    frozen = {k: v.clone() for k, v in adapters.state_dict().items()}

    new = adapters.add_task("c")
    assert adapters.tasks == ("a", "b", "c") and adapters.added_tasks == ["c"]
    assert set(map(id, adapters.parameters())) == set(map(id, new))  # only the new task trains
    assert adapters.num_trainable() < adapters.num_parameters()
    layer = next(iter(adapters.layers.values()))
    assert layer.gathered == name.endswith("(gathered)")
    with torch.no_grad():  # untrained new task: B = 0, so c equals the commons-only model
        assert torch.equal(model(ids, task_ids=task_ids).logits, before)

    losses = learn(adapters, task_id=2)
    only_gate = CONFIGS[name].n_specific == 0  # MOELoRA: the new task can only re-mix frozen experts
    assert losses[-1] < (0.99 if only_gate else 0.9) * losses[0], losses  # the new task learns
    with torch.no_grad():
        after = model(ids, task_ids=task_ids).logits
        assert torch.equal(after, before)  # every existing task: bit for bit
        assert torch.equal(model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), task_ids=[0, 1], max_new_tokens=5, do_sample=False),
                           generated)
        mixed = model(ids, task_ids=torch.tensor([0, 2, 1, 2, 0, 1])).logits
    assert torch.equal(mixed[[0, 2, 4, 5]], model(ids, task_ids=torch.tensor([0, 0, 1, 0, 0, 1])).logits[[0, 2, 4, 5]])
    state = adapters.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # nothing old moved
    assert not torch.equal(mixed[1], before[1])  # the new task computes something of its own


@pytest.mark.parametrize("name", ["cgc dense", "per-task lora (gathered)"])
def test_added_task_matches_reference_loop_merge_and_export(name):
    model, adapters = trained(CONFIGS[name], gathered=name.endswith("(gathered)"))
    adapters.add_task("c")
    adapters.add_task("d")
    randomize(adapters, std=0.3)  # the new blocks too
    layer: CGCLoRALinear = next(iter(adapters.layers.values()))
    x = torch.randn(5, 3, layer.in_features)
    ids = torch.tensor([3, 2, 0, 1, 2])
    with torch.no_grad():
        fused, ref = layer(x, ids), layer.reference_forward(x, ids)
        assert torch.allclose(fused, ref, atol=1e-5)
        for t in range(4):
            merged_expected = layer(x, torch.full((5,), t))
            layer.merge(t)
            assert torch.allclose(layer(x, torch.full((5,), t)), merged_expected, atol=1e-5)
            layer.unmerge()
            A, B = layer.export_factors(t)
            assert A.shape[0] == layer.config.r_active
            assert torch.allclose(layer.base(x) + x @ A.T @ B.T, merged_expected, atol=1e-5)
    assert layer.expert_weights().shape == (4, len(layer.expert_names))
    assert torch.allclose(layer.expert_weights().sum(1), torch.ones(4)) or layer.config.gate == "none"


def test_gradients_reach_only_the_new_block():
    model, adapters = trained(CONFIGS["cgc dense"])
    adapters.add_task("c")
    randomize(adapters, std=0.3)
    layer = next(iter(adapters.layers.values()))
    x = torch.randn(4, 3, layer.in_features, requires_grad=True)
    ids = torch.tensor([2, 0, 2, 1])
    layer(x, ids).square().sum().backward()
    fused_grads = (x.grad.clone(), layer.added_A[0].grad.clone(), layer.gate.added[0].grad.clone())
    assert layer.lora_A.grad is None  # frozen
    x.grad = None
    for p in (layer.added_A[0], layer.gate.added[0]):
        p.grad = None
    layer.reference_forward(x, ids).square().sum().backward()
    for a, b in zip(fused_grads, (x.grad, layer.added_A[0].grad, layer.gate.added[0].grad)):
        assert torch.allclose(a, b, atol=1e-4)


def test_save_load_round_trip_with_added_tasks(tmp_path):
    model, adapters = trained(CONFIGS["cgc shared gate"])
    adapters.add_task("c")
    randomize(adapters, std=0.3)
    ids, task_ids = batch(), torch.tensor([0, 2, 1, 2, 0, 1])
    with torch.no_grad():
        expected = model(ids, task_ids=task_ids).logits
    adapters.save(tmp_path)
    fresh = tiny_model(seed=0, vocab_size=128)
    loaded = load_adapters(fresh, tmp_path)
    assert loaded.tasks == ("a", "b", "c") and loaded.added_tasks == ["c"]
    with torch.no_grad():
        assert torch.equal(fresh(ids, task_ids=task_ids).logits, expected)
    # loading into adapters without the added task says what to do
    other_model, other = trained(CONFIGS["cgc shared gate"], tasks=("a", "b", "c"))
    with pytest.raises(CheckpointError, match="added later"):
        other.load(tmp_path)


def test_add_task_errors():
    _, lora = trained(CGCConfig.lora(rank=4))
    with pytest.raises(ValueError, match="nothing of its own"):
        lora.add_task("c")
    _, adapters = trained(CONFIGS["cgc dense"])
    with pytest.raises(ValueError, match="exists already"):
        adapters.add_task("a")
    adapters.merge("a")
    with pytest.raises(RuntimeError, match="unmerge"):
        adapters.add_task("c")


def test_framework_add_task_trains_only_the_new_task(tmp_path):
    from cgclora_lite.framework import OnePlusN
    from cgclora_lite.models import load_tokenizer
    from cgclora_lite.tasks import load_default_tasks

    tasks = {t.name: t for t in load_default_tasks(train=8, validation=0, test=3)}
    framework = OnePlusN(tiny_model(seed=0), load_tokenizer(), max_length=64)
    framework.add_cluster("classify", [tasks["topic"]], CGCConfig(n_common=1, n_specific=1,
                                                                   rank_common=2, rank_specific=2))
    framework.train(TrainConfig(steps=3, lr=1e-2), batch_size=4, progress=False)
    texts = [e.input for e in tasks["topic"].test]
    before = framework.generate("topic", texts, max_new_tokens=4)

    framework.add_task("classify", tasks["sentiment"])
    assert framework.cluster_of("sentiment").name == "classify"
    history = framework.train_cluster("classify", TrainConfig(steps=6, lr=3e-2, warmup=0.0), batch_size=4,
                                      progress=False, tasks=["sentiment"])
    assert history[-1]["loss"] < history[0]["loss"]
    assert framework.generate("topic", texts, max_new_tokens=4) == before
    framework.save(tmp_path)
    loaded = OnePlusN.load(tmp_path)
    assert loaded.generate("topic", texts, max_new_tokens=4) == before
    assert loaded.clusters["classify"].adapters.added_tasks == ["sentiment"]
    with pytest.raises(ValueError, match="already belongs"):
        framework.add_task("classify", tasks["topic"])
