"""Readers for the FashionIQ, CIRR and CIRCO benchmarks in their official directory layouts.

Each reader returns a :class:`Benchmark`: the gallery (the index set the official evaluation code ranks, in the
official order, which decides how score ties are broken) and the queries. Loading only reads annotation files; it
never touches the images, because galleries can hold 120k files. :func:`check_images_exist` does that on demand.

Layouts (``root`` is the folder the official code calls the dataset path):

* FashionIQ: ``root/captions/cap.<category>.<split>.json``, ``root/image_splits/split.<category>.<split>.json`` and
  images ``root/<category>/<asin>.jpg`` as in the FTI4CIR README and its ``dataset.py``; ``root/images/<asin>.jpg``
  (the original FashionIQ release) is used instead when ``root/<category>`` is absent and ``root/images`` exists.
  The gallery is the category's split list.
* CIRR: ``root/cirr/captions/cap.rc2.<split>.json`` and ``root/cirr/image_splits/split.rc2.<split>.json``, which maps
  image names to paths such as ``./dev/dev-0-0-img0.png`` relative to ``root``. The gallery is every image of the
  split file, in file order.
* CIRCO: ``root/annotations/<split>.json``; the gallery is every image listed in
  ``root/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json``, stored under
  ``root/COCO2017_unlabeled/unlabeled2017/<file_name>``. Image names are the COCO ids as decimal strings without
  padding (``"355099"``), as the official CIRCO/SEARLE/FTI4CIR code names them; the 12-digit zero padding only
  appears in the file names.
* clothing-cir (this project's held-out benchmark of the demo photos, `fti4cir demo-benchmark`):
  ``root/queries.json``; its ``images`` entry is the image folder relative to ``root`` (``../clothing/test``) and
  image names are paths relative to that folder (``dress/abc.jpg``). The gallery is its ``gallery`` list. Every
  query has several ground truths (the first is its ``target``) and a type (``colour``, ``class``, ``both``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fti4cir.errors import UserError

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
FASHIONIQ_SPLITS = ("train", "val", "test")
CIRR_SPLITS = ("train", "val", "test1")
CIRCO_SPLITS = ("val", "test")
CLOTHING_CIR_SPLITS = ("test", "validation")  # validation: for choosing settings (`demo-benchmark --split`)
CLOTHING_CIR_FILE = "queries.json"
BENCHMARK_NAMES = ("fashioniq", "cirr", "circo", "clothing-cir")
# The split `fti4cir evaluate` scores each benchmark on (the others' ground truth is on the servers).
EVALUATE_SPLITS = {"fashioniq": ("val",), "cirr": ("val",), "circo": ("val",), "clothing-cir": CLOTHING_CIR_SPLITS}

_MISSING_EXAMPLES = 5  # how many missing files an error message lists


@dataclass(frozen=True)
class Query:
    """One composed-retrieval query."""

    query_id: str  # CIRR pairid / CIRCO id / FashionIQ "<category>:<index>"
    reference: str  # reference image name (key into Benchmark.images)
    texts: tuple[str, ...]  # FashionIQ: the two relative captions (raw, unmodified); CIRR/CIRCO: one caption
    target: str | None  # None on test splits
    group: tuple[str, ...] = ()  # CIRR img_set members
    ground_truths: tuple[str, ...] = ()  # CIRCO gt_img_ids (as names), val only; clothing-cir: all of them
    category: str = ""  # FashionIQ dress|shirt|toptee
    kind: str = ""  # clothing-cir query type: colour|class|both


@dataclass
class Benchmark:
    """A benchmark split: gallery images (name -> path, in official order) and queries."""

    name: str
    split: str
    images: dict[str, Path]
    queries: list[Query]


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"annotation file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read annotation file {path}: {error}") from None


def _malformed(path: Path, what: str) -> UserError:
    return UserError(f"malformed annotation file {path}: {what}")


def _require_list(data: Any, path: Path) -> list:
    if not isinstance(data, list):
        raise _malformed(path, f"expected a JSON list, found {type(data).__name__}")
    return data


def _field(entry: Any, key: str, kind: type | tuple[type, ...], path: Path, index: int) -> Any:
    """entry[key], checked to be of the given JSON type (bools are never accepted as ints)."""
    if not isinstance(entry, dict):
        raise _malformed(path, f"entry {index} is not an object")
    if key not in entry:
        raise _malformed(path, f"entry {index} lacks {key!r}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _malformed(path, f"entry {index} has a {type(value).__name__} for {key!r}")
    return value


def _string_list(entry: Any, key: str, path: Path, index: int) -> tuple[str, ...]:
    values = _field(entry, key, list, path, index)
    if not all(isinstance(value, str) for value in values):
        raise _malformed(path, f"entry {index}: {key!r} must be a list of strings")
    return tuple(values)


def _check_split(split: str, allowed: tuple[str, ...], benchmark: str) -> None:
    if split not in allowed:
        raise UserError(f"unknown {benchmark} split {split!r}; expected one of {', '.join(allowed)}")


def load_fashioniq(root: str | Path, split: str, category: str) -> Benchmark:
    """Read one FashionIQ category; the official protocol evaluates each category against its own gallery."""
    root = Path(root)
    _check_split(split, FASHIONIQ_SPLITS, "FashionIQ")
    if category not in FASHIONIQ_CATEGORIES:
        raise UserError(f"unknown FashionIQ category {category!r}; expected one of {', '.join(FASHIONIQ_CATEGORIES)}")

    split_path = root / "image_splits" / f"split.{category}.{split}.json"
    names = _require_list(_read_json(split_path), split_path)
    if not all(isinstance(name, str) for name in names):
        raise _malformed(split_path, "expected a list of image names (strings)")

    image_dir = root / category
    if not image_dir.is_dir() and (root / "images").is_dir():
        image_dir = root / "images"
    images = {name: image_dir / f"{name}.jpg" for name in names}

    captions_path = root / "captions" / f"cap.{category}.{split}.json"
    entries = _require_list(_read_json(captions_path), captions_path)
    has_targets = split != "test"
    queries = []
    for index, entry in enumerate(entries):
        texts = _string_list(entry, "captions", captions_path, index)
        if len(texts) != 2:
            raise _malformed(captions_path, f"entry {index} has {len(texts)} captions, expected 2")
        queries.append(
            Query(
                query_id=f"{category}:{index}",
                reference=_field(entry, "candidate", str, captions_path, index),
                texts=texts,
                target=_field(entry, "target", str, captions_path, index) if has_targets else None,
                category=category,
            )
        )
    return Benchmark(name="fashioniq", split=split, images=images, queries=queries)


def load_cirr(root: str | Path, split: str) -> Benchmark:
    """Read a CIRR split (``test`` is accepted for ``test1``, as the official code does)."""
    root = Path(root)
    split = "test1" if split == "test" else split
    _check_split(split, CIRR_SPLITS, "CIRR")

    split_path = root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
    name_to_relpath = _read_json(split_path)
    if not isinstance(name_to_relpath, dict) or not all(isinstance(p, str) for p in name_to_relpath.values()):
        raise _malformed(split_path, "expected an object mapping image names to relative paths")
    images = {name: root / relpath for name, relpath in name_to_relpath.items()}

    captions_path = root / "cirr" / "captions" / f"cap.rc2.{split}.json"
    entries = _require_list(_read_json(captions_path), captions_path)
    has_targets = split != "test1"
    queries = []
    for index, entry in enumerate(entries):
        image_set = _field(entry, "img_set", dict, captions_path, index)
        queries.append(
            Query(
                query_id=str(_field(entry, "pairid", int, captions_path, index)),
                reference=_field(entry, "reference", str, captions_path, index),
                texts=(_field(entry, "caption", str, captions_path, index),),
                target=_field(entry, "target_hard", str, captions_path, index) if has_targets else None,
                group=_string_list(image_set, "members", captions_path, index),
            )
        )
    return Benchmark(name="cirr", split=split, images=images, queries=queries)


def load_circo(root: str | Path, split: str) -> Benchmark:
    """Read a CIRCO split; the gallery is the whole COCO 2017 unlabeled set listed in its image-info file."""
    root = Path(root)
    _check_split(split, CIRCO_SPLITS, "CIRCO")

    coco_dir = root / "COCO2017_unlabeled"
    info_path = coco_dir / "annotations" / "image_info_unlabeled2017.json"
    info = _read_json(info_path)
    if not isinstance(info, dict) or not isinstance(info.get("images"), list):
        raise _malformed(info_path, "expected an object with an 'images' list")
    image_dir = coco_dir / "unlabeled2017"
    images = {}
    for index, image_info in enumerate(info["images"]):
        image_id = _field(image_info, "id", int, info_path, index)
        images[str(image_id)] = image_dir / _field(image_info, "file_name", str, info_path, index)

    annotations_path = root / "annotations" / f"{split}.json"
    entries = _require_list(_read_json(annotations_path), annotations_path)
    has_targets = split == "val"
    queries = []
    for index, entry in enumerate(entries):
        target = ground_truths = None
        if has_targets:
            target = str(_field(entry, "target_img_id", int, annotations_path, index))
            gt_ids = _field(entry, "gt_img_ids", list, annotations_path, index)
            if not all(isinstance(gt, int) and not isinstance(gt, bool) for gt in gt_ids):
                raise _malformed(annotations_path, f"entry {index}: 'gt_img_ids' must be a list of integers")
            ground_truths = tuple(str(gt) for gt in gt_ids)
        queries.append(
            Query(
                query_id=str(_field(entry, "id", int, annotations_path, index)),
                reference=str(_field(entry, "reference_img_id", int, annotations_path, index)),
                texts=(_field(entry, "relative_caption", str, annotations_path, index),),
                target=target,
                ground_truths=ground_truths or (),
            )
        )
    return Benchmark(name="circo", split=split, images=images, queries=queries)


def load_clothing_cir(root: str | Path, split: str = "test") -> Benchmark:
    """Read the clothing-cir benchmark file written by `fti4cir demo-benchmark`."""
    root = Path(root)
    _check_split(split, CLOTHING_CIR_SPLITS, "clothing-cir")
    path = root / CLOTHING_CIR_FILE
    data = _read_json(path)
    if not isinstance(data, dict):
        raise _malformed(path, "expected an object")
    if data.get("split", split) != split:
        raise _malformed(path, f"it holds the {data.get('split')!r} split, not {split!r}")
    image_dir = root / _field(data, "images", str, path, 0)
    gallery = _string_list(data, "gallery", path, 0)
    if len(set(gallery)) != len(gallery):
        raise _malformed(path, "the gallery lists an image twice")
    images = {name: image_dir / name for name in gallery}
    queries = []
    for index, entry in enumerate(_require_list(data.get("queries"), path)):
        truths = _string_list(entry, "ground_truths", path, index)
        reference = _field(entry, "reference", str, path, index)
        if not truths:
            raise _malformed(path, f"entry {index} has no ground truths")
        if reference in truths:
            raise _malformed(path, f"entry {index} lists its reference among its ground truths")
        queries.append(
            Query(
                query_id=_field(entry, "id", str, path, index),
                reference=reference,
                texts=(_field(entry, "text", str, path, index),),
                target=truths[0],
                ground_truths=truths,
                kind=_field(entry, "type", str, path, index),
            )
        )
    return Benchmark(name="clothing-cir", split=split, images=images, queries=queries)


def load_benchmark(name: str, root: str | Path, split: str, category: str | None = None) -> Benchmark:
    """Dispatch to the reader of ``name`` (fashioniq needs ``category``)."""
    key = name.lower()
    if key == "fashioniq":
        if category is None:
            raise UserError(f"FashionIQ needs a category: one of {', '.join(FASHIONIQ_CATEGORIES)}")
        return load_fashioniq(root, split, category)
    if category is not None:
        raise UserError(f"{name} has no categories (got category {category!r})")
    if key == "cirr":
        return load_cirr(root, split)
    if key == "circo":
        return load_circo(root, split)
    if key == "clothing-cir":
        return load_clothing_cir(root, split)
    raise UserError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARK_NAMES)}")


def check_images_exist(benchmark: Benchmark, needed: Iterable[str] | None = None) -> None:
    """Raise one UserError if any needed image file is absent.

    ``needed`` defaults to the whole gallery plus every query's reference. A needed name that the gallery index
    does not list counts as missing too. Each folder is listed once instead of stat-ing every file.
    """
    if needed is None:
        needed = [*benchmark.images, *(query.reference for query in benchmark.queries)]
    needed = list(dict.fromkeys(needed))

    unlisted = [name for name in needed if name not in benchmark.images]
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for name in needed:
        if name in benchmark.images:
            path = benchmark.images[name]
            by_folder[path.parent].append(path)
    absent_files = []
    for folder, paths in by_folder.items():
        try:
            present = {entry.name for entry in os.scandir(folder) if entry.is_file()}
        except OSError:  # absent or unreadable folder: all of its files are missing
            present = set()
        absent_files.extend(path for path in paths if path.name not in present)

    missing = [f"{name} (not in the gallery index)" for name in unlisted] + [str(path) for path in absent_files]
    if missing:
        examples = ", ".join(missing[:_MISSING_EXAMPLES])
        more = f" and {len(missing) - _MISSING_EXAMPLES} more" if len(missing) > _MISSING_EXAMPLES else ""
        raise UserError(
            f"{len(missing)} of {len(needed)} images missing for {benchmark.name} {benchmark.split}: {examples}{more}"
        )
