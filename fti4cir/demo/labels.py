"""`labels.json` of the demo photos: class (folder), class word, colour word measured from the pixels.

    {"generator": {...}, "classes": {folder: word}, "colours": [...],
     "photos": [{"path": "train/dress/abc.jpg", "split": "train", "class": "dress", "word": "dress",
                 "colour": "red", "confidence": 0.83, "garment_fraction": 0.41}, ...]}

Paths are relative to the photo folder (`data/clothing`). A photo whose colour label is not reliable (see
`ColourLabel.reliable`) carries `"colour": null`; its measured guess stays in `"colour_guess"`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from ..atomic import write_json_atomic
from ..errors import UserError
from .colours import garment_colour
from .photos import SPLITS, source_photos
from .world import CLASS_WORDS, COLOURS, class_word

LABELLER = "fti4cir.demo.colours.garment_colour"
LABELS_VERSION = 4


def label_photos(root: str | os.PathLike, *, progress: bool = True) -> dict:
    """Label every `<split>/<class>/*.jpg` photo under `root` (classes must be known to CLASS_WORDS)."""
    from tqdm import tqdm

    root = Path(root)
    photos = source_photos(root)
    unknown = sorted({p.cls for p in photos} - set(CLASS_WORDS))
    if unknown:
        raise UserError(f"{root}: class folders without a word in fti4cir.demo.world.CLASS_WORDS: {unknown}")
    records = []
    for photo in tqdm(photos, desc="colour labels", unit="photo", disable=not progress):
        try:
            with Image.open(root / photo.rel) as image:
                label = garment_colour(image)
        except OSError as e:
            raise UserError(f"Cannot read {root / photo.rel}: {e}") from e
        records.append(
            {
                "path": photo.rel,
                "split": photo.split,
                "class": photo.cls,
                "word": class_word(photo.cls),
                "colour": label.colour if label.reliable else None,
                "colour_guess": label.colour,
                "confidence": round(label.confidence, 4),
                "garment_fraction": round(label.garment_fraction, 4),
            }
        )
    return {
        "generator": {"name": LABELLER, "version": LABELS_VERSION},
        "classes": dict(CLASS_WORDS),
        "colours": list(COLOURS),
        "photos": records,
    }


def write_labels(labels: dict, path: str | os.PathLike) -> None:
    write_json_atomic(path, labels, indent=1)


def read_labels(path: str | os.PathLike) -> dict:
    """A labels.json written by `label_photos`; a UserError when it is missing or malformed."""
    path = Path(path)
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"Cannot read labels {path}: {e}") from e
    if not isinstance(labels, dict) or not isinstance(labels.get("photos"), list):
        raise UserError(f"{path} is not a labels file (needs a 'photos' list)")
    for i, photo in enumerate(labels["photos"]):
        if not isinstance(photo, dict) or not {"path", "split", "class", "word", "colour"} <= photo.keys():
            raise UserError(f"{path}: photo {i} needs path, split, class, word and colour")
        if photo["split"] not in SPLITS:
            raise UserError(f"{path}: photo {i} has an unknown split {photo['split']!r}")
    return labels


def photos_of(labels: dict, split: str | None = None) -> list[dict]:
    return [p for p in labels["photos"] if split is None or p["split"] == split]
