"""The training loop and the answer-only loss, on the tiny model."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cgclora_lite import CGCConfig, inject
from cgclora_lite.experiment import CGC_METHODS, method_config
from cgclora_lite.train import TrainConfig, answer_loss, evaluate_loss, lr_factor, train

TASKS = ["a", "b"]


def toy_batches(n=4, vocab=128, seed=0):
    """Two synthetic tasks: a random prompt, then a fixed 3-token answer per task."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(3, vocab - 3, (4, 6), generator=g)
        task_ids = torch.tensor([0, 1, 0, 1])
        answer = torch.tensor([[5, 6, 7], [9, 10, 11]])[task_ids]
        input_ids = torch.cat([prompt, answer], 1)
        labels = input_ids.clone()
        labels[:, :6] = -100
        out.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                    "labels": labels, "task_ids": task_ids})
    return out


def sharpen(model, factor=10.0):
    """A random tiny model's tied embeddings (std 0.02) cap its logits near +-1.3, so no adapter can
    take the loss far below ln(vocab) - 2; larger embeddings let a short training show learning."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(factor)
    return model


def test_answer_loss_equals_the_models_own_loss(tiny):
    batch = toy_batches(1)[0]
    batch["attention_mask"][0, :2] = 0  # some padding too
    ours = answer_loss(tiny, batch)
    theirs = tiny(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", CGC_METHODS)
def test_each_methods_training_lowers_the_loss_and_touches_only_adapters(tiny, method):
    adapters = inject(sharpen(tiny), method_config(method), TASKS)
    data = toy_batches()
    frozen = {n: p.detach().clone() for n, p in tiny.named_parameters() if not p.requires_grad}
    before = evaluate_loss(adapters, data)
    history = train(adapters, data, TrainConfig(steps=30, lr=1e-2, eval_every=10), validation=data,
                    progress=False)
    after = evaluate_loss(adapters, data)
    assert after < 0.3 * before, (before, after)
    assert [h["step"] for h in history] == list(range(1, 31))
    assert "val_loss" in history[9] and "val_loss" not in history[8]
    assert all(torch.equal(p, frozen[n]) for n, p in tiny.named_parameters() if not p.requires_grad)
    assert not tiny.training


def test_grad_accumulation_matches_one_big_batch(tiny):
    """Two accumulated half-batches give the gradient of the full batch (equal answer tokens)."""
    data = toy_batches(1)[0]
    halves = [{k: v[i * 2 : (i + 1) * 2] for k, v in data.items()} for i in range(2)]
    adapters = inject(tiny, CGCConfig(n_common=1, n_specific=1), TASKS)
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(std=0.1)
    start = {k: v.clone() for k, v in adapters.state_dict().items()}
    grads = []

    def capture(optimizer, args, kwargs):
        grads.append([p.grad.clone() for p in adapters.parameters()])

    handle = register_optimizer_step_pre_hook(capture)
    try:
        for batches, accum in [([data], 1), (halves, 2)]:
            with torch.no_grad():
                for k, v in adapters.state_dict().items():
                    v.copy_(start[k])
            config = TrainConfig(steps=1, lr=1e-2, grad_accum=accum, warmup=0, max_grad_norm=0)
            train(adapters, batches, config, progress=False)
    finally:
        handle.remove()
    assert len(grads) == 2
    for full, accumulated in zip(*grads):
        torch.testing.assert_close(accumulated, full, rtol=1e-5, atol=1e-7)


def test_schedule():
    config = TrainConfig(steps=10, warmup=0.2, schedule="cosine")
    factors = [lr_factor(s, config) for s in range(10)]
    assert factors[0] < factors[1] <= 1.0 and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] < 0.1
    assert lr_factor(5, TrainConfig(steps=10, schedule="constant", warmup=0)) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


def test_empty_data_is_a_clear_error(tiny):
    adapters = inject(tiny, CGCConfig.lora(rank=2), TASKS)
    with pytest.raises(ValueError, match="training data is empty"):
        train(adapters, [], TrainConfig(steps=1), progress=False)


def test_proportional_steps_uses_largest_remainders_and_gives_every_part_a_step():
    from cgclora_lite.train import proportional_steps

    assert proportional_steps(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}  # tie: first
    assert proportional_steps(10, {"a": 0.26, "b": 0.74}) == {"a": 3, "b": 7}  # 2.6, 7.4: a's .6 wins
    assert proportional_steps(3, {"a": 100, "b": 1, "c": 1}) == {"a": 1, "b": 1, "c": 1}  # the minimum
    assert sum(proportional_steps(97, {"a": 3, "b": 5, "c": 7}).values()) == 97
    with pytest.raises(ValueError, match="at least 3 steps"):
        proportional_steps(2, {"a": 1, "b": 1, "c": 1})
