"""transformers.Trainer on adapted models: task ids as a dataset column, only adapters trained."""

import random

import pytest
import torch
from conftest import randomize
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import TrainingArguments

from cgclora_lite import CGCConfig, inject
from cgclora_lite.data import Collator, MultiTaskDataset
from cgclora_lite.tasks import Example, Task
from cgclora_lite.hf import make_trainer, to_hf_dataset
from cgclora_lite.models import load_tokenizer, tiny_model
from cgclora_lite.train import answer_loss

CONFIG = CGCConfig(n_common=1, n_specific=1, rank_common=2, rank_specific=2)
WORDS = "apple river stone cloud green fast quiet paper lamp music".split()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def data(tokenizer):
    """Two synthetic tasks, 8 rows each: random words -> "yes" (task a) or "no" (task b)."""
    rng = random.Random(0)

    def task(name, target):
        examples = [Example(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))), target, name)
                    for _ in range(8)]
        return Task(name=name, cluster="c", instruction="Say it.\n\n{input}", metric="exact_match",
                    train=examples)

    return MultiTaskDataset([task("a", "yes"), task("b", "no")], tokenizer, "train", max_length=48)


def arguments(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), remove_unused_columns=False, report_to=[], use_cpu=True,
                   per_device_train_batch_size=16, per_device_eval_batch_size=16, max_steps=1,
                   learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                   max_grad_norm=0.0, save_strategy="no", disable_tqdm=True, seed=0,
                   dataloader_num_workers=0)
    return TrainingArguments(**{**options, **overrides})


def adapted(randomized=True, sharpen=False):
    model = tiny_model(seed=0)
    if sharpen:  # see test_train.sharpen: lets a few steps show learning on a random model
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(10.0)
    adapters = inject(model, CONFIG, ["a", "b"])
    if randomized:  # tasks then really differ, so wrong task ids change the loss
        randomize(adapters, std=0.3)
    return adapters


def swapped(data):
    """The same rows as an Arrow dataset, every task id replaced by the other task's."""
    return to_hf_dataset(data).map(lambda row: {"task_id": 1 - row["task_id"]})


def our_loss(adapters, data, tokenizer):
    batch = Collator(tokenizer.pad_token_id)(data.items)
    with torch.no_grad(), adapters.route(batch["task_ids"]):
        return answer_loss(adapters.model, batch).item()


def test_trainer_loss_is_our_answer_loss_on_a_mixed_batch(tmp_path, data, tokenizer):
    adapters = adapted()
    trainer = make_trainer(adapters, data, arguments(tmp_path), pad_token_id=tokenizer.pad_token_id)
    ours = our_loss(adapters, data, tokenizer)
    assert trainer.evaluate(data)["eval_loss"] == pytest.approx(ours, rel=1e-6)
    assert trainer.evaluate(to_hf_dataset(data))["eval_loss"] == pytest.approx(ours, rel=1e-6)
    wrong = trainer.evaluate(swapped(data))["eval_loss"]
    assert abs(wrong - ours) > 1e-2, (wrong, ours)


def test_a_trainer_step_has_the_gradient_of_our_loss_with_routing(tmp_path, data, tokenizer):
    """One Trainer step on all 16 rows (both tasks mixed): its gradient is answer_loss's, routed."""
    grads = []

    def capture(optimizer, args, kwargs):
        grads.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])

    results = {}
    for name, rows in [("right", data), ("wrong", swapped(data))]:
        adapters = adapted()
        batch = Collator(tokenizer.pad_token_id)(data.items)
        with adapters.route(batch["task_ids"]):
            answer_loss(adapters.model, batch).backward()
        expected = {id(p): p.grad.clone() for p in adapters.parameters()}
        for p in adapters.parameters():
            p.grad = None
        trainer = make_trainer(adapters, rows, arguments(tmp_path), pad_token_id=tokenizer.pad_token_id)
        handle = register_optimizer_step_pre_hook(capture)
        try:
            trainer.train()
        finally:
            handle.remove()
        params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        assert {id(p) for p in params} == set(expected)
        results[name] = max((g - expected[id(p)]).abs().max().item() for p, g in zip(params, grads[-1]))
        scale = max(g.abs().max().item() for g in grads[-1])
    assert results["right"] < 1e-6 * max(scale, 1.0), results
    assert results["wrong"] > 1e-3 * scale, results


def test_trainer_lowers_the_loss_and_changes_only_the_adapters(tmp_path, data, tokenizer):
    adapters = adapted(randomized=False, sharpen=True)
    model = adapters.model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {k: v.clone() for k, v in adapters.state_dict().items()}
    args = arguments(tmp_path, per_device_train_batch_size=4, max_steps=6, max_grad_norm=1.0)
    trainer = make_trainer(adapters, data, args, eval_dataset=data, pad_token_id=tokenizer.pad_token_id)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 2.0, (before, after)
    assert base and all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    changed = [k for k, v in adapters.state_dict().items() if not torch.equal(v, start[k])]
    assert any(".lora_B" in k for k in changed), changed
    assert not list(tmp_path.glob("checkpoint-*"))


def test_make_trainer_refuses_what_would_lose_the_task_ids_or_train_the_base(tmp_path, data, tokenizer):
    adapters = adapted(randomized=False)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        make_trainer(adapters, data, arguments(tmp_path, remove_unused_columns=True),
                     pad_token_id=tokenizer.pad_token_id)
    adapters.model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable parameters besides the adapters"):
        make_trainer(adapters, data, arguments(tmp_path), pad_token_id=tokenizer.pad_token_id)
