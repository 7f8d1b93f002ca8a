"""The fused CGC-LoRA path: the autograd function's gradients (gradcheck, float64), the dense and
gathered rank layouts against the per-expert loop, dropout, autocast, saved memory, compile."""

import pytest
import torch
from test_cgc import make as make_layer  # noqa: E402
from test_cgc import rel_err
from torch import nn

from cgclora_lite import CGCConfig, CGCLoRALinear, inject
from cgclora_lite.cgc import GATHER_ABOVE
from cgclora_lite.fused import FusedCGCLoRA

TASKS = ["a", "b", "c", "d", "e"]
IDS = torch.tensor([4, 0, 2, 2, 1, 3])  # a mixed-task batch of 6


def make(config, tasks=TASKS, **kw):
    """test_cgc's randomized layer, over this file's five tasks by default."""
    return make_layer(config, tasks=tasks, **kw)


@pytest.mark.parametrize("gathered", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_function_gradients_gradcheck(gathered, dropout):
    """Every input's gradient (base weight and bias too, when they require it), in float64."""
    f64 = dict(dtype=torch.float64, requires_grad=True)
    B, L, d_in, d_out, R, r = 3, 4, 5, 6, 7, 3
    x, W, b = torch.randn(B, L, d_in, **f64), torch.randn(d_out, d_in, **f64), torch.randn(d_out, **f64)
    A, Bm = torch.randn(R, d_in, **f64), torch.randn(d_out, R, **f64)
    cols = torch.tensor([[0, 2, 5], [1, 2, 3], [6, 0, 4]]) if gathered else None
    c = torch.randn(B, r if gathered else R, **f64)
    mask = torch.rand(B, L, d_in) > 0.3 if dropout else None
    assert torch.autograd.gradcheck(
        lambda *t: FusedCGCLoRA.apply(*t, cols, mask, 0.3), (x, W, b, A, Bm, c))


@pytest.mark.parametrize("n_common,n_specific", [(2, 1), (1, 2), (0, 1), (3, 0)])
def test_dense_and_gathered_equal_the_loop(n_common, n_specific):
    config = CGCConfig(n_common=n_common, n_specific=n_specific, rank_common=[3, 1, 2][:n_common],
                       rank_specific=[2, 4][:n_specific], alpha=5.0)
    layer = make(config)
    x = torch.randn(6, 5, 16)
    results = {}
    for name in ("dense", "gathered", "loop"):
        layer.gathered = name == "gathered"
        fn = layer.reference_forward if name == "loop" else layer.forward
        layer.zero_grad()
        out = fn(x, IDS)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[name] = [out.detach()] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    for name in ("dense", "gathered"):
        for got, want in zip(results[name], results["loop"]):
            assert rel_err(got, want) < 1e-5, name


def test_gathered_form_is_chosen_when_other_tasks_dominate_the_rank():
    few = make(CGCConfig(n_common=2, n_specific=1, rank_common=4, rank_specific=4), TASKS[:2])
    many = make(CGCConfig.per_task_lora(rank=4), TASKS)
    assert few.lora_A.shape[0] <= GATHER_ABOVE * few.config.r_active and not few.gathered
    assert many.lora_A.shape[0] > GATHER_ABOVE * many.config.r_active and many.gathered
    # task t's columns are exactly those with a nonzero coefficient for t (a fresh gate is uniform)
    coef = many.rank_coefficients()  # (T, R)
    for t in range(len(TASKS)):
        assert many.task_columns[t].tolist() == coef[t].nonzero().flatten().tolist()


@pytest.mark.parametrize("gathered", [False, True])
def test_dropout_touches_only_the_adapter_input_in_training(gathered):
    layer = make(CGCConfig(n_common=1, n_specific=1, dropout=0.5))
    layer.gathered = gathered
    x = torch.randn(6, 7, 16)
    layer.eval()
    torch.testing.assert_close(layer(x, IDS), layer.reference_forward(x, IDS))
    layer.train()
    assert not torch.allclose(layer(x, IDS), layer.reference_forward(x, IDS).detach())
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.equal(layer(x, IDS), layer.base(x))  # the base path never sees dropout


def test_inputs_of_any_batch_shape():
    layer = make(CGCConfig(n_common=1, n_specific=1))
    for shape in [(6, 16), (6, 2, 3, 16), (0, 4, 16)]:
        x = torch.randn(shape)
        ids = IDS[: shape[0]]
        torch.testing.assert_close(layer(x, ids), layer.reference_forward(x, ids))
    plain = CGCLoRALinear(nn.Linear(16, 12), TASKS, CGCConfig.lora(rank=4))
    assert plain(torch.randn(16)).shape == (12,)  # no task ids, no batch dimension needed


def test_backward_saves_rank_space_activations_only():
    """Kept for backward besides the parameters: the input x, u (B, L, R) and c (B, R); no copy of
    x, no (B, L, d_out) tensor."""
    layer = make(CGCConfig(n_common=2, n_specific=1), d_in=64, d_out=48)
    x = torch.randn(6, 10, 64, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, IDS).sum().backward()
    R = layer.lora_A.shape[0]
    big = [t for t in saved if t.numel() >= 6 * 10 * 48]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # x itself, not a copy
    assert sum(t.numel() for t in saved if t.data_ptr() != x.data_ptr()) <= 6 * 10 * R + 6 * R + 100


def test_bf16_autocast_casts_the_adapter_not_the_input():
    layer = make(CGCConfig(n_common=2, n_specific=1))
    x = torch.randn(6, 5, 16)
    with torch.autocast("cpu", torch.bfloat16):
        out = layer(x, IDS)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.lora_A.grad.dtype == torch.float32
    assert rel_err(out.float(), layer.reference_forward(x, IDS).detach()) < 2e-2


def test_compiles_as_one_graph_and_matches_eager(tiny):
    adapters = inject(tiny, CGCConfig(n_common=2, n_specific=1), TASKS[:3])
    layer = adapters.layers["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        layer.lora_B.normal_()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # no C++ build: seconds
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    ids = torch.tensor([0, 2, 1])
    grads = []
    for fn in (layer, compiled):
        with adapters.route(ids):
            out = fn(x)
        grads.append((out,) + torch.autograd.grad(out.square().sum(), (x, layer.lora_A, layer.lora_B)))
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)


def test_compiled_merged_layer_asserts_on_other_tasks_without_graph_break(tiny):
    adapters = inject(tiny, CGCConfig(n_common=1, n_specific=1), TASKS[:3])
    layer = adapters.layers["model.layers.0.self_attn.q_proj"]
    adapters.merge("b")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, layer.in_features)
    with adapters.route(["b", "b"]):
        torch.testing.assert_close(compiled(x), layer.base(x))
    with adapters.route(["b", "c"]), pytest.raises(RuntimeError, match="merged for task 'b'"):
        compiled(x)
