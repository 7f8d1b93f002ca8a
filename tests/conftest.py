"""Shared fixtures. Markers: ``slow`` = loads the real embedded model (run by `make test`, counted
separately with `make test-fast` / `make test-slow`)."""

import os
from importlib.util import find_spec

import pytest
import torch

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

# Full precision unless asked: amp="auto" would train in bf16 on CPUs with AVX512-BF16 or AMX and in
# fp32 elsewhere, and the exact comparisons (gradient accumulation = one big batch, torchrun ranks
# = one process...) hold in fp32. Tests of bf16 pass amp=True; a test of "auto" unsets this.
os.environ.setdefault("CGCLORA_AMP", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real embedded model or data (tens of seconds)")
    config.addinivalue_line("markers", "browser: drives a real browser (chromium + playwright) against "
                            "JupyterLab; skipped without them unless CI is set (make browser-deps)")


def require(module: str, install: str):
    """``module``'s import spec (it is not imported: an asset wheel's ``__init__`` needs packages
    installed without), or skip the test where it is missing; **under CI (``CI`` set) a missing
    required dependency is a failure, never a skip** (``make test`` installs them all)."""
    spec = find_spec(module)
    if spec is None:
        message = f"{module} is not installed: {install}"
        if IN_CI:
            pytest.fail(message + " (CI is set, so this is a failure, not a skip)")
        pytest.skip(message)
    return spec


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny():
    """A fresh seeded tiny Llama (2 layers, d=64, vocab 128), fp32, eval mode."""
    from cgclora_lite.models import tiny_model

    return tiny_model(seed=0, vocab_size=128)


def randomize(adapters, std: float = 0.2) -> None:
    """Give every B and gate non-trivial values, so tests see a non-identity adapter."""
    with torch.no_grad():
        for p in adapters.parameters():
            if p.dim() == 2:
                p.normal_(std=std)
