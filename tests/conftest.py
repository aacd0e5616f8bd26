"""Shared fixtures: tiny models built from configs, seeded; torch on few threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd3():
    """A tiny random SD3-family adapter (16 px images, 8x8 latents), in eval mode, no grads."""
    from samplers.models.shapesworld import toy_components

    return toy_components("test", seed=0).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real benchmark files); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA
