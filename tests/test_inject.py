"""inject(): target selection, freezing, identity, routing (forward, generate, beams), merging,
attach/detach, gate weights. All on the tiny random Llama."""

import pytest
import torch
from conftest import randomize

from cgclora_lite import CGCConfig, TaskRoutingError, attached_adapters, inject, no_adapters

TASKS = ["topic", "sentiment", "headline"]
MIXED = ["topic", "headline", "sentiment", "topic"]


@pytest.fixture
def batch():
    return torch.randint(0, 128, (4, 9))


def test_identity_at_injection(tiny, batch):
    base = tiny(batch).logits
    adapters = inject(tiny, CGCConfig(n_common=2, n_specific=1), TASKS)
    assert torch.equal(tiny(batch, task_ids=MIXED).logits, base)
    assert attached_adapters(tiny) is adapters


def test_adapters_follow_the_models_mode(tiny, batch):
    """With dropout, an adapter injected into a model in eval mode must not drop anything."""
    adapters = inject(tiny, CGCConfig(dropout=0.5), TASKS)
    randomize(adapters)
    assert not any(layer.training for layer in adapters.layers.values())
    assert torch.equal(tiny(batch, task_ids=MIXED).logits, tiny(batch, task_ids=MIXED).logits)


def test_all_linear_targets_every_projection_but_not_the_head(tiny):
    adapters = inject(tiny, CGCConfig(), TASKS)
    suffixes = {n.rsplit(".", 1)[-1] for n in adapters.layers}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(adapters.layers) == 2 * 7 and "lm_head" not in adapters.layers
    assert "trainable parameters" in str(adapters.report)


@pytest.mark.parametrize("spec,exclude,expected", [
    (["q_proj", "v_proj"], None, 4),
    (["model.layers.0.self_attn.q_proj"], None, 1),
    (r".*\.mlp\..*_proj", None, 6),
    ("all-linear", ["down_proj"], 12),
    ("all-linear", r"model\.layers\.0\..*", 7),
])
def test_target_specs(tiny, spec, exclude, expected):
    adapters = inject(tiny, CGCConfig(target_modules=spec, exclude_modules=exclude), TASKS)
    assert len(adapters.layers) == expected


def test_target_errors(tiny):
    with pytest.raises(ValueError, match="no module matches.*end with"):
        inject(tiny, CGCConfig(target_modules=["qkv"]), TASKS)
    with pytest.raises(TypeError, match="only nn.Linear"):
        inject(tiny, CGCConfig(target_modules=["self_attn"]), TASKS)


def test_only_adapters_train_and_a_step_changes_nothing_else(tiny, batch):
    adapters = inject(tiny, CGCConfig(n_common=2, n_specific=1), TASKS)
    trainable = [p for p in tiny.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapters.parameters()}
    assert sum(p.numel() for p in trainable) == adapters.report.trainable
    frozen = {n: p.detach().clone() for n, p in tiny.named_parameters() if not p.requires_grad}
    before = {k: v.clone() for k, v in adapters.state_dict().items()}
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    tiny.train()
    for _ in range(2):  # two steps: step one moves B, and with it the gates' gradients
        loss = tiny(batch, labels=batch, task_ids=MIXED).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in tiny.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    after = adapters.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), "every adapter tensor trains"


def test_mixed_batch_equals_each_task_alone(tiny, batch):
    adapters = inject(tiny, CGCConfig(n_common=2, n_specific=1), TASKS)
    randomize(adapters)
    mixed = tiny(batch, task_ids=MIXED).logits
    for task in TASKS:
        rows = [i for i, t in enumerate(MIXED) if t == task]
        alone = tiny(batch[rows], task_ids=[task] * len(rows)).logits
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-5, atol=1e-5)


def test_task_ids_as_tensor_and_route_context(tiny, batch):
    adapters = inject(tiny, CGCConfig(), TASKS)
    randomize(adapters)
    by_name = tiny(batch, task_ids=MIXED).logits
    by_id = tiny(batch, task_ids=torch.tensor([0, 2, 1, 0])).logits
    with adapters.route([0, 2, 1, 0]):
        in_context = tiny(batch).logits
    assert torch.equal(by_name, by_id) and torch.equal(by_name, in_context)
    assert adapters.router.task_ids is None  # held for exactly the call


def test_task_ids_last_exactly_one_call(tiny, batch):
    adapters = inject(tiny, CGCConfig(), TASKS)
    tiny(batch, task_ids=MIXED)
    assert adapters.router.task_ids is None
    with pytest.raises(TaskRoutingError, match="needs each sample's task"):
        tiny(batch)
    with pytest.raises(TaskRoutingError, match="3 task ids for a batch of 4"):
        tiny(batch, task_ids=MIXED[:3])
    assert adapters.router.task_ids is None  # cleared after a failed call too
    with pytest.raises(TaskRoutingError, match="unknown task 'trivia'"):
        tiny(batch, task_ids=["trivia"] * 4)


def test_plain_lora_needs_no_task_ids(tiny, batch):
    inject(tiny, CGCConfig.lora(rank=4), TASKS)
    assert tiny(batch).logits.shape == (4, 9, 128)


def test_disabled_gives_the_base_model(tiny, batch):
    base = tiny(batch).logits
    adapters = inject(tiny, CGCConfig(), TASKS)
    randomize(adapters)
    assert not torch.equal(tiny(batch, task_ids=MIXED).logits, base)
    with adapters.disabled():
        assert torch.equal(tiny(batch).logits, base)
    with no_adapters(tiny):
        assert torch.equal(tiny(batch).logits, base)
    assert adapters.router.enabled


def test_generate_mixed_batch_equals_each_task_alone(tiny, batch):
    adapters = inject(tiny, CGCConfig(n_common=1, n_specific=1), TASKS)
    randomize(adapters, std=0.5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = tiny.generate(batch, task_ids=MIXED, **kw)
    for task in TASKS:
        rows = [i for i, t in enumerate(MIXED) if t == task]
        assert torch.equal(mixed[rows], tiny.generate(batch[rows], task_ids=[task] * len(rows), **kw))
    assert adapters.router.task_ids is None
    with adapters.disabled():
        base = tiny.generate(batch, **kw)
    assert not torch.equal(base, mixed)


def test_generate_with_beams_repeats_task_ids(tiny, batch):
    adapters = inject(tiny, CGCConfig(n_common=1, n_specific=1), TASKS)
    randomize(adapters, std=0.5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=3, num_return_sequences=2)
    mixed = tiny.generate(batch, task_ids=MIXED, **kw)
    assert mixed.shape[0] == 8
    alone = tiny.generate(batch[1:2], task_ids=["headline"], **kw)
    assert torch.equal(mixed[2:4], alone)


@pytest.mark.parametrize("task", TASKS)
def test_merged_model_equals_unmerged(tiny, batch, task):
    adapters = inject(tiny, CGCConfig(n_common=2, n_specific=2, rank_specific=[2, 3]), TASKS)
    randomize(adapters)
    weights = {n: p.detach().clone() for n, p in tiny.named_parameters() if not p.requires_grad}
    unmerged = tiny(batch, task_ids=[task] * 4).logits
    adapters.merge(task)
    assert adapters.merged_task == task
    torch.testing.assert_close(tiny(batch).logits, unmerged, rtol=1e-5, atol=1e-5)
    adapters.unmerge()
    for n, p in tiny.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, weights[n]), n


def test_detach_restores_the_model_and_attach_brings_adapters_back(tiny, batch):
    base = tiny(batch).logits
    modules = dict(tiny.named_modules())
    adapters = inject(tiny, CGCConfig(), TASKS)
    randomize(adapters)
    adapted = tiny(batch, task_ids=MIXED).logits
    with pytest.raises(RuntimeError, match="already has CGC-LoRA adapters"):
        inject(tiny, CGCConfig(), TASKS)
    adapters.detach()
    assert attached_adapters(tiny) is None and "generate" not in vars(tiny)
    assert all(m is modules[n] for n, m in tiny.named_modules())
    assert torch.equal(tiny(batch).logits, base)
    other = inject(tiny, CGCConfig.lora(rank=2), TASKS)  # a second cluster on the same model
    with pytest.raises(RuntimeError, match="another set of adapters attached"):
        adapters.attach()
    other.detach()
    adapters.attach()
    assert torch.equal(tiny(batch, task_ids=MIXED).logits, adapted)


def test_shared_gate_scope(tiny, batch):
    adapters = inject(tiny, CGCConfig(gate_scope="shared", n_common=2, n_specific=1), TASKS)
    gates = [layer.gate for layer in adapters.layers.values()]
    assert all(g is None for g in gates) and adapters.shared_gate is not None
    gate_params = list(adapters.shared_gate.parameters())
    assert all(any(p is q for q in tiny.parameters()) for p in gate_params)  # registered once
    randomize(adapters)
    weights = adapters.gate_weights().weights
    assert torch.equal(weights[0], weights[-1])  # one gate for all layers
    tiny(batch, labels=batch, task_ids=MIXED).loss.backward()
    assert adapters.shared_gate.proj.weight.grad is not None


def test_gate_weights_tensor_and_frame(tiny):
    adapters = inject(tiny, CGCConfig(n_common=2, n_specific=2), TASKS)
    randomize(adapters)
    gw = adapters.gate_weights()
    assert gw.weights.shape == (14, 3, 2 + 3 * 2)
    assert gw.layers == list(adapters.layers) and gw.tasks == TASKS
    assert gw.experts[:3] == ["common1", "common2", "topic/specific1"]
    torch.testing.assert_close(gw.weights.sum(-1), torch.ones(14, 3))
    frame = gw.to_frame()
    assert list(frame.columns) == ["layer", "task", "expert", "weight"] and len(frame) == 14 * 3 * 8
    assert frame.groupby(["layer", "task"])["weight"].sum().round(5).eq(1).all()
