"""Save/load: exact round trip, and a clear error for every kind of mismatch."""

import json

import pytest
import torch
from conftest import randomize
from safetensors.torch import load_file, save_file

from cgclora_lite import CGCConfig, CheckpointError, inject, load_adapters
from cgclora_lite.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from cgclora_lite.models import tiny_model

TASKS = ["topic", "sentiment", "headline"]
MIXED = ["topic", "headline", "sentiment", "topic"]
BATCH = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["layer", "shared"])
def saved(request, tmp_path):
    model = tiny_model(seed=0, vocab_size=128)
    config = CGCConfig(n_common=2, n_specific=1, rank_common=[2, 3], gate_scope=request.param,
                       target_modules=["q_proj", "v_proj", "down_proj"])
    adapters = inject(model, config, TASKS)
    randomize(adapters)
    adapters.save(tmp_path / "ckpt")
    return tmp_path / "ckpt", adapters, model(BATCH, task_ids=MIXED).logits


def test_round_trip_is_exact(saved):
    path, adapters, logits = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    fresh = tiny_model(seed=0, vocab_size=128)
    loaded = load_adapters(fresh, path)
    assert torch.equal(fresh(BATCH, task_ids=MIXED).logits, logits)
    assert loaded.config == adapters.config and loaded.tasks == adapters.tasks
    other = tiny_model(seed=0, vocab_size=128)  # load into an existing, matching handle
    again = inject(other, adapters.config, TASKS).load(path)
    assert torch.equal(other(BATCH, task_ids=MIXED).logits, logits)
    assert set(again.state_dict()) == set(adapters.state_dict())


def test_config_is_plain_json(saved):
    path, adapters, _ = saved
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["tasks"] == TASKS and meta["config"]["rank_common"] == [2, 3]
    assert meta["targets"]["model.layers.0.self_attn.q_proj"] == [64, 64]


def test_other_model_shape_is_refused(saved):
    path, _, _ = saved
    wider = tiny_model(seed=0, vocab_size=128, hidden_size=96, num_heads=4)
    with pytest.raises(CheckpointError, match="is 96 x 96 in this model but 64 x 64"):
        load_adapters(wider, path)
    assert not any(hasattr(m, "lora_A") for m in wider.modules())  # nothing was changed


def test_missing_module_is_refused(saved):
    path, _, _ = saved
    shallow = tiny_model(seed=0, vocab_size=128, num_layers=1)
    with pytest.raises(CheckpointError, match="no module 'model.layers.1"):
        load_adapters(shallow, path)


def test_other_tasks_or_config_are_refused(saved):
    path, adapters, _ = saved
    model = tiny_model(seed=0, vocab_size=128)
    with pytest.raises(CheckpointError, match="tasks .* differ"):
        inject(model, adapters.config, ["topic", "headline", "sentiment"]).load(path)
    model = tiny_model(seed=0, vocab_size=128)
    config = CGCConfig.from_dict({**adapters.config.to_dict(), "n_specific": 2})
    with pytest.raises(CheckpointError, match="n_specific: saved 1 vs here 2"):
        inject(model, config, TASKS).load(path)
    model = tiny_model(seed=0, vocab_size=128)
    config = CGCConfig.from_dict({**adapters.config.to_dict(), "target_modules": ["q_proj"]})
    with pytest.raises(CheckpointError, match="adapts other modules"):
        inject(model, config, TASKS).load(path)


def test_tampered_tensors_are_refused_and_nothing_half_loads(saved):
    path, adapters, _ = saved
    tensors = load_file(str(path / WEIGHTS_FILE))
    key = next(k for k in tensors if k.endswith("lora_B"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(path / WEIGHTS_FILE))
    model = tiny_model(seed=0, vocab_size=128)
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is"):
        load_adapters(model, path)
    assert not hasattr(model, "_cgclora_adapters")  # the failed load left the model as it was
    del tensors[key]
    save_file(tensors, str(path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="missing"):
        load_adapters(tiny_model(seed=0, vocab_size=128), path)


def test_not_an_adapter_folder(tmp_path):
    model = tiny_model(seed=0, vocab_size=128)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_adapters(model, tmp_path / "nowhere")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="load it with peft"):
        load_adapters(model, tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "cgclora_lite.adapters", "format_version": 99}))
    with pytest.raises(CheckpointError, match="Upgrade cgclora_lite"):
        load_adapters(model, tmp_path)


def test_no_pickle(saved):
    path, _, _ = saved
    assert not any(p.suffix in {".bin", ".pt", ".pkl", ".pth"} for p in path.iterdir())
