"""Finding the images of a training folder: any layout (flat like the ImageNet test set, or nested class folders)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _hidden(name: str) -> bool:
    return name.startswith(".")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root`, recursively, as `root / relative path`, sorted by relative path.

    Extensions are matched case-insensitively (".JPEG" of ImageNet included). Hidden files and everything inside
    hidden folders (".git", ".ipynb_checkpoints", ...) are skipped. Symlinked files are listed; symlinked folders
    are not followed (no cycles).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of images")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        rel_folder = Path(folder).relative_to(root)
        found += [rel_folder / f for f in files if not _hidden(f) and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return [root / rel for rel in sorted(found, key=lambda p: p.as_posix())]
