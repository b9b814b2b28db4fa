"""Copying the clothing photos into the repository: downscaled, EXIF orientation applied, RGB JPEG.

`copy_photos(source, dest)` reproduces `data/clothing/`: every `<split>/<class>/*.jpg` of `source` (splits train,
validation, test) becomes `dest/<split>/<class>/<same name>.jpg` with its longer side at most `max_side` pixels
(never enlarged) at JPEG quality `quality`; the source's LICENSE is copied beside them. Only the split folders are
read, so nothing else that lives next to them (e.g. an `imagenet-sample` folder) is ever copied.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..atomic import write_bytes_atomic
from ..errors import UserError

SPLITS = ("train", "validation", "test")
MAX_SIDE = 224
QUALITY = 85


@dataclass(frozen=True)
class PhotoFile:
    split: str
    cls: str
    name: str

    @property
    def rel(self) -> str:
        return f"{self.split}/{self.cls}/{self.name}"


def source_photos(source: str | os.PathLike) -> list[PhotoFile]:
    """The `<split>/<class>/*.jpg` photos of a clothing-dataset folder, sorted; a UserError when there are none."""
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"{source} is not a folder (expected <split>/<class>/*.jpg with splits {', '.join(SPLITS)})")
    photos = []
    for split in SPLITS:
        split_dir = source / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            photos += [
                PhotoFile(split, class_dir.name, f.name)
                for f in sorted(class_dir.iterdir())
                if f.is_file() and f.suffix.lower() in (".jpg", ".jpeg") and not f.name.startswith(".")
            ]
    if not photos:
        raise UserError(f"{source} holds no <split>/<class>/*.jpg photos (splits {', '.join(SPLITS)})")
    return photos


def downscale(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """EXIF orientation applied, RGB, longer side at most `max_side` (aspect kept, never enlarged)."""
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    scale = max_side / max(w, h)
    if scale < 1:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    return image


def encode_jpeg(image: Image.Image, quality: int = QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def copy_photos(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_side: int = MAX_SIDE,
    quality: int = QUALITY,
    overwrite: bool = False,
    progress: bool = True,
) -> list[PhotoFile]:
    """Copy (downscale + re-encode) every photo of `source` into `dest`; existing outputs are kept unless
    `overwrite` (a rerun after an interruption finishes the rest; every file is written atomically)."""
    from tqdm import tqdm

    source, dest = Path(source), Path(dest)
    photos = source_photos(source)
    for photo in tqdm(photos, desc="demo photos", unit="photo", disable=not progress):
        out = dest / photo.rel
        if out.exists() and not overwrite:
            continue
        try:
            with Image.open(source / photo.rel) as image:
                data = encode_jpeg(downscale(image, max_side), quality)
        except (OSError, Image.DecompressionBombError) as e:
            raise UserError(f"Cannot read {source / photo.rel}: {e}") from e
        write_bytes_atomic(out, data)
    license_file = source / "LICENSE"
    if license_file.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(license_file, dest / "LICENSE")
    return photos


def counts(photos: list[PhotoFile]) -> dict[str, dict[str, int]]:
    """{split: {class: number of photos}} in split order, classes sorted."""
    table: dict[str, dict[str, int]] = {}
    for photo in photos:
        table.setdefault(photo.split, {}).setdefault(photo.cls, 0)
        table[photo.split][photo.cls] += 1
    return {s: dict(sorted(table[s].items())) for s in SPLITS if s in table}
