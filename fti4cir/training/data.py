"""Training data: subject/attribute pairs (JSONL) + an image folder -> cached visual-feature rows + texts.

A pairs file has one JSON object per line with at least `image` (path relative to the image folder), `subject` and
`attribute`; `sha1` (the image file's content hash, written by `fti4cir caption` / `split-captions`) is optional.
With the hash, a pair whose features are already cached needs no file access at all; a file whose content no longer
matches its pair's hash is left out (its caption describes another picture). The visual tower runs only for images
not yet in the feature cache, once each (`fti4cir.features`); training itself never runs it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..backbone import VisualFeatures
from ..errors import UserError
from ..features import FeatureStore, extract_features
from .losses import caption_features

REQUIRED_FIELDS = ("image", "subject", "attribute")


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """The pair records of a JSONL file; a malformed line raises a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Pairs file {path} does not exist (make it with `fti4cir split-captions`)")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number} is not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in REQUIRED_FIELDS):
                raise UserError(f"{path} line {number} needs string fields {', '.join(REQUIRED_FIELDS)}")
            records.append(record)
    if not records:
        raise UserError(f"{path} holds no pairs")
    return records


@dataclass
class TrainingBatch:
    visual: VisualFeatures  # cached global features and patch tokens (float32)
    subjects: list[str]
    attributes: list[str]
    targets: torch.Tensor | None  # frozen caption features [B, E], when precomputed

    def _map(self, fn) -> TrainingBatch:
        apply = lambda t: None if t is None else fn(t)  # noqa: E731
        return TrainingBatch(
            VisualFeatures(apply(self.visual.global_features), apply(self.visual.patch_tokens)),
            self.subjects,
            self.attributes,
            apply(self.targets),
        )

    def to(self, device, non_blocking: bool = False) -> TrainingBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TrainingBatch:  # called by DataLoader(pin_memory=True)
        return self._map(torch.Tensor.pin_memory)


@dataclass
class TrainingData:
    """The usable pairs: feature-store row, subject and attribute of each."""

    store: FeatureStore
    rows: np.ndarray  # [N] row of each pair's image in `store`
    subjects: list[str]
    attributes: list[str]
    images: list[str]  # the pairs' `image` fields
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> pairs left out
    failures: list[tuple[Path, str]] = field(default_factory=list)  # unreadable images
    targets: torch.Tensor | None = None  # [N, E] frozen caption features, see `compute_targets`

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions) -> TrainingBatch:
        positions = np.asarray(positions, dtype=np.int64)
        targets = None if self.targets is None else self.targets[torch.from_numpy(positions)]
        return TrainingBatch(
            self.store.get(self.rows[positions]),
            [self.subjects[i] for i in positions],
            [self.attributes[i] for i in positions],
            targets,
        )

    def compute_targets(self, backbone, batch_size: int = 256, progress: bool = True) -> None:
        """Encode every pair's "a photo of {subject} with {attribute}" once (the text tower is frozen)."""
        chunks = []
        for start in tqdm(range(0, len(self), batch_size), desc="caption features", unit="batch", disable=not progress):
            end = start + batch_size
            chunks.append(
                caption_features(backbone, self.subjects[start:end], self.attributes[start:end]).float().cpu()
            )
        self.targets = torch.cat(chunks)


def prepare_training_data(
    model,
    images_dir: str | os.PathLike | None,
    pairs_path: str | os.PathLike,
    store: FeatureStore,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
) -> TrainingData:
    """Resolve every pair to a feature row, extracting (one visual pass each) the features not cached yet.
    images_dir may be None when every pair has a sha1 whose features are cached."""
    records = read_pairs(pairs_path)
    known = [r.get("sha1") if isinstance(r.get("sha1"), str) else None for r in records]
    rows = store.lookup(known)
    todo = [i for i, row in enumerate(rows) if row < 0]
    dropped = {"missing_file": 0, "unreadable": 0, "changed_since_captioning": 0}
    failures = []
    if todo:
        if images_dir is None:
            raise UserError(f"{len(todo)} pairs have no cached features; give the image folder (--images)")
        images_dir = Path(images_dir)
        paths = [images_dir / records[i]["image"] for i in todo]
        present = [p.is_file() for p in paths]
        dropped["missing_file"] = present.count(False)
        todo = [i for i, ok in zip(todo, present) if ok]
        result = extract_features(
            model,
            [p for p, ok in zip(paths, present) if ok],
            store,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
        failures = result.failures
        for i, row, digest in zip(todo, result.rows, result.hashes):
            if row < 0:
                dropped["unreadable"] += 1
            elif known[i] is not None and digest != known[i]:
                dropped["changed_since_captioning"] += 1
            else:
                rows[i] = row
    keep = [i for i, row in enumerate(rows) if row >= 0]
    return TrainingData(
        store,
        rows[keep],
        [records[i]["subject"] for i in keep],
        [records[i]["attribute"] for i in keep],
        [records[i]["image"] for i in keep],
        {k: v for k, v in dropped.items() if v},
        failures,
    )


def epoch_batches(num_pairs: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """[steps, batch_size] pair positions of one epoch: a permutation that depends only on (seed, epoch), the last
    incomplete batch dropped (as the official loader does: NT-Xent wants full batches)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_pairs)
    steps = num_pairs // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


class BatchDataset(Dataset):
    """Item i = batch i of a list of position arrays, for a DataLoader with batch_size=None (feature reads from the
    memory-mapped cache happen in its workers)."""

    def __init__(self, data: TrainingData, batches: np.ndarray):
        self.data, self.batches = data, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i) -> TrainingBatch:
        return self.data.batch(self.batches[i])
