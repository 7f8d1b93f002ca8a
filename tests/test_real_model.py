"""The real embedded SmolLM2-135M-Instruct with the real default data (marked slow)."""

import pytest
import torch
from torch.utils.data import DataLoader

from cgclora_lite import CGCConfig, inject
from cgclora_lite.data import Collator, MultiTaskDataset, TaskBalancedSampler
from cgclora_lite.evaluate import first_word, generate_answers
from cgclora_lite.tasks import load_default_tasks
from cgclora_lite.train import TrainConfig, evaluate_loss, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    from cgclora_lite.models import load_model
    return load_model()


@pytest.fixture(scope="module")
def tasks():
    return load_default_tasks(train=48, validation=16, test=8)


def test_injection_at_identity_keeps_the_logits(embedded):
    model, tokenizer = embedded
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    base = model(ids).logits
    adapters = inject(model, CGCConfig(n_common=2, n_specific=1), ["topic", "sentiment"])
    try:
        assert len(adapters.layers) == 30 * 7
        assert torch.equal(model(ids, task_ids=["topic"]).logits, base)
        assert torch.equal(model(ids, task_ids=["sentiment"]).logits, base)
    finally:
        adapters.detach()
    assert torch.equal(model(ids).logits, base)


def test_a_few_steps_lower_the_loss_on_default_tasks(embedded, tasks):
    model, tokenizer = embedded
    cluster = [t for t in tasks if t.cluster == "classify"]  # topic, sentiment
    adapters = inject(model, CGCConfig(n_common=2, n_specific=1), [t.name for t in cluster])
    try:
        collate = Collator(tokenizer.pad_token_id)
        train_data = MultiTaskDataset(cluster, tokenizer, "train", max_length=96)
        val_data = MultiTaskDataset(cluster, tokenizer, "validation", max_length=96)
        loader = DataLoader(train_data, batch_sampler=TaskBalancedSampler(train_data, 8, num_batches=8),
                            collate_fn=collate)
        validation = list(DataLoader(val_data, batch_size=16, collate_fn=collate))
        before = evaluate_loss(adapters, validation)
        history = train(adapters, loader, TrainConfig(steps=8, lr=2e-3, warmup=0.25), progress=False)
        after = evaluate_loss(adapters, validation)
        print(f"validation loss {before:.3f} -> {after:.3f}; train loss {history[0]['loss']:.3f} -> "
              f"{history[-1]['loss']:.3f}; {history[-1]['seconds']:.1f} s for 8 steps")
        assert after < 0.7 * before
        # and the trained adapters answer with labels of the right task
        requests = [(t, ex) for t, task in enumerate(cluster) for ex in task.test[:4]]
        answers = generate_answers(model, tokenizer, cluster, requests, max_new_tokens=4,
                                   max_prompt_length=88)
        for (t, _), answer in zip(requests, answers):
            assert first_word(answer) in cluster[t].labels, answer
    finally:
        adapters.detach()


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    """The README's "Using the package" example, run as written (saving into a temp folder)."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("```python\nimport torch\nfrom cgclora_lite")
    code = readme[start + len("```python\n") : readme.index("```", start + 10)]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "my_adapters" / "cgclora_config.json").is_file()
    from cgclora_lite import attached_adapters

    loaded = attached_adapters(namespace["model"])  # load_adapters attached the saved set again
    assert loaded is not None and loaded is not namespace["adapters"]
    assert loaded.tasks == ("topic", "sentiment")
