"""Data-parallel training with torchrun on the CPU (gloo): two ranks train as one process would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize
from safetensors.torch import load_file

from cgclora_lite.data import shard
from cgclora_lite.distributed import GradientSync, all_reduce_sum, world
from cgclora_lite.launch import RunSpec, build, run_train, shard_loader
from cgclora_lite.train import answer_loss, answer_tokens

TORCHRUN = Path(sys.executable).parent / "torchrun"
SPEC = RunSpec(steps=3)  # tiny model, 'classify' cluster (topic, sentiment), global batch 8


def launch(out: Path, *extra: str, timeout: int = 240) -> None:
    """Run ``torchrun --standalone --nproc_per_node 2 -m cgclora_lite.launch`` into ``out``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "cgclora_lite.launch",
               "--steps", str(SPEC.steps), "--out", str(out), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


def test_shards_are_contiguous_and_cover_the_batch():
    batch = list(range(10, 17))  # 7 rows over 3 ranks: 3, 2, 2
    parts = [shard(batch, r, 3) for r in range(3)]
    assert parts == [[10, 11, 12], [13, 14], [15, 16]]
    assert shard(batch, 0, 1) == batch
    with pytest.raises(ValueError, match="at least the number of processes"):
        shard([1, 2], 0, 3)


def test_gradient_sync_does_nothing_in_one_process():
    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.full((2, 3), 0.5)
    sync = GradientSync(params, torch.device("cpu"))
    assert world() == (0, 1) and (sync.rank, sync.world_size) == (0, 1)
    sync.broadcast_()
    assert sync.loss_weights([7]) == [1.0]
    assert sync.loss_weights([3, 0, 1]) == [0.75, None, 0.25]  # token shares; no token: skipped
    assert sync.sum_gradients_(1.25) == 1.25
    assert torch.equal(params[0].grad, torch.full((2, 3), 0.5)) and params[1].grad is None
    assert all_reduce_sum([3.0, 4], "cpu") == [3.0, 4]


def test_torchrun_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    launch(tmp_path)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # bit for bit

    single, history = run_train(SPEC)  # no process group here: one process, whole global batches
    reference = single.state_dict()
    assert reference.keys() == rank0.keys()
    for key, value in reference.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert any(k.endswith("lora_B") and value.abs().max() > 1e-3 for k, value in reference.items())
    ranks = json.loads((tmp_path / "history.json").read_text())
    assert ranks["world_size"] == 2
    for theirs, ours in zip(ranks["history"], history, strict=True):
        assert theirs["loss"] == pytest.approx(ours["loss"], rel=1e-6)
        assert theirs["grad_norm"] == pytest.approx(ours["grad_norm"], rel=1e-5)


def test_shards_hold_unequal_answer_tokens_so_the_global_normalisation_matters():
    """On this data the two shards of the first batch hold different numbers of answer tokens:
    the mean of the two shard means (what averaging per-rank mean losses gives) is then not the
    mean over the global batch, which the torchrun test above matches."""
    adapters, tokenizer, data = build(SPEC)
    randomize(adapters, std=0.3)  # tokens of different tasks then have clearly different losses
    whole = next(iter(shard_loader(data, SPEC, tokenizer.pad_token_id)))
    halves = [next(iter(shard_loader(data, SPEC, tokenizer.pad_token_id, r, 2))) for r in (0, 1)]
    counts = [answer_tokens(b) for b in halves]
    assert counts[0] != counts[1] and sum(counts) == answer_tokens(whole), counts

    def loss(batch):
        with torch.no_grad(), adapters.route(batch["task_ids"]):
            return answer_loss(adapters.model, batch).item()

    means, global_mean = [loss(b) for b in halves], loss(whole)
    assert sum(m * n for m, n in zip(means, counts)) / sum(counts) == pytest.approx(global_mean, rel=1e-6)
    assert abs(sum(means) / 2 - global_mean) > 1e-4, (means, global_mean)


def test_torchrun_with_transformers_trainer_keeps_ranks_identical(tmp_path):
    """Trainer wraps the model in DistributedDataParallel; the routing survives the wrapper."""
    launch(tmp_path, "--engine", "trainer")
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["engine"] == "trainer" and history["world_size"] == 2
    assert len(history["history"]) == SPEC.steps
    assert any(k.endswith("lora_B") and v.abs().max() > 1e-3 for k, v in rank0.items())
