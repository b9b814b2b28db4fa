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


def run_subcommand(module, argv: list[str]):
    """Parse `argv` with only `module`'s subcommand registered and run it in-process (its `func`'s return value)."""
    import argparse

    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def place_photos(photos, folder: Path) -> list[Path]:
    """Copy photos into folder/<class>/<file>, keeping each one's class folder name; returns the copies."""
    import shutil

    out = []
    for p in photos:
        (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
        out.append(Path(shutil.copy(p, folder / p.parent.name / p.name)))
    return out


@pytest.fixture(scope="session")
def tiny_model():
    from fti4cir import create_model

    return create_model("fti4cir-tiny", None, device="cpu", seed=0).eval()


@pytest.fixture(scope="session")
def demo_galleries(tiny_model, tmp_path_factory):
    """A galleries folder with "demo": 12 shared clothing photos indexed with the tiny model (read-only: tests that
    change a gallery build their own)."""
    from app_helpers import build_small_gallery

    return build_small_gallery(tiny_model, tmp_path_factory.mktemp("demo-gallery"), 12)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model):
    return tiny_model.backbone


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 224, 224)


def random_m2c(backbone, stage: int, seed: int = 5):
    """A random M2C network for `backbone` (eval mode); stage 2 adds composing adapters, scaled up from the official
    init (x 0.01 barely moves a random tiny tower) so that "m2c+compose" visibly differs from "m2c". The same seed
    gives the same stage-I part in both stages."""
    from fti4cir.m2c import M2CConfig, M2CNetwork

    torch.manual_seed(seed)
    net = M2CNetwork(M2CConfig.for_backbone(backbone))
    if stage == 2:
        net.add_adapters()
        with torch.no_grad():
            for adapter in net.adapters:
                adapter.down.mul_(30)
                adapter.up.mul_(30)
    return net.eval()
