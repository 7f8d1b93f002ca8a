"""The training loop and the answer-only loss, on the tiny model."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cgclora_lite import CGCConfig, inject
from cgclora_lite.experiment import CGC_METHODS, method_config
from cgclora_lite.train import (
    TrainConfig,
    answer_loss,
    answer_tokens,
    evaluate_loss,
    lr_factor,
    train,
)

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


def test_validation_runs_every_eval_every_steps_and_after_the_last(tiny):
    """A run (or a MoDULA stage) shorter than ``eval_every``, or not a multiple of it, still ends
    with a validation loss: the study reads each run's last one."""
    adapters = inject(tiny, method_config("cgc-1+1"), TASKS)
    data = toy_batches(2)
    history = train(adapters, data, TrainConfig(steps=7, eval_every=5), validation=data, progress=False)
    assert [h["step"] for h in history if "val_loss_by_task" in h] == [5, 7]
    short = train(adapters, data, TrainConfig(steps=3, eval_every=5), validation=data, progress=False)
    assert [h["step"] for h in short if "val_loss" in h] == [3]


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


def _captured_steps(adapters, batches, config, validation=None):
    """Train and record, at every optimizer step (before it), each group's lr and the gradients."""
    seen = []

    def capture(optimizer, args, kwargs):
        seen.append({"lr": [g["lr"] for g in optimizer.param_groups],
                     "grads": [p.grad.clone() for p in adapters.parameters()]})

    handle = register_optimizer_step_pre_hook(capture)
    try:
        history = train(adapters, batches, config, validation, progress=False)
    finally:
        handle.remove()
    return seen, history


def _randomized(adapters, std=0.1):
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(std=std)
    return adapters


def test_accumulation_weights_every_answer_token_alike_whatever_the_micro_batches_hold(tiny):
    """Two micro-batches with 6 and 15 answer tokens accumulate to exactly the full batch: the
    step's loss is the mean over its tokens (the rule torchrun uses across ranks), not the mean of
    the two micro-batch means."""
    data = toy_batches(1)[0]
    data["labels"][:2, :6] = data["input_ids"][:2, :6]  # the first half learns its prompt too
    data["labels"][:2, :4] = -100
    halves = [{k: v[i * 2 : (i + 1) * 2] for k, v in data.items()} for i in range(2)]
    assert [answer_tokens(h) for h in halves] == [10, 6]
    adapters = _randomized(inject(tiny, CGCConfig(n_common=1, n_specific=1), TASKS))
    start = {k: v.clone() for k, v in adapters.state_dict().items()}
    runs = []
    for batches, accum in [([data], 1), (halves, 2)]:
        with torch.no_grad():
            for k, v in adapters.state_dict().items():
                v.copy_(start[k])
        config = TrainConfig(steps=1, lr=1e-2, grad_accum=accum, warmup=0, max_grad_norm=0)
        runs.append(_captured_steps(adapters, batches, config))
    (full, full_history), (accumulated, accumulated_history) = runs
    for a, b in zip(full[0]["grads"], accumulated[0]["grads"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert accumulated_history[0]["loss"] == pytest.approx(full_history[0]["loss"], rel=1e-5)
    means = []
    for half in halves:  # and the mean of the halves' means is not the step's loss
        with torch.no_grad(), adapters.route(half["task_ids"]):
            means.append(answer_loss(tiny, half).item())
    assert abs(sum(means) / 2 - full_history[0]["loss"]) > 1e-3, means


def test_schedule_and_gate_rate_reach_the_optimizer(tiny):
    adapters = inject(tiny, CGCConfig(n_common=1, n_specific=1, gate_lr_scale=10.0), TASKS)
    config = TrainConfig(steps=6, lr=0.5, warmup=0.34, schedule="linear")
    seen, history = _captured_steps(adapters, toy_batches(), config)
    expected = [0.5 * lr_factor(s, config) for s in range(6)]
    assert [h["lr"] for h in history] == expected
    # warm-up over int(0.34 * 6) = 2 steps, then linear decay over the 4 left (by hand)
    assert expected == pytest.approx([0.5 * f for f in (1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25)])
    scales = sorted({g["lr_scale"] for g in adapters.optimizer_groups()})
    assert scales == [1.0, 10.0]
    for step, lrs in enumerate(s["lr"] for s in seen):
        assert sorted(set(lrs)) == pytest.approx([expected[step], 10 * expected[step]])


def test_clipping_caps_the_gradient_the_optimizer_sees(tiny):
    adapters = _randomized(inject(sharpen(tiny), CGCConfig(n_common=1, n_specific=1), TASKS), std=0.3)
    start = {k: v.clone() for k, v in adapters.state_dict().items()}
    norms = {}
    for clip in (0.0, 1e-3):
        with torch.no_grad():
            for k, v in adapters.state_dict().items():
                v.copy_(start[k])
        seen, history = _captured_steps(adapters, toy_batches(1), TrainConfig(steps=1, warmup=0,
                                                                             max_grad_norm=clip))
        norms[clip] = (history[0]["grad_norm"], torch.cat([g.flatten() for g in seen[0]["grads"]]).norm())
    recorded, unclipped = norms[0.0]
    assert float(unclipped) == pytest.approx(recorded, rel=1e-5) and recorded > 1e-2
    recorded_clipped, clipped = norms[1e-3]
    assert recorded_clipped == pytest.approx(recorded, rel=1e-5)  # the norm before clipping
    assert float(clipped) == pytest.approx(1e-3, rel=1e-3)


def test_evaluate_loss_weighs_tokens_not_batches(tiny):
    """One batch with 3 answer tokens and one with 12: the mean is over the 15 tokens."""
    adapters = _randomized(inject(tiny, CGCConfig(n_common=1, n_specific=1), TASKS), std=0.3)
    short, long = (b for b in toy_batches(2))
    short = {k: v[:1] for k, v in short.items()}  # one row: 3 answer tokens, task a
    assert (answer_tokens(short), answer_tokens(long)) == (3, 12)
    with torch.no_grad():
        sums = {}
        for name, batch in (("short", short), ("long", long)):
            with adapters.route(batch["task_ids"]):
                sums[name] = answer_loss(tiny, batch).item() * answer_tokens(batch)
        mean, by_task = evaluate_loss(adapters, [short, long], by_task=True)
    assert mean == pytest.approx((sums["short"] + sums["long"]) / 15, rel=1e-5)
    assert set(by_task) == {"a", "b"}
    only_b = {k: v[long["task_ids"] == 1] for k, v in long.items()}
    with torch.no_grad(), adapters.route(only_b["task_ids"]):
        assert by_task["b"] == pytest.approx(answer_loss(tiny, only_b).item(), rel=1e-5)


def test_schedule():
    config = TrainConfig(steps=10, warmup=0.2, schedule="cosine")
    factors = [lr_factor(s, config) for s in range(10)]
    assert factors[0] < factors[1] <= 1.0 and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] < 0.1
    assert lr_factor(5, TrainConfig(steps=10, schedule="constant", warmup=0)) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    assert factors[:2] == pytest.approx([1 / 3, 2 / 3])  # warm-up: (step + 1) / (warm + 1), warm = 2
    linear = TrainConfig(steps=4, warmup=0, schedule="linear")
    assert [lr_factor(s, linear) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    for bad in (dict(steps=0), dict(grad_accum=0)):  # each alone is an error
        with pytest.raises(ValueError, match="steps and grad_accum must be >= 1"):
            TrainConfig(**bad)
    for warmup in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"warmup is a fraction of the steps in \[0, 1\)"):
            TrainConfig(warmup=warmup)
    with pytest.raises(ValueError, match="amp must be True, False or 'auto'"):
        TrainConfig(amp="fp16")


def test_answer_tokens_counts_the_targets_after_the_first_position():
    from cgclora_lite.train import answer_tokens

    labels = torch.tensor([[-100, 7, 8, -100], [5, -100, -100, 9]])  # position 0 is never a target
    assert answer_tokens({"labels": labels}) == 3


def test_empty_data_is_a_clear_error(tiny):
    adapters = inject(tiny, CGCConfig.lora(rank=2), TASKS)
    with pytest.raises(ValueError, match="training data is empty"):
        train(adapters, [], TrainConfig(steps=1), progress=False)


def test_proportional_steps_uses_largest_remainders_and_gives_every_part_a_step():
    from cgclora_lite.train import proportional_steps

    assert proportional_steps(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}  # tie: first
    assert proportional_steps(10, {"a": 0.26, "b": 0.74}) == {"a": 3, "b": 7}  # 2.6, 7.4: a's .6 wins
    assert proportional_steps(3, {"a": 100, "b": 1, "c": 1}) == {"a": 1, "b": 1, "c": 1}  # the minimum
    # raw 0.31 / 0.62 / 3.08: the one-step minimum lifts a and b, the largest part gives one back
    assert proportional_steps(4, {"a": 1, "b": 2, "c": 10}) == {"a": 1, "b": 1, "c": 2}
    assert sum(proportional_steps(97, {"a": 3, "b": 5, "c": 7}).values()) == 97
    with pytest.raises(ValueError, match="at least 3 steps"):
        proportional_steps(2, {"a": 1, "b": 1, "c": 1})


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, native):
    from cgclora_lite import models

    monkeypatch.delenv("CGCLORA_AMP", raising=False)  # the suite's fp32 default (conftest)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    assert models.autocast_dtype("cpu", "auto") == (torch.bfloat16 if native else None)
    monkeypatch.setenv("CGCLORA_AMP", "1")
    assert models.autocast_dtype("cpu", "auto") == torch.bfloat16 and models.autocast_dtype("cpu", False) is None
