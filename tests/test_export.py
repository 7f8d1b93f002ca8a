"""Export a task to peft and to a merged transformers folder: both give the framework's logits."""

import pytest
import torch
from conftest import randomize
from transformers import AutoModelForCausalLM

from cgclora_lite import CGCConfig, inject
from cgclora_lite.experiment import CGC_METHODS, method_config
from cgclora_lite.export import export_merged, export_peft
from cgclora_lite.models import tiny_model

TASKS = ["topic", "sentiment", "headline"]
BATCH = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))


def adapted(config):
    model = tiny_model(seed=0, vocab_size=128)
    adapters = inject(model, config, TASKS)
    randomize(adapters, std=0.3)
    return model, adapters


@pytest.mark.parametrize("method", CGC_METHODS)
def test_peft_export_gives_the_same_logits(method, tmp_path):
    from peft import PeftModel

    model, adapters = adapted(method_config(method))
    for task in TASKS:
        expected = model(BATCH, task_ids=[task] * 2).logits
        export_peft(adapters, task, tmp_path / task)
        peft_model = PeftModel.from_pretrained(tiny_model(seed=0, vocab_size=128), tmp_path / task).eval()
        got = peft_model(input_ids=BATCH).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_plain_lora_exports_without_a_task(tmp_path):
    from peft import PeftModel

    model, adapters = adapted(CGCConfig.lora(rank=4))
    expected = model(BATCH).logits
    export_peft(adapters, None, tmp_path)
    got = PeftModel.from_pretrained(tiny_model(seed=0, vocab_size=128), tmp_path)(input_ids=BATCH).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scope", ["layer", "shared"])
def test_merged_export_loads_with_transformers_and_leaves_the_model_intact(scope, tmp_path):
    model, adapters = adapted(CGCConfig(n_common=2, n_specific=1, gate_scope=scope))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(BATCH, task_ids=["sentiment"] * 2).logits
    export_merged(adapters, "sentiment", tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(s in k for k in loaded.state_dict() for s in ("lora_", "task_embedding", ".base."))
    torch.testing.assert_close(loaded(BATCH).logits, expected, rtol=1e-4, atol=1e-4)
    assert adapters.is_attached and adapters.merged_task is None
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_unknown_task_is_refused(tmp_path):
    _, adapters = adapted(CGCConfig())
    with pytest.raises(ValueError, match="unknown task 'trivia'"):
        export_peft(adapters, "trivia", tmp_path)
