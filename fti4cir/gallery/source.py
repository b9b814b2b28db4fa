"""What a gallery is built from: an image folder, or a set of named image files under a root (a benchmark split,
resolved by the caller: the gallery library does not read benchmarks, `fti4cir index` does)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class SourceImage:
    name: str  # what results are called: the relative path for folders, the benchmark's image name
    rel: str  # path relative to the source root (posix)
    path: Path  # absolute


@dataclass
class Source:
    spec: str  # how the source was given (recorded in the manifest)
    root: Path  # absolute
    images: list[SourceImage]


def folder_source(folder: str | os.PathLike, spec: str | None = None) -> Source:
    """Every image under `folder` (recursive), named by its path relative to the folder."""
    from ..imagefiles import list_images

    root = Path(folder).resolve()
    if not root.is_dir():
        raise UserError(f"Gallery source {str(spec or folder)!r} is neither an image folder nor a benchmark:... spec")
    images = []
    for p in list_images(root):
        rel = p.relative_to(root).as_posix()
        images.append(SourceImage(rel, rel, p))
    return Source(str(spec or folder), root, images)


def named_source(spec: str, root: str | os.PathLike, images: Mapping[str, str | os.PathLike]) -> Source:
    """Named image files under `root` (e.g. a benchmark split's images: name -> path), in the mapping's order. The
    files must lie inside `root` (symlinks are not resolved: an image folder linked into the root stays inside it)."""
    root = Path(root).resolve()
    return Source(spec, root, [SourceImage(n, _relative(p, root), Path(os.path.abspath(p))) for n, p in images.items()])


def _relative(path: str | os.PathLike, root: Path) -> str:
    rel = Path(os.path.relpath(os.path.abspath(path), root))
    if rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"Benchmark image {path} lies outside the benchmark root {root}")
    return rel.as_posix()
