"""LoRALinear: identity at start, the equation, merge/unmerge, dtypes, frozen base."""

import pytest
import torch
from torch import nn

from cgclora_lite import LoRALinear, MergeError


def make(rank=4, alpha=8.0, dtype=torch.float32, **kw):
    base = nn.Linear(16, 12).to(dtype)
    layer = LoRALinear(base, rank=rank, alpha=alpha, **kw)
    return base, layer


def test_starts_as_identity():
    base, layer = make()
    x = torch.randn(3, 5, 16)
    ref = nn.functional.linear(x, base.weight, base.bias)
    assert torch.equal(layer(x), ref)


def test_forward_is_the_equation():
    base, layer = make(rank=4, alpha=8.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 16)
    expected = x @ base.weight.T + base.bias + (8.0 / 4) * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)


def test_merge_equals_unmerged_and_unmerge_restores_bits():
    base, layer = make()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 16)
    w0 = base.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.equal(base.weight, w0)
    with pytest.raises(MergeError, match="nothing to unmerge"):
        layer.unmerge()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_forward_merge_unmerge(dtype):
    base, layer = make(dtype=dtype)
    nn.init.normal_(layer.lora_B, std=0.1)
    assert layer.lora_A.dtype == torch.float32  # fp32 master weights by default
    x = torch.randn(4, 16).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    w0 = base.weight.detach().clone()
    layer.merge()
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(layer(x).float(), y.float(), rtol=tol, atol=tol)
    layer.unmerge()
    assert torch.equal(base.weight, w0)  # bit for bit, even in half precision


def test_adapter_dtype_base():
    _, layer = make(dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.float32
    layer = LoRALinear(nn.Linear(16, 12).to(torch.bfloat16), dtype="base")
    assert layer.lora_A.dtype == torch.bfloat16 and layer.lora_B.dtype == torch.bfloat16


def test_non_finite_update_is_refused():
    base, layer = make()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    w0 = base.weight.detach().clone()
    with pytest.raises(MergeError, match="NaN or Inf"):
        layer.merge()
    assert not layer.merged and torch.equal(base.weight, w0)


def test_only_adapter_trains_and_dropout_is_train_only():
    base, layer = make(dropout=0.5)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_rejects_non_linear_and_bad_rank():
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(3, 3), rank=0)
