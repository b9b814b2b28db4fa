"""Helpers of the app tests: a small indexed gallery of shared clothing photos, a brute-force ranking to compare the
service against, and access to a built page's component props and its /search function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import place_photos, shared_data


def build_small_gallery(model, tmp: Path, count: int, name: str = "demo") -> Path:
    """Copy `count` clothing photos (spread over the classes) into tmp/photos and index them into tmp/galleries."""
    from fti4cir.gallery import build_gallery

    classes = sorted(p for p in shared_data("photos", "clothing", "test").iterdir() if p.is_dir())
    per_class = -(-count // len(classes))
    chosen = [f for c in classes for f in sorted(c.glob("*.jpg"))[:per_class]][:count]
    source = tmp / "photos"
    place_photos(chosen, source)
    build_gallery(model, str(source), name, galleries_dir=tmp / "galleries", progress=False, num_workers=0)
    return tmp / "galleries"


def brute_force(service, query: torch.Tensor, exclude: int | None = None) -> list[int]:
    scores = service.gallery.features @ query[0].cpu()
    if exclude is not None:
        scores[exclude] = -np.inf
    return torch.argsort(scores, descending=True, stable=True).tolist()


def page_props(demo) -> dict[str, dict]:
    config = demo.get_config_file()
    return {c["props"]["elem_id"]: c["props"] for c in config["components"] if c["props"].get("elem_id")}


def api_search(demo):
    return next(f.fn for f in demo.fns.values() if f.api_name == "search")
