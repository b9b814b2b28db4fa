"""M2C training views: the official random resized crops, drawn from seeded generators so that every view is a pure
function of (seed, image, draw) — resumable bit for bit and the same whichever process or worker decodes it.

Three ways to feed a training step (`--augment`):
- online: a fresh crop of every image at every step, through the visual tower (the official behaviour);
- views: K crops per image drawn once, their visual features cached on disk (`fti4cir.features` stores, one per
  view); each step picks one of the K per image. The features of a picked view are exactly those the visual tower
  gives for that crop: only the number of distinct crops per image is finite;
- none: the centre crop of the model's preprocessing, cached (no augmentation).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

from ...backbone import VisualFeatures
from ...errors import UserError
from ...features import FeatureStore, default_num_workers, extract_features, hash_files
from ...inputs import load_image, to_rgb
from ...preprocess import CLIP_MEAN, CLIP_STD
from .options import AUGMENT_MODES  # noqa: F401 - the modes this module implements


@dataclass(frozen=True)
class ViewSpec:
    """torchvision's RandomResizedCrop (bicubic) and an optional horizontal flip, as the official transforms."""

    scale: tuple[float, float]
    flip: bool
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# model/clip.py `_transform`: is_weak (stage I view A, to Phi and VSI) and is_train (stage I view B; stage II
# reference and target images).
VIEW_A = ViewSpec((0.8, 1.0), flip=True)
VIEW_B = ViewSpec((0.9, 1.0), flip=False)


def derived_seed(*parts) -> int:
    """A 63-bit seed from any JSON-able parts (the same on every machine and process)."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def crop_box(width: int, height: int, spec: ViewSpec, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop: torchvision's `RandomResizedCrop.get_params` drawing from
    `generator` (10 tries of a random area and aspect ratio, then the centre crop of the nearest allowed ratio)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(spec.ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(spec.scale[0], spec.scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator).item())
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(spec.ratio):
        w, h = width, int(round(width / min(spec.ratio)))
    elif in_ratio > max(spec.ratio):
        h, w = height, int(round(height * max(spec.ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment(image: PIL.Image.Image, spec: ViewSpec, size: int, seed: int) -> torch.Tensor:
    """One view [3, size, size], normalised as CLIP expects; the same seed gives the same view."""
    generator = torch.Generator().manual_seed(seed)
    image = to_rgb(image)
    top, left, h, w = crop_box(image.width, image.height, spec, generator)
    view = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
    if spec.flip and torch.rand(1, generator=generator).item() < 0.5:
        view = TF.hflip(view)
    return TF.normalize(TF.to_tensor(view), CLIP_MEAN, CLIP_STD)


class ViewJobs(Dataset):
    """Item (key, path index, spec, seed) -> (key, view tensor or None, error or None): decode + crop in DataLoader
    workers."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, job):
        key, index, spec, seed = job
        try:
            return key, augment(load_image(self.paths[index]), spec, self.size, seed), None
        except UserError as e:
            return key, None, str(e)


def collate_views(items):
    """(keys, stacked views or None, [(key, message)] of unreadable images)."""
    ok = [(i, v) for i, v, _ in items if v is not None]
    failed = [(i, message) for i, _, message in items if message is not None]
    return [i for i, _ in ok], (torch.stack([v for _, v in ok]) if ok else None), failed


def view_loader(paths: list[Path], size: int, batches: list[list[tuple]], num_workers: int) -> DataLoader:
    return DataLoader(
        ViewJobs(paths, size),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_views,
        generator=torch.Generator(),
    )  # the global RNG stays untouched


class ViewCache:
    """Cached visual features of K views (or of the centre crop) per image: one feature store per view."""

    def __init__(self, stores: list[FeatureStore], rows: np.ndarray):
        self.stores, self.rows = stores, rows  # rows: [K, images], -1 where unreadable

    @property
    def views(self) -> int:
        return len(self.stores)

    def readable(self) -> np.ndarray:
        return (self.rows >= 0).all(axis=0)

    def get(self, images: np.ndarray, views: np.ndarray) -> VisualFeatures:
        """Features of view views[i] of image images[i] (rows in batch order)."""
        parts, order = [], []
        for view in np.unique(views):
            where = np.flatnonzero(views == view)
            parts.append(self.stores[view].get(self.rows[view, images[where]]))
            order.append(where)
        inverse = torch.from_numpy(np.argsort(np.concatenate(order)))
        patches = None if parts[0].patch_tokens is None else torch.cat([p.patch_tokens for p in parts])[inverse]
        return VisualFeatures(torch.cat([p.global_features for p in parts])[inverse], patches)


def cached_views(
    model,
    paths: list[Path],
    cache_dir,
    spec: ViewSpec | None,
    views: int,
    seed: int,
    *,
    with_patches: bool,
    num_workers: int | None = None,
    progress: bool = True,
) -> ViewCache:
    """The features of `views` crops (spec) of every image, computed once into the feature cache (view j of an
    image: seeded by (seed, its content hash, j), so it does not depend on its path or position); spec None: the
    centre crop of the model's own preprocessing (one view)."""
    if spec is None:
        store = FeatureStore.for_model(cache_dir, model, with_patches=with_patches)
        result = extract_features(model, paths, store, num_workers=num_workers, progress=progress)
        return ViewCache([store], result.rows[None].astype(np.int64))
    hashes = hash_files(paths)
    stores, rows = [], []
    for view in range(views):
        store = FeatureStore.for_model(
            cache_dir,
            model,
            with_patches=with_patches,
            extra_identity={"m2c_view": {**spec.to_dict(), "seed": seed, "view": view}},
        )
        found = store.lookup(hashes)
        todo = sorted({h: i for i, (h, r) in enumerate(zip(hashes, found)) if h is not None and r < 0}.values())
        if todo:
            jobs = [(i, i, spec, derived_seed(seed, hashes[i], view)) for i in todo]
            batches = [jobs[k : k + 32] for k in range(0, len(jobs), 32)]
            workers = num_workers if num_workers is not None else default_num_workers(len(jobs), 32)
            with torch.no_grad():
                for index, images, _ in tqdm(
                    view_loader(paths, model.backbone.image_size, batches, workers),
                    desc=f"view {view + 1}/{views} features",
                    disable=not progress,
                    leave=False,
                ):
                    if images is not None:
                        features = model.backbone.encode_visual(images.to(model.device))
                        if not with_patches:
                            features = VisualFeatures(features.global_features, None)
                        store.add([hashes[i] for i in index], features)
            found = store.lookup(hashes)
        stores.append(store)
        rows.append(found)
    return ViewCache(stores, np.stack(rows).astype(np.int64))
