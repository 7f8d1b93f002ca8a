"""Shared fixtures. Markers: ``slow`` = loads the real embedded model (run by `make test`, counted
separately with `make test-fast` / `make test-slow`)."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the real embedded model or data (tens of seconds)")
    config.addinivalue_line("markers", "browser: drives a real browser (chromium + playwright) against "
                            "JupyterLab; skipped without them unless CI is set (make browser-deps)")


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
