"""The gate options: ``gate_norm="scaled"`` (a fresh layer is the ungated sum, i.e. a plain LoRA of
rank r_active) and ``gate_lr_scale`` (the gate's learning rate, and only the gate's)."""

import pytest
import torch
from torch import nn

from cgclora_lite import CGCConfig, CGCLoRALinear, LoRALinear, inject
from cgclora_lite.models import tiny_model
from cgclora_lite.train import TrainConfig, train

TASKS = ["a", "b", "c"]
IDS = torch.tensor([0, 2, 1, 1])


def _with_random_b(layer):
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_a_fresh_scaled_gate_is_the_ungated_sum_and_a_plain_lora_of_rank_r_active():
    base = nn.Linear(16, 12)
    kw = dict(n_common=2, n_specific=1, rank_common=2, rank_specific=3, alpha=14.0)
    scaled = _with_random_b(CGCLoRALinear(base, TASKS, CGCConfig(**kw, gate_norm="scaled")))
    ungated = CGCLoRALinear(base, TASKS, CGCConfig(**kw, gate="none"))
    with torch.no_grad():
        ungated.lora_A.copy_(scaled.lora_A)
        ungated.lora_B.copy_(scaled.lora_B)
    x = torch.randn(4, 5, 16)
    torch.testing.assert_close(scaled(x, task_ids=IDS), ungated(x, task_ids=IDS), rtol=1e-6, atol=1e-6)
    # task b's update is exactly a LoRA of rank r_active = 2 + 2 + 3 = 7 at scale alpha / 7
    A, B = scaled.export_factors("b")  # (7, d_in), (d_out, 7): s * w folded into B
    lora = LoRALinear(base, rank=7, alpha=14.0)
    with torch.no_grad():
        lora.lora_A.copy_(A)
        lora.lora_B.copy_(B / lora.scaling)  # w = 1 for every expert of a fresh scaled gate
    torch.testing.assert_close(scaled(x[:1], task_ids=[1]), lora(x[:1]), rtol=1e-6, atol=1e-6)
    assert torch.equal(scaled.visible_weights(), torch.ones(3, 3))


def test_a_softmax_gate_is_k_times_smaller_at_the_start():
    base = nn.Linear(16, 12)
    kw = dict(n_common=2, n_specific=2, rank_common=2, rank_specific=2)
    soft = _with_random_b(CGCLoRALinear(base, TASKS, CGCConfig(**kw)))
    scaled = CGCLoRALinear(base, TASKS, CGCConfig(**kw, gate_norm="scaled"))
    scaled.load_state_dict(soft.state_dict())
    x = torch.randn(4, 5, 16)
    update = lambda layer: layer(x, task_ids=IDS) - base(x)  # noqa: E731
    torch.testing.assert_close(update(scaled), 4 * update(soft), rtol=1e-5, atol=1e-6)  # K = 4
    torch.testing.assert_close(scaled.visible_weights().sum(1), torch.full((3,), 4.0))


def test_gate_norm_is_saved_checked_and_validated(tmp_path):
    from cgclora_lite import CheckpointError, load_adapters

    model = tiny_model(seed=0, vocab_size=128)
    adapters = inject(model, CGCConfig(gate_norm="scaled", gate_lr_scale=10.0), TASKS)
    adapters.save(tmp_path)
    adapters.detach()
    loaded = load_adapters(model, tmp_path)
    assert loaded.config.gate_norm == "scaled" and loaded.config.gate_lr_scale == 10.0
    loaded.detach()
    other = inject(model, CGCConfig(), TASKS)
    with pytest.raises(CheckpointError, match="gate_norm"):
        other.load(tmp_path)
    with pytest.raises(ValueError, match="gate_norm"):
        CGCConfig(gate_norm="sigmoid")
    with pytest.raises(ValueError, match="gate_lr_scale"):
        CGCConfig(gate_lr_scale=0)


@pytest.mark.parametrize("scope", ["layer", "shared"])
def test_the_gate_learning_rate_reaches_exactly_the_gate_parameters(scope):
    model = tiny_model(seed=0, vocab_size=128)
    adapters = inject(model, CGCConfig(gate_lr_scale=10.0, gate_scope=scope), TASKS)
    groups = adapters.optimizer_groups()
    gates = [l.gate for l in adapters.layers.values() if l.gate is not None] + [adapters.shared_gate]
    gate_ids = {id(p) for g in gates if g is not None for p in g.parameters()}
    assert {id(p) for p in groups[1]["params"]} == gate_ids and groups[1]["lr_scale"] == 10.0
    assert not gate_ids & {id(p) for p in groups[0]["params"]} and groups[0]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(adapters.parameters())

    seen = []  # the optimizer's learning rate of every group at every step
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([(group["lr"], {id(p) for p in group["params"]}) for group in self.param_groups])
        return original(self, *args, **kwargs)

    ids = torch.randint(0, 128, (3, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "task_ids": torch.tensor([0, 1, 2])}
    torch.optim.AdamW.step = spy
    try:
        train(adapters, [batch], TrainConfig(steps=3, lr=1e-3, warmup=0.0, schedule="constant"),
              progress=False)
    finally:
        torch.optim.AdamW.step = original
    assert len(seen) == 3
    for step in seen:
        (expert_lr, experts), (gate_lr, gate_params) = sorted(step, key=lambda group: group[0])
        assert expert_lr == pytest.approx(1e-3) and gate_lr == pytest.approx(1e-2)
        assert gate_params == gate_ids and experts == {id(p) for p in groups[0]["params"]}
