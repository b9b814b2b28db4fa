"""Building and updating a gallery (`fti4cir index`): crash-safe, incremental, locally or on Ray.

A build computes into the staging folder (each shard written atomically; the in-flight shard's visual features live in
a crash-safe `FeatureStore`), writes a new version folder, fsyncs it, and only then replaces CURRENT atomically. A
reader follows CURRENT, so it sees the old or the new gallery, never a mix; a kill at any point loses at most the batch
in flight and the next run resumes. Incremental: images are keyed by content hash, so unchanged (or renamed) images are
copied from the published version, new ones computed, deleted ones dropped. The format: `fti4cir.gallery.store`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import write_json_atomic, write_text_atomic
from ..digests import file_digest
from ..errors import UserError
from .identity import check_compatible, gallery_identity, identity_key
from .shards import explain_meta, row_shapes, shard_arrays, staged_hashes, write_shard
from .source import Source, SourceImage, folder_source
from .store import (
    ARRAYS,
    CURRENT,
    FORMAT_VERSION,
    INDEX_FILE,
    VERSION_NAME,
    Gallery,
    published_version,
    validate_name,
)

if TYPE_CHECKING:
    from ..spec import ModelSpec

# torch, the model modules and tqdm are imported where used

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "exact", "approx")  # approx: fti4cir.search's approximate kind (IVF) whatever the size
SHOWN_FAILURES = 5  # unreadable files named in messages


@dataclass
class BuildReport:
    name: str
    directory: Path
    version: str
    images: int  # rows of the published gallery
    computed: int  # images that went through the model in this run
    reused: int  # rows copied from the previous version
    removed: int  # rows of the previous version that are gone
    failures: list[tuple[str, str]] = field(default_factory=list)  # (relative path, message)
    up_to_date: bool = False

    def summary(self) -> str:
        if self.up_to_date:
            text = f"gallery '{self.name}' is up to date: {self.images} images"
        else:
            text = (
                f"gallery '{self.name}' {self.version}: {self.images} images ({self.computed} computed, "
                f"{self.reused} unchanged, {self.removed} removed)"
            )
        if self.failures:
            shown = ", ".join(p for p, _ in self.failures[:SHOWN_FAILURES])
            more = f" and {len(self.failures) - SHOWN_FAILURES} more" if len(self.failures) > SHOWN_FAILURES else ""
            text += f"; {len(self.failures)} unreadable image(s) skipped: {shown}{more}"
        return text + f" -> {self.directory}"


@contextlib.contextmanager
def _build_lock(gallery_dir: Path):
    gallery_dir.mkdir(parents=True, exist_ok=True)
    with open(gallery_dir / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"Gallery {gallery_dir} is being built by another process; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _hash_all(paths: list[Path], progress: bool) -> list[str | None]:
    from ..features import hash_files

    hashes: list[str | None] = []
    from tqdm.auto import tqdm

    with tqdm(total=len(paths), desc="hashing", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), 1024):
            hashes += hash_files(paths[start : start + 1024])
            bar.update(len(paths[start : start + 1024]))
    return hashes


def _compute_local(
    model,
    todo: list[tuple[Path, str]],
    staging: Path,
    *,
    batch_size: int,
    num_workers: int | None,
    shard_size: int,
    bar,
) -> list[tuple[Path, str]]:
    """Compute the missing images shard by shard; returns failures. A kill keeps finished shards and the in-flight
    shard's visual features (crash-safe FeatureStore), so a rerun redoes at most one batch."""
    from ..features import FeatureStore, extract_features

    partial = staging / "partial-features"
    failures = []
    for start in range(0, len(todo), shard_size):
        chunk = todo[start : start + shard_size]
        store = FeatureStore.for_model(partial, model, with_patches=True)
        result = extract_features(
            model, [p for p, _ in chunk], store, batch_size=batch_size, num_workers=num_workers, progress=False
        )
        failures += [(p, msg) for p, msg in result.failures]
        ok = result.rows >= 0
        if ok.any():
            hashes = [h for h, good in zip(result.hashes, ok) if good]
            write_shard(staging, hashes, shard_arrays(model, store.get(result.rows[ok]), batch_size))
        shutil.rmtree(partial)  # the shard holds everything now; bounds the disk used by patch tokens
        bar.update(len(chunk))
    return failures


def build_gallery(
    model,
    source: str | os.PathLike | Source,
    name: str,
    *,
    galleries_dir: str | os.PathLike = "galleries",
    index: str = "auto",
    batch_size: int = 32,
    num_workers: int | None = None,
    shard_size: int = 256,
    weights: str | None = None,
    ray=None,
    progress: bool = True,
    spec: ModelSpec | None = None,
) -> BuildReport:
    """Build or update `galleries_dir/name` from `source` (see module doc). Safe to kill at any point and rerun.

    source: an image folder, or a `Source` (e.g. a benchmark split's images: `named_source`).
    weights: provenance label for identity.json (see `weights_label`).
    ray: a `fti4cir.gallery.ray.RayCompute` to compute the missing images on a Ray cluster instead of locally.
    spec: the `ModelSpec` `model` was built from, recorded in the manifest ("model", without the device) so that the
    gallery knows its model (`fti4cir.gallery.gallery_model_spec`).
    """
    validate_name(name)
    if index not in INDEX_KINDS:
        raise UserError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
    if shard_size < 1 or batch_size < 1:
        raise UserError("--shard-size and --batch-size must be positive")
    src = source if isinstance(source, Source) else _folder(source)
    gallery_dir = Path(galleries_dir) / name
    identity = gallery_identity(model, weights)
    key = identity_key(identity)

    with _build_lock(gallery_dir):
        staging = gallery_dir / f".staging-{key}"
        for old in gallery_dir.glob(".staging-*"):  # work of a build with another model
            if old != staging:
                shutil.rmtree(old, ignore_errors=True)
        staging.mkdir(exist_ok=True)
        # version folders a killed build left: half-written ones, or the replaced one when it died after the switch;
        # the published version stays until the next switch, whether or not this build can reuse its rows
        _clear_unpublished(gallery_dir, keep=published_version(gallery_dir))

        hashes = _hash_all([im.path for im in src.images], progress)
        failures = [(im.rel, f"{im.rel}: cannot read the file") for im, h in zip(src.images, hashes) if h is None]
        entries = [(im, h) for im, h in zip(src.images, hashes) if h is not None]
        previous = _previous_version(gallery_dir, identity)
        reusable = previous.row_by_hash() if previous is not None else {}
        staged = staged_hashes(staging)
        todo, seen = [], set()
        for im, h in entries:
            if h not in reusable and h not in staged and h not in seen:
                todo.append((im.path, h))
                seen.add(h)

        if todo:
            from tqdm.auto import tqdm

            with tqdm(total=len(todo), desc=f"indexing {name}", unit="img", disable=not progress) as bar:
                if ray is not None:
                    new_failures = ray.compute(identity, todo, staging, shard_size=shard_size, bar=bar)
                else:
                    new_failures = _compute_local(
                        model,
                        todo,
                        staging,
                        batch_size=batch_size,
                        num_workers=num_workers,
                        shard_size=shard_size,
                        bar=bar,
                    )
            failed_paths = {Path(p) for p, _ in new_failures}
            by_path = {im.path: im.rel for im in src.images}
            failures += [(by_path.get(Path(p), str(p)), msg) for p, msg in new_failures]
            entries = [(im, h) for im, h in entries if im.path not in failed_paths]
            staged = staged_hashes(staging)
        changed = [im for im, h in entries if h not in reusable and h not in staged]
        failures += [(im.rel, f"{im.rel}: changed while being indexed; run again to include it") for im in changed]
        entries = [(im, h) for im, h in entries if h in reusable or h in staged]
        if not entries:
            raise UserError(
                f"No readable images in {src.spec}" + (f" ({len(failures)} unreadable)" if failures else "")
            )

        manifest_entries = [_entry(im, h) for im, h in entries]
        old_entries = previous.manifest["entries"] if previous is not None else None
        if (
            previous is not None
            and old_entries == manifest_entries
            and previous.root == src.root
            and previous.manifest["index"]["kind"] == index
        ):
            shutil.rmtree(staging, ignore_errors=True)
            return BuildReport(
                name, gallery_dir, previous.version, len(entries), 0, len(entries), 0, failures, up_to_date=True
            )

        version = _next_version(gallery_dir)
        reused = sum(h in reusable for _, h in entries)
        kept_hashes = {h for _, h in entries}
        removed = sum(e["sha1"] not in kept_hashes for e in old_entries) if old_entries else 0
        _write_version(
            gallery_dir / version,
            model,
            identity,
            src,
            manifest_entries,
            previous,
            reusable,
            staged,
            index,
            failures,
            gallery_dir,
            progress,
            spec,
        )
        manifest_sha = file_digest(gallery_dir / version / "manifest.json")
        write_text_atomic(gallery_dir / CURRENT, f"{version} {manifest_sha}\n")  # the switch
        if previous is not None:
            previous.close()
        _clear_unpublished(gallery_dir, keep=version)
        shutil.rmtree(staging, ignore_errors=True)
        computed = len({h for _, h in entries if h not in reusable})
        return BuildReport(name, gallery_dir, version, len(entries), computed, reused, removed, failures)


def _folder(source: str | os.PathLike) -> Source:
    if str(source).startswith("benchmark:"):
        raise UserError(
            f"Benchmark source {str(source)[:200]!r}: resolve it first (fti4cir index does; in Python give "
            f"build_gallery a fti4cir.gallery.named_source of the split's images)"
        )
    return folder_source(source)


def _entry(im: SourceImage, sha1: str) -> dict:
    entry = {"name": im.name, "sha1": sha1, "size": im.path.stat().st_size}
    if im.rel != im.name:
        entry["path"] = im.rel
    return entry


def _previous_version(gallery_dir: Path, identity: dict) -> Gallery | None:
    """The published version when its rows can be reused: same model and intact; otherwise None (full rebuild)."""
    if not (gallery_dir / CURRENT).exists():
        return None
    try:
        previous = Gallery.load(gallery_dir)
        check_compatible(previous.identity, identity, gallery_dir.name)
    except UserError as e:
        log.warning("note: not reusing the existing gallery (%s); recomputing every image", e)
        return None
    return previous


def _next_version(gallery_dir: Path) -> str:
    numbers = [int(m.group(1)) for d in gallery_dir.iterdir() if (m := VERSION_NAME.fullmatch(d.name))]
    return f"v-{max(numbers, default=0) + 1:06d}"


def _clear_unpublished(gallery_dir: Path, keep: str | None) -> None:
    """Remove version folders other than `keep`: replaced versions and ones a killed build left half-written.
    Readers that still hold files of a removed version keep them open; new readers follow CURRENT."""
    for d in gallery_dir.iterdir():
        if VERSION_NAME.fullmatch(d.name) and d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


def _write_version(
    out: Path,
    model,
    identity: dict,
    src: Source,
    entries: list[dict],
    previous: Gallery | None,
    reusable: dict[str, int],
    staged: dict[str, Path],
    index_kind: str,
    failures,
    gallery_dir: Path,
    progress: bool,
    spec: ModelSpec | None,
) -> None:
    """reusable: the previous version's row of each image hash; staged: the staging shard of each computed hash."""
    out.mkdir()
    n = len(entries)
    shapes = row_shapes(model)
    arrays = {
        k: np.lib.format.open_memmap(out / f"{k}.npy", mode="w+", dtype=ARRAYS[k], shape=(n, *shapes[k]))
        for k in ARRAYS
    }
    rows_of: dict[str, list[int]] = {}
    for row, e in enumerate(entries):
        rows_of.setdefault(e["sha1"], []).append(row)

    if previous is not None:  # unchanged images: copy their rows
        pairs = [(r, reusable[h]) for h, rows in rows_of.items() if h in reusable for r in rows]
        if pairs:
            new_rows, old_rows = map(np.array, zip(*pairs))
            for k in ARRAYS:
                src_array = previous.array(k)
                for s in range(0, len(pairs), 4096):
                    arrays[k][new_rows[s : s + 4096]] = src_array[old_rows[s : s + 4096]]
        remaining = {h for h in rows_of if h not in reusable}
    else:
        remaining = set(rows_of)
    shards = {}
    for h, shard in staged.items():
        if h in remaining:
            shards.setdefault(shard, []).append(h)
    for shard, wanted in shards.items():
        with np.load(shard) as data:
            position = {h: i for i, h in enumerate(data["hashes"].tolist())}
            new_rows = np.array([r for h in wanted for r in rows_of[h]])
            shard_rows = np.array([position[h] for h in wanted for _ in rows_of[h]])
            for k in ARRAYS:
                arrays[k][new_rows] = data[k][shard_rows]
    for a in arrays.values():
        a.flush()
        del a
    arrays.clear()

    from ..search import VectorIndex

    features = np.load(out / "features.npy", mmap_mode="r")
    vector_index = VectorIndex.build(
        features, "approximate" if index_kind == "approx" else index_kind, seed=0, progress=progress and n >= 100_000
    )
    vector_index.save(out / INDEX_FILE)
    del features
    write_json_atomic(out / "identity.json", identity)
    files = {}
    for file in [*(f"{k}.npy" for k in ARRAYS), INDEX_FILE, "identity.json"]:
        _fsync(out / file)
        files[file] = {"sha256": file_digest(out / file), "bytes": (out / file).stat().st_size}
    for k in ARRAYS:
        files[f"{k}.npy"].update(dtype=np.dtype(ARRAYS[k]).name, shape=[n, *shapes[k]])
    manifest = {
        "format": FORMAT_VERSION,
        "name": gallery_dir.name,
        "source": {
            "spec": src.spec,
            "root": str(src.root),
            "root_from_gallery": os.path.relpath(src.root, gallery_dir),
        },
        "count": n,
        "entries": entries,
        "skipped": [{"path": p, "reason": msg} for p, msg in failures],
        "index": {"kind": index_kind, "file": INDEX_FILE, "spec": vector_index.spec.describe()},
        "explain": explain_meta(model),
        "identity": identity,
        "files": files,
    }
    if spec is not None:
        manifest["model"] = {**spec.to_dict(), "device": None}
    write_json_atomic(out / "manifest.json", manifest)
    _fsync(out)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
