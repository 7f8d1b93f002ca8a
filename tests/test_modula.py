"""MoDULA: the layer's equations, the three training stages, adding a domain, save/load."""

import pytest
import torch

from cgclora_lite import MergeError
from cgclora_lite.models import load_tokenizer, tiny_model
from cgclora_lite.modula import (
    MoDULAConfig,
    MoDULALinear,
    inject_modula,
    load_modula,
    stage_steps,
    train_modula,
)
from cgclora_lite.tasks import group_by_cluster, load_default_tasks
from cgclora_lite.train import TrainConfig

DOMAINS = {"classify": ["topic", "sentiment"], "generate": ["headline", "trivia"]}


def layer(variant, n_domains=2):
    torch.manual_seed(0)
    m = MoDULALinear(torch.nn.Linear(12, 10), n_domains, MoDULAConfig(variant=variant, rank_universal=4,
                                                                      rank_domain=2))
    return m


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_starts_as_the_base_layer_in_every_stage(variant):
    m, x = layer(variant), torch.randn(3, 5, 12)
    for stage in ["universal", 0, 1, "routed"]:
        m.stage = stage
        assert torch.equal(m(x), m.base(x))


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_routed_forward_is_the_equation(variant):
    m, x = layer(variant), torch.randn(3, 5, 12)
    with torch.no_grad():
        for p in [m.universal_B, *m.domain_B, m.router]:
            p.normal_(std=0.5)
    s = m.config.scaling
    g = torch.softmax(x @ m.router.T, dim=-1)  # (3, 5, E)
    expert = lambda A, B: x @ A.T @ B.T  # noqa: E731
    domains = [expert(A, B) for A, B in zip(m.domain_A, m.domain_B)]
    universal = expert(m.universal_A, m.universal_B)
    if variant == "flan":
        mix = g[..., :1] * universal + sum(g[..., d + 1: d + 2] * y for d, y in enumerate(domains))
    else:
        mix = universal + sum(g[..., d: d + 1] * y for d, y in enumerate(domains))
    assert torch.allclose(m(x), m.base(x) + s * mix, atol=1e-5)
    assert g.std(dim=(0, 1)).sum() > 0  # the router depends on the token
    m.stage = 1  # domain stage: universal + domain 1, weight 1 each
    assert torch.allclose(m(x), m.base(x) + s * (universal + domains[1]), atol=1e-5)
    m.stage = "routed"
    with pytest.raises(MergeError, match="token"):
        m.merge()


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer()
    tasks = load_default_tasks(train=8, validation=0, test=2)
    return tokenizer, tasks


def snapshot(adapters):
    return {k: v.clone() for k, v in adapters.state_dict().items()}


def changed(before, adapters):
    """The kinds of parameter (universal_A, domain_B, router...) that changed since ``before``."""
    after, kinds = adapters.state_dict(), ("universal_A", "universal_B", "domain_A", "domain_B", "router")
    return {next(p for p in k.split(".") if p in kinds) for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_stages_train_only_their_parameters(setup, variant):
    tokenizer, tasks = setup
    model = tiny_model(seed=0)
    adapters = inject_modula(model, MoDULAConfig(variant=variant), DOMAINS)
    config = TrainConfig(steps=10, lr=1e-2, warmup=0.0)  # 4, 2, 2, 2 steps: A moves from step 2
    stages, rates = [], []
    original = train_modula.__globals__["train"]

    def spy(handle, loader, cfg, validation=None, progress=True):
        before = snapshot(handle)
        history = original(handle, loader, cfg, validation, progress)
        stages.append(changed(before, handle))
        rates.append(cfg.lr)
        return history

    train_modula.__globals__["train"] = spy
    try:
        histories = train_modula(adapters, tasks, tokenizer, config, batch_size=4, max_length=64,
                                 progress=False)
    finally:
        train_modula.__globals__["train"] = original
    assert list(histories) == ["universal", "classify", "generate", "router"]
    assert [len(h) for h in histories.values()] == [4, 2, 2, 2]
    assert stages[0] == {"universal_A", "universal_B"}
    assert stages[1] == stages[2] == {"domain_A", "domain_B"}
    assert stages[3] == {"router"}
    assert rates == [1e-2, 1e-2, 1e-2, 1e-2 * adapters.config.router_lr_scale]
    with torch.no_grad():  # no task ids needed at inference
        model(torch.tensor([[1, 2, 3]]))
    table = adapters.routing_table([{"input_ids": torch.tensor([[5, 6, 7], [8, 9, 10]]),
                                     "attention_mask": torch.ones(2, 3, dtype=torch.long),
                                     "task_ids": torch.tensor([0, 3])}])
    assert list(table.index) == ["topic", "trivia"]
    assert table.sum(axis=1).round(5).tolist() == [1.0, 1.0]  # router weights sum to 1
    labels = torch.tensor([[-100, -100, 7], [-100, 9, 10]])  # answer positions only
    answers = adapters.routing_table([{"input_ids": torch.tensor([[5, 6, 7], [8, 9, 10]]),
                                       "attention_mask": torch.ones(2, 3, dtype=torch.long),
                                       "labels": labels, "task_ids": torch.tensor([0, 3])}])
    assert answers.sum(axis=1).round(5).tolist() == [1.0, 1.0]
    assert not answers.equals(table)  # fewer tokens: other averages


def test_add_domain_keeps_existing_experts_and_learns(setup, tmp_path):
    tokenizer, tasks = setup
    model = tiny_model(seed=0)
    first = {d: t for d, t in DOMAINS.items() if d == "classify"}
    adapters = inject_modula(model, MoDULAConfig(variant="res"), first)
    train_modula(adapters, tasks, tokenizer, TrainConfig(steps=4, lr=1e-2), batch_size=4,
                 max_length=64, progress=False)
    before = snapshot(adapters)
    adapters.add_domain("generate", DOMAINS["generate"])
    histories = train_modula(adapters, tasks, tokenizer, TrainConfig(steps=8, lr=3e-2, warmup=0.0),
                             batch_size=4, max_length=64, progress=False, only=["generate"])
    assert list(histories) == ["generate", "router"]
    after = adapters.state_dict()
    for key, value in before.items():
        if "router" not in key:
            assert torch.equal(after[key], value), key  # no existing expert retrained
    new = [k for k in after if k not in before and "domain_B" in k]
    assert new and all(after[k].abs().sum() > 0 for k in new)  # the new domain's expert learned
    loss = [h["loss"] for h in histories["generate"]]
    assert loss[-1] < loss[0]

    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = model(ids).logits
    adapters.save(tmp_path)
    fresh = tiny_model(seed=0)
    loaded = load_modula(fresh, tmp_path)
    assert loaded.domains == {"classify": DOMAINS["classify"], "generate": DOMAINS["generate"]}
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_errors_and_budget():
    with pytest.raises(ValueError, match="variant"):
        MoDULAConfig(variant="mixed")
    with pytest.raises(ValueError, match="stage_fractions"):
        MoDULAConfig(stage_fractions=(0.5, 0.5, 0.5))
    model = tiny_model(seed=0, vocab_size=128)
    adapters = inject_modula(model, MoDULAConfig(), DOMAINS)
    with pytest.raises(ValueError, match="stage must be"):
        adapters.set_stage("nope")
    # MoDULA and CGC-LoRA are sibling adapter sets: neither carries the other's methods
    assert not hasattr(adapters, "add_task") and not hasattr(adapters, "gate_weights")
    with pytest.raises(ValueError, match="exists already"):
        adapters.add_domain("classify", ["x"])
    tasks = group_by_cluster(load_default_tasks(train=2, validation=0, test=1))
    steps = stage_steps(10, MoDULAConfig(), tasks)
    assert steps == {"universal": 4, "classify": 2, "generate": 2, "router": 2}
    assert sum(stage_steps(7, MoDULAConfig(), tasks).values()) == 7
    with pytest.raises(ValueError, match="at least 4 steps"):
        stage_steps(3, MoDULAConfig(), tasks)


def test_loading_checks_the_model_the_kind_and_the_domains(tmp_path):
    from cgclora_lite import CGCConfig, CheckpointError, inject

    adapters = inject_modula(tiny_model(seed=0, vocab_size=128), MoDULAConfig(), DOMAINS)
    adapters.save(tmp_path / "modula")
    other = tiny_model(seed=0, vocab_size=128, hidden_size=32)
    with pytest.raises(CheckpointError, match="not the model they were trained on"):
        load_modula(other, tmp_path / "modula")
    assert not hasattr(other, "_cgclora_adapters")  # nothing half-loaded
    cgc = inject(tiny_model(seed=0, vocab_size=128), CGCConfig(), ["a", "b"])
    cgc.save(tmp_path / "cgc")
    with pytest.raises(CheckpointError, match="not a cgclora_lite modula adapter folder"):
        load_modula(tiny_model(seed=0, vocab_size=128), tmp_path / "cgc")
    two = inject_modula(tiny_model(seed=0, vocab_size=128), MoDULAConfig(),
                        {"classify": DOMAINS["classify"]})
    with pytest.raises(CheckpointError, match="tasks"):
        two.load(tmp_path / "modula")
