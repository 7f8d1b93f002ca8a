"""CGCLoRALinear: fused == per-expert reference (outputs and gradients), the gate, per-task
merge/export, the special cases, and the errors."""

import itertools

import pytest
import torch
from torch import nn

from cgclora_lite import CGCConfig, CGCLoRALinear, LoRALinear, MergeError, TaskRoutingError

TASKS = ["topic", "sentiment", "headline"]
IDS = torch.tensor([0, 2, 1, 0, 2])  # a mixed-task batch of 5


def make(config, d_in=16, d_out=12, tasks=TASKS, randomize=True):
    layer = CGCLoRALinear(nn.Linear(d_in, d_out), tasks, config)
    if randomize:
        with torch.no_grad():
            layer.lora_B.normal_()
            if layer.gate is not None:
                layer.gate.proj.weight.normal_()
    return layer


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("n_common,n_specific", list(itertools.product([1, 2, 4], [0, 1, 2])))
@pytest.mark.parametrize("gate", ["task", "none"])
def test_fused_equals_reference_outputs_and_gradients(n_common, n_specific, gate):
    common = [1, 3, 2, 4][:n_common]  # mixed ranks
    specific = [2, 5][:n_specific]
    config = CGCConfig(n_common=n_common, n_specific=n_specific, rank_common=common,
                       rank_specific=specific, alpha=7.0, gate=gate)
    layer = make(config)
    x = torch.randn(5, 7, 16)
    grads = {}
    for name, fn in [("fused", layer.forward), ("reference", layer.reference_forward)]:
        layer.zero_grad()
        out = fn(x, IDS)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = (out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()
                                      if p.requires_grad})
    (fused, g_fused), (ref, g_ref) = grads["fused"], grads["reference"]
    assert rel_err(fused, ref) < 1e-5
    assert set(g_fused) == set(g_ref) and "lora_A" in g_fused
    if gate == "task":
        assert {"gate.task_embedding.weight", "gate.proj.weight"} <= set(g_fused)
    for n in g_fused:
        assert rel_err(g_fused[n], g_ref[n]) < 1e-5, n


def test_starts_as_identity_and_only_adapters_train():
    layer = make(CGCConfig(n_common=2, n_specific=2), randomize=False)
    x = torch.randn(5, 3, 16)
    assert torch.equal(layer(x, IDS), layer.base(x))
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "gate.task_embedding.weight", "gate.proj.weight"}


def test_gate_weights_sum_to_one_over_exactly_the_allowed_experts():
    config = CGCConfig(n_common=2, n_specific=2)
    layer = make(config)
    w = layer.expert_weights()  # (T, E)
    names = layer.expert_names
    assert w.shape == (3, 2 + 3 * 2) and len(names) == 8
    for t, task in enumerate(TASKS):
        allowed = [i for i, n in enumerate(names) if n.startswith("common") or n.startswith(task + "/")]
        assert len(allowed) == 4
        torch.testing.assert_close(w[t, allowed].sum(), torch.tensor(1.0))
        others = [i for i in range(len(names)) if i not in allowed]
        assert torch.equal(w[t, others], torch.zeros(len(others)))
        assert (w[t, allowed] > 0).all()


def test_gate_starts_uniform():
    layer = make(CGCConfig(n_common=3, n_specific=1), randomize=False)
    torch.testing.assert_close(layer.visible_weights(), torch.full((3, 4), 0.25))


def test_scaling_is_alpha_over_active_rank():
    config = CGCConfig(n_common=2, n_specific=1, rank_common=[2, 4], rank_specific=3, alpha=18.0)
    assert config.r_active == 9 and config.scaling == 2.0
    layer = make(config)
    assert layer.lora_A.shape == (6 + 3 * 3, 16) and layer.lora_B.shape == (12, 15)


def test_mixed_batch_equals_each_task_alone():
    layer = make(CGCConfig(n_common=2, n_specific=1))
    x = torch.randn(5, 4, 16)
    mixed = layer(x, IDS)
    for t in range(3):
        rows = (IDS == t).nonzero().flatten()
        alone = layer(x[rows], [TASKS[t]] * len(rows))
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("task", TASKS)
def test_merge_per_task_matches_and_unmerge_restores_bits(task):
    layer = make(CGCConfig(n_common=2, n_specific=2, rank_common=[2, 3], rank_specific=[1, 4]))
    x = torch.randn(4, 6, 16)
    unmerged = layer(x, [task] * 4)
    w0 = layer.base.weight.detach().clone()
    layer.merge(task)
    torch.testing.assert_close(layer(x, [task] * 4), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)  # no ids needed merged
    with pytest.raises(TaskRoutingError, match="merged for task"):
        layer(x, ["topic", "sentiment", "headline", "topic"])
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)


def test_export_factors_reproduce_the_task_update():
    config = CGCConfig(n_common=2, n_specific=2, rank_common=[2, 3], rank_specific=[1, 4])
    layer = make(config)
    for task in TASKS:
        A, B = layer.export_factors(task)
        assert A.shape == (config.r_active, 16) and B.shape == (12, config.r_active)
        torch.testing.assert_close(B @ A, layer.delta_weight(task), rtol=1e-5, atol=1e-6)


def test_plain_lora_configuration_equals_lora_linear():
    """LoRA is CGC-LoRA with one common expert and no gate: same weights, same outputs."""
    base = nn.Linear(16, 12)
    cgc = CGCLoRALinear(base, TASKS, CGCConfig.lora(rank=4, alpha=8.0))
    lora = LoRALinear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        cgc.lora_B.normal_()
        lora.lora_A.copy_(cgc.lora_A)
        lora.lora_B.copy_(cgc.lora_B)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(cgc(x), lora(x))  # and no task ids needed
    torch.testing.assert_close(cgc.delta_weight(), lora.delta_weight())


def test_per_task_lora_configuration_is_one_lora_per_task():
    base = nn.Linear(16, 12)
    cgc = CGCLoRALinear(base, TASKS, CGCConfig.per_task_lora(rank=4, alpha=8.0))
    with torch.no_grad():
        cgc.lora_B.normal_()
    x = torch.randn(5, 16)
    out = cgc(x, IDS)
    for b, t in enumerate(IDS.tolist()):
        sl = cgc.expert_slices[t]
        lora = LoRALinear(base, rank=4, alpha=8.0)
        with torch.no_grad():
            lora.lora_A.copy_(cgc.lora_A[sl])
            lora.lora_B.copy_(cgc.lora_B[:, sl])
        torch.testing.assert_close(out[b], lora(x[b : b + 1])[0])


def test_moelora_configuration():
    config = CGCConfig.moelora()
    assert (config.n_common, config.n_specific, config.r_active, config.alpha) == (8, 0, 16, 32.0)
    assert config.method == "moelora" and CGCConfig().method == "cgc-lora"


def test_task_id_errors():
    layer = make(CGCConfig(n_common=1, n_specific=1))
    x = torch.randn(2, 16)
    with pytest.raises(TaskRoutingError, match="needs each sample's task"):
        layer(x)
    with pytest.raises(TaskRoutingError, match="unknown task 'summary'"):
        layer(x, ["topic", "summary"])
    with pytest.raises(TaskRoutingError, match="out of range"):
        layer(x, torch.tensor([0, 3]))
    with pytest.raises(TaskRoutingError, match="out of range"):
        layer(x, [0, -1])
    with pytest.raises(TaskRoutingError, match="3 task ids for a batch of 2"):
        layer(x, [0, 1, 2])
    with pytest.raises(TaskRoutingError, match="integer tensor"):
        layer(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(TaskRoutingError, match="no batch dimension"):
        layer(torch.randn(16), [0])
    with pytest.raises(TaskRoutingError, match="name one of"):
        layer.delta_weight()


def test_non_finite_merge_is_refused():
    layer = make(CGCConfig(n_common=1, n_specific=1))
    with torch.no_grad():
        layer.lora_A[0, 0] = float("inf")
    with pytest.raises(MergeError, match="NaN or Inf"):
        layer.merge("topic")
    assert not layer.merged


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_common=0, n_specific=0), "at least one expert"),
    (dict(gate="router"), "gate must be"),
    (dict(gate_scope="global"), "gate_scope"),
    (dict(n_common=2, rank_common=[2, 2, 2]), "3 entries for 2 experts"),
    (dict(rank_specific=0), "must be >= 1"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CGCConfig(**kwargs)


def test_config_json_round_trip():
    config = CGCConfig(n_common=3, rank_common=[1, 2, 3], target_modules=["q_proj"], alpha=5.0)
    again = CGCConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="unknown CGCConfig fields"):
        CGCConfig.from_dict({**config.to_dict(), "experts": 3})
