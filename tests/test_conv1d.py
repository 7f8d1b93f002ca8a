"""Other model families: GPT-2's ``Conv1D`` projections (weight stored (d_in, d_out)), Qwen2 (biases)
and Phi-3 (fused qkv and gate/up projections), as tiny random models built here. The invariants the
Linear layers are tested for hold for them too: identity at start, merge equals unmerged and
unmerge restores bit for bit, the fused forward equals the reference loop (outputs and gradients),
save/load, and export to peft and to a merged model give the framework's logits."""

import pytest
import torch
from conftest import randomize
from torch import nn
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.pytorch_utils import Conv1D

from cgclora_lite import CGCConfig, CGCLoRALinear, CheckpointError, LoRALinear, inject, load_adapters
from cgclora_lite.adapters import find_targets
from cgclora_lite.export import export_merged, export_peft
from cgclora_lite.lora import layer_shape

TASKS = ["a", "b", "c"]
IDS = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))
CONFIG = CGCConfig(n_common=2, n_specific=1, rank_common=2, rank_specific=3)


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=1,
                        eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def qwen2(seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def phi3(seed=0):
    torch.manual_seed(seed)
    config = Phi3Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    return Phi3ForCausalLM(config).eval()


FAMILIES = {"gpt2": gpt2, "qwen2": qwen2, "phi3": phi3}


def test_all_linear_finds_the_conv1d_projections_and_skips_the_head():
    model = gpt2()
    names = find_targets(model, "all-linear")
    assert names == [f"transformer.h.{i}.{m}" for i in range(2)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in names)
    assert layer_shape(model.get_submodule("transformer.h.0.attn.c_attn")) == (96, 32)  # (d_out, d_in)
    assert find_targets(phi3(), ["qkv_proj"]) == ["model.layers.0.self_attn.qkv_proj",
                                                 "model.layers.1.self_attn.qkv_proj"]


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_start(family):
    model = FAMILIES[family]()
    base = model(IDS).logits
    adapters = inject(model, CONFIG, TASKS)
    assert torch.equal(model(IDS, task_ids=["a", "b", "c"]).logits, base)
    adapters.detach()
    assert torch.equal(model(IDS).logits, base)


def conv1d_layer(seed=0):
    torch.manual_seed(seed)
    base = Conv1D(12, 16)  # nf = d_out 12, nx = d_in 16: weight (16, 12)
    nn.init.normal_(base.bias)
    layer = CGCLoRALinear(base, TASKS, CONFIG)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.gate.proj.weight.normal_()
    return base, layer


def test_conv1d_layer_is_the_equation_and_equals_the_reference_loop():
    base, layer = conv1d_layer()
    assert (layer.in_features, layer.out_features) == (16, 12) and layer.transposed
    assert torch.equal(layer.base_weight, base.weight.T)
    x = torch.randn(3, 5, 16, requires_grad=True)
    ids = torch.tensor([0, 2, 1])
    fused = layer(x, ids)
    reference = layer.reference_forward(x, ids)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    delta = torch.stack([layer.delta_weight(t) for t in ids.tolist()])  # (B, d_out, d_in)
    expected = x @ base.weight + base.bias + torch.einsum("bld,bod->blo", x, delta)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(fused.square().sum(), [x, layer.lora_A, layer.lora_B])
    expected_grads = torch.autograd.grad(reference.square().sum(), [x, layer.lora_A, layer.lora_B])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert base.weight.grad is None and not base.weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_merge_equals_unmerged_and_unmerge_restores_bits(dtype):
    base, layer = conv1d_layer()
    layer.to(dtype)
    x = torch.randn(2, 4, 16).to(dtype)
    w0 = base.weight.detach().clone()
    unmerged = layer(x, ["b", "b"])
    layer.merge("b")
    assert base.weight.shape == (16, 12)  # merged in the Conv1D's own layout
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(layer(x, ["b", "b"]).float(), unmerged.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(base.weight.float(), (w0.float() + layer.delta_weight("b").T).to(dtype).float())
    layer.unmerge()
    assert torch.equal(base.weight, w0)


def test_plain_lora_on_conv1d():
    torch.manual_seed(0)
    base = Conv1D(12, 16)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: identity
    nn.init.normal_(layer.lora_B)
    expected = x @ base.weight + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    w0 = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(base.weight, w0)


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_a_task_in_a_model_gives_the_same_logits(family):
    model = FAMILIES[family]()
    adapters = inject(model, CONFIG, TASKS)
    randomize(adapters, std=0.3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(IDS, task_ids=["c"] * 3).logits
    adapters.merge("c")
    torch.testing.assert_close(model(IDS, task_ids=["c"] * 3).logits, expected, rtol=1e-4, atol=1e-4)
    adapters.unmerge()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_and_merged_exports_give_the_framework_logits(family, tmp_path):
    from peft import PeftModel

    build = FAMILIES[family]
    model = build()
    adapters = inject(model, CONFIG, TASKS)
    randomize(adapters, std=0.3)
    expected = model(IDS, task_ids=["b"] * 3).logits
    export_peft(adapters, "b", tmp_path / "peft", base_model="unused")
    config = (tmp_path / "peft" / "adapter_config.json").read_text()
    assert ('"fan_in_fan_out": true' in config) == (family == "gpt2")  # peft needs it for Conv1D
    peft_model = PeftModel.from_pretrained(build(), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-4)
    export_merged(adapters, "b", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is type(model)
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_and_checks_on_conv1d(tmp_path):
    model = gpt2()
    adapters = inject(model, CONFIG, TASKS)
    randomize(adapters, std=0.3)
    expected = model(IDS, task_ids=["a", "b", "c"]).logits
    adapters.save(tmp_path / "saved")
    fresh = gpt2()
    load_adapters(fresh, tmp_path / "saved")
    assert torch.equal(fresh(IDS, task_ids=["a", "b", "c"]).logits, expected)
    with pytest.raises(CheckpointError, match="no module 'transformer.h.0.attn.c_attn'"):
        load_adapters(qwen2(), tmp_path / "saved")  # another model family
    wider = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64,
                                       bos_token_id=1, eos_token_id=2))
    with pytest.raises(CheckpointError, match="is 192 x 64 in this model but 96 x 32"):
        load_adapters(wider, tmp_path / "saved")


def test_training_reaches_only_the_adapters_of_a_gpt2_model():
    model = gpt2()
    adapters = inject(model, CONFIG, TASKS)
    model.train()
    loss = model(IDS, labels=IDS, task_ids=["a", "b", "c"]).loss
    loss.backward()
    trained = {id(p) for p in adapters.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trained)
    layer = adapters.layers["transformer.h.1.mlp.c_proj"]
    assert layer.lora_B.grad.abs().sum() > 0  # B gets a gradient first (A's is zero while B = 0)


def test_unsupported_layers_are_refused_with_their_type_and_the_supported_ones():
    model = gpt2()
    with pytest.raises(TypeError, match=r"'transformer.wte', a torch.nn.modules.sparse.Embedding; only "
                                        r"nn.Linear and transformers' Conv1D \(GPT-2 style\) layers"):
        inject(model, CGCConfig(target_modules=["wte"]), TASKS)
    with pytest.raises(TypeError, match=r"cannot adapt a torch.nn.modules.conv.Conv2d: only nn.Linear "
                                        r"and transformers' Conv1D"):
        LoRALinear(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="none: only nn.Linear and transformers' Conv1D"):
        find_targets(nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4)), "all-linear")



def test_parameter_counts_from_shapes_cover_conv1d_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    from cgclora_lite import CGCConfig, inject
    from cgclora_lite.inject import count_parameters

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    config = CGCConfig(n_common=1, n_specific=1, rank_common=2, rank_specific=2)
    counts = count_parameters(model, config, n_tasks=2)
    assert counts["trainable"] == inject(model, config, ["a", "b"]).num_trainable()
