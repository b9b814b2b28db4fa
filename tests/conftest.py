"""Shared fixtures: the tiny random-weight model and the shared data folder beside the checkout."""
from __future__ import annotations

import logging
import os
from pathlib import Path

# Tiny models run faster on one thread, and parallel test subprocesses (app, indexer, Ray workers) then do not
# oversubscribe the cores; set before torch loads so child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "initialized randomly" for every tiny model


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or a clean skip when the shared material is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model():
    from fti4cir import create_model

    return create_model("fti4cir-tiny", None, device="cpu", seed=0).eval()


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model):
    return tiny_model.backbone


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 224, 224)
