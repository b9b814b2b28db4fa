"""Test helpers: benchmark roots that reuse the real annotation files, plus small placeholder images.

The real annotations live read-only in ``shared/data/benchmarks`` (no images). A test root links their annotation
folders into a temporary directory, where placeholder images are created only for the names a test asks for.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from pathlib import Path

import pytest
from PIL import Image

from fti4cir.evaluation.datasets import Benchmark

SHARED_BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"
_FOLDERS = {"fashioniq": "FashionIQ", "cirr": "CIRR", "circo": "CIRCO"}
# Annotation folders of each benchmark, relative to its root.
_ANNOTATION_DIRS = {"fashioniq": ("captions", "image_splits"), "cirr": ("cirr",), "circo": ("annotations",)}


def real_annotations(name: str) -> Path:
    """The real annotation root of a benchmark; skips the test when the shared data is absent."""
    root = SHARED_BENCHMARKS / _FOLDERS[name]
    if not all((root / folder).is_dir() for folder in _ANNOTATION_DIRS[name]):
        pytest.skip(f"real {name} annotations not found under {root}")
    return root


def benchmark_root(tmp_path: Path, name: str) -> Path:
    """A fresh root in ``tmp_path`` whose annotation folders link to the real ones (skips when absent)."""
    source = real_annotations(name)
    root = tmp_path / _FOLDERS[name]
    root.mkdir(parents=True, exist_ok=True)
    for folder in _ANNOTATION_DIRS[name]:
        (root / folder).symlink_to(source / folder, target_is_directory=True)
    return root


def circo_image_ids(root: Path, split: str, n_queries: int | None = None) -> list[int]:
    """COCO ids that the first ``n_queries`` CIRCO queries use (references, targets, ground truths), in order."""
    with open(root / "annotations" / f"{split}.json", encoding="utf-8") as handle:
        entries = json.load(handle)[:n_queries]
    ids = []
    for entry in entries:
        ids.append(entry["reference_img_id"])
        ids.extend(entry.get("gt_img_ids", ()))
    return list(dict.fromkeys(ids))


def write_circo_image_info(root: Path, image_ids: Iterable[int]) -> Path:
    """Write a COCO ``image_info_unlabeled2017.json`` listing ``image_ids`` (the real one is not shipped here)."""
    path = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [{"id": image_id, "file_name": f"{image_id:012d}.jpg"} for image_id in image_ids]
    path.write_text(json.dumps({"images": images}), encoding="utf-8")
    return path


def make_placeholder_images(benchmark: Benchmark, names: Iterable[str], size: int = 16) -> list[Path]:
    """Create small solid images at the paths the benchmark gives ``names``; colours differ between names."""
    paths = []
    for name in names:
        path = benchmark.images[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        checksum = zlib.crc32(name.encode("utf-8"))
        colour = (checksum & 255, (checksum >> 8) & 255, (checksum >> 16) & 255)
        Image.new("RGB", (size, size), colour).save(path)
        paths.append(path)
    return paths
