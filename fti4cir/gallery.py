"""Galleries: a folder of images (or a benchmark split) indexed once, searched by every query.

`fti4cir index SOURCE --name NAME` writes `galleries/NAME/`:

    CURRENT                 "<version> <sha256 of its manifest.json>": the one published version
    v-000007/               a complete, immutable version
        manifest.json       source, entries (name, relative path, sha1, size) in row order, array checksums
        identity.json       model.identity() + weights provenance + parameter digests
        features.npy        [N, E] float32, L2-normalised image features (the retrieval vectors)
        subject.npy         [N, D] float32 subject pseudo token
        attributes.npy      [N, topk, D] float32 attribute pseudo tokens (the first num_kept rows are used)
        num_kept.npy        [N] int16
        relevance.npy       [N, num_k] float32 relevance of the attribute queries (explanations)
        indices.npy         [N, topk] int16 query index of each attribute token (explanations)
        attention.npy       [N, num_k, grid*grid] float16 attention of each query over the patches, averaged over
                            layers and heads (explanations)
        index.faiss         fti4cir.search.VectorIndex over features.npy
    .staging-<key>/         work in progress of a build (shards of finished images, the in-flight feature cache)

Crash safety: a build computes into the staging folder (each shard written atomically; the in-flight shard's visual
features live in a crash-safe `FeatureStore`), writes a new version folder, fsyncs it, and only then replaces CURRENT
atomically. A reader follows CURRENT, so it sees the old or the new gallery, never a mix; a kill at any point loses at
most the batch in flight and the next run resumes. Incremental: images are keyed by content hash, so unchanged (or
renamed) images are copied from the published version, new ones computed, deleted ones dropped.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_path, write_json_atomic, write_text_atomic
from .errors import UserError
from .hub import file_digest, parameter_digest
from .inputs import quote

# torch, the model modules and tqdm are imported where used: `fti4cir index --help` stays fast

FORMAT_VERSION = 1
CURRENT = "CURRENT"
INDEX_FILE = "index.faiss"
INDEX_KINDS = ("auto", "exact", "approx")  # approx: fti4cir.search's approximate kind (IVF) whatever the size
SHOWN_FAILURES = 5  # unreadable files named in messages
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_VERSION = re.compile(r"v-(\d{6,})")
# per-row arrays: name -> dtype (shapes come from the model, see `_row_shapes`)
ARRAYS = {"features": np.float32, "subject": np.float32, "attributes": np.float32, "num_kept": np.int16,
          "relevance": np.float32, "indices": np.int16, "attention": np.float16}


# ---- names and sources ------------------------------------------------------------------------------------------
def is_valid_name(name) -> bool:
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and ".." not in name


def validate_name(name: str) -> str:
    """Gallery names are exposed by the app: letters, digits, '.', '_', '-'; no separators, no '..', no leading dot."""
    if not is_valid_name(name):
        raise UserError(f"Invalid gallery name {quote(name)}: use 1-100 letters, digits, '.', '_' or '-' (not starting "
                        f"with '.', no '..', no path separators)")
    return name


def list_galleries(galleries_dir: str | os.PathLike = "galleries") -> list[str]:
    """Names of the published galleries under `galleries_dir` (the only names an app should offer)."""
    root = Path(galleries_dir)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if is_valid_name(d.name) and (d / CURRENT).is_file())


@dataclass(frozen=True)
class SourceImage:
    name: str  # what results are called: the relative path for folders, the benchmark's image name
    rel: str  # path relative to the source root (posix)
    path: Path  # absolute


@dataclass
class Source:
    spec: str
    root: Path  # absolute
    images: list[SourceImage]


def resolve_source(spec: str) -> Source:
    """An image folder (recursive), or `benchmark:<fashioniq|cirr|circo>:<split>[:category]:<root>`."""
    from .imagefiles import list_images

    if spec.startswith("benchmark:"):
        from .evaluation.datasets import load_benchmark

        parts = spec.split(":", 3)
        if len(parts) == 4 and parts[1].lower() == "fashioniq":
            parts = spec.split(":", 4)
        if len(parts) not in (4, 5) or not parts[-1]:
            raise UserError(f"Benchmark source {spec!r} must look like benchmark:<fashioniq|cirr|circo>:<split>"
                            f"[:category]:<root>, e.g. benchmark:fashioniq:val:dress:data/FashionIQ")
        name, split, category, root = parts[1], parts[2], (parts[3] if len(parts) == 5 else None), parts[-1]
        root = Path(root).resolve()
        bench = load_benchmark(name, root, split, category)
        images = [SourceImage(n, _relative(p, root), Path(os.path.abspath(p))) for n, p in bench.images.items()]
        return Source(spec, root, images)
    root = Path(spec).resolve()
    if not root.is_dir():
        raise UserError(f"Gallery source {spec!r} is neither an image folder nor a benchmark:... spec")
    images = []
    for p in list_images(root):
        rel = p.relative_to(root).as_posix()
        images.append(SourceImage(rel, rel, p))
    return Source(spec, root, images)


def _relative(path: Path, root: Path) -> str:
    """Without resolving symlinks: an image folder linked into a benchmark root stays inside it."""
    rel = Path(os.path.relpath(os.path.abspath(path), root))
    if rel.is_absolute() or ".." in rel.parts:
        raise UserError(f"Benchmark image {path} lies outside the benchmark root {root}")
    return rel.as_posix()


# ---- identity ---------------------------------------------------------------------------------------------------
def gallery_identity(model, weights: str | None = None) -> dict:
    """What a gallery's vectors and tokens depend on. `weights` is provenance for people (a file's sha256, a hub id,
    "random-init:<seed>"); compatibility is decided by the parameter digests, however the weights were loaded."""
    # a random backbone's identity carries a digest of its values (Backbone.identity)
    return {**model.identity(), "weights": weights or "unknown", "inversion_digest": parameter_digest(model.inversion)}


def weights_label(weights: str | os.PathLike | None, seed: int = 0) -> str:
    """Provenance of the inversion weights for identity.json: a file's sha256, a hub id or the random-init seed."""
    if weights is None:
        return f"random-init:{seed}"
    if Path(weights).is_file():
        return f"sha256:{file_digest(weights)}"
    return str(weights)


_COMPARED = ("backbone", "pretrained", "embed_dim", "preprocess", "inversion_digest", "backbone_digest")


def _describe(identity: dict) -> str:
    text = f"backbone {identity.get('backbone')}/{identity.get('pretrained')}, preprocess {identity.get('preprocess')}"
    text += f", inversion weights {identity.get('weights')} (digest {str(identity.get('inversion_digest'))[:12]})"
    if identity.get("backbone_digest"):
        text += f", random backbone digest {identity['backbone_digest'][:12]}"
    return text


def identity_differences(a: dict, b: dict) -> list[str]:
    """The identity keys in which two models differ (any difference makes their features incomparable)."""
    return [k for k in _COMPARED if a.get(k) != b.get(k)]


def check_compatible(gallery_identity_: dict, model_identity: dict, name: str) -> None:
    differs = identity_differences(gallery_identity_, model_identity)
    if differs:
        raise UserError(f"Gallery '{name}' was built with {_describe(gallery_identity_)}, but the loaded model has "
                        f"{_describe(model_identity)} (differs in: {', '.join(differs)}). Load the matching model or "
                        f"rebuild the gallery with this one (fti4cir index ... --name {name}).")


# ---- per-image data: visual features -> pseudo tokens + explanations ------------------------------------------------
def _row_shapes(model) -> dict[str, tuple[int, ...]]:
    c, (gh, gw) = model.inversion.config, model.backbone.grid_size
    return {"features": (c.embed_dim,), "subject": (c.token_dim,), "attributes": (c.topk, c.token_dim),
            "num_kept": (), "relevance": (c.num_k,), "indices": (c.topk,), "attention": (c.num_k, gh * gw)}


def explain_meta(model) -> dict:
    c = model.inversion.config
    return {"num_k": c.num_k, "topk": c.topk, "epsilon": c.epsilon, "grid": list(model.backbone.grid_size)}


def shard_arrays(model, visual: VisualFeatures, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Pseudo tokens and explanation data of images from their visual features, in the gallery's row format."""
    import torch
    import torch.nn.functional as F

    from .backbone import VisualFeatures
    from .explain import patch_attention

    parts: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
    with torch.inference_mode():
        for start in range(0, visual.global_features.shape[0], batch_size):
            chunk = VisualFeatures(visual.global_features[start:start + batch_size].to(model.device),
                                   visual.patch_tokens[start:start + batch_size].to(model.device))
            tokens = model.invert(chunk, return_attention=True)
            sel = tokens.selection
            rows = {"features": F.normalize(tokens.image_features.float(), dim=-1), "subject": tokens.subject,
                    "attributes": tokens.attributes, "num_kept": tokens.num_kept, "relevance": sel.relevance,
                    "indices": sel.indices, "attention": patch_attention(sel.attention, sel.relevance.shape[1])}
            for k, v in rows.items():
                parts[k].append(v.detach().cpu().numpy().astype(ARRAYS[k]))
    return {k: np.concatenate(v) for k, v in parts.items()}


# ---- staging: shards of computed images ---------------------------------------------------------------------------
def _shard_name(hashes: list[str]) -> str:
    return "shard-" + hashlib.sha1("\n".join(hashes).encode()).hexdigest()[:20] + ".npz"


def write_shard(folder: Path, hashes: list[str], arrays: dict[str, np.ndarray]) -> Path:
    """Atomic and idempotent: the same images always give the same shard file."""
    path = folder / _shard_name(hashes)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, hashes=np.array(hashes), **arrays)
    return path


def _staged_hashes(folder: Path) -> dict[str, Path]:
    """hash -> shard file, over the finished shards (an unreadable shard is dropped: it is recomputed)."""
    done = {}
    for shard in sorted(folder.glob("shard-*.npz")):
        try:
            with np.load(shard) as data:
                hashes = data["hashes"].tolist()
        except Exception:  # noqa: BLE001 - a damaged shard only costs its recomputation
            shard.unlink(missing_ok=True)
            continue
        done.update(dict.fromkeys(hashes, shard))
    return done


# ---- build --------------------------------------------------------------------------------------------------------
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
            text = (f"gallery '{self.name}' {self.version}: {self.images} images ({self.computed} computed, "
                    f"{self.reused} unchanged, {self.removed} removed)")
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
            raise UserError(f"Gallery {gallery_dir} is being built by another process; wait for it to finish") \
                from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _hash_all(paths: list[Path], progress: bool) -> list[str | None]:
    from .features import hash_files

    hashes: list[str | None] = []
    from tqdm.auto import tqdm

    with tqdm(total=len(paths), desc="hashing", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), 1024):
            hashes += hash_files(paths[start:start + 1024])
            bar.update(len(paths[start:start + 1024]))
    return hashes


def _compute_local(model, todo: list[tuple[Path, str]], staging: Path, *, batch_size: int, num_workers: int | None,
                   shard_size: int, bar) -> list[tuple[Path, str]]:
    """Compute the missing images shard by shard; returns failures. A kill keeps finished shards and the in-flight
    shard's visual features (crash-safe FeatureStore), so a rerun redoes at most one batch."""
    from .features import FeatureStore, extract_features

    partial = staging / "partial-features"
    failures = []
    for start in range(0, len(todo), shard_size):
        chunk = todo[start:start + shard_size]
        store = FeatureStore.for_model(partial, model, with_patches=True)
        result = extract_features(model, [p for p, _ in chunk], store, batch_size=batch_size,
                                  num_workers=num_workers, progress=False)
        failures += [(p, msg) for p, msg in result.failures]
        ok = result.rows >= 0
        if ok.any():
            hashes = [h for h, good in zip(result.hashes, ok) if good]
            write_shard(staging, hashes, shard_arrays(model, store.get(result.rows[ok]), batch_size))
        shutil.rmtree(partial)  # the shard holds everything now; bounds the disk used by patch tokens
        bar.update(len(chunk))
    return failures


def build_gallery(model, source: str | Source, name: str, *, galleries_dir: str | os.PathLike = "galleries",
                  index: str = "auto", batch_size: int = 32, num_workers: int | None = None, shard_size: int = 256,
                  weights: str | None = None, ray=None, progress: bool = True) -> BuildReport:
    """Build or update `galleries_dir/name` from `source` (see module doc). Safe to kill at any point and rerun.

    weights: provenance label for identity.json (see `weights_label`).
    ray: a `fti4cir.gallery_ray.RayCompute` to compute the missing images on a Ray cluster instead of locally.
    """
    validate_name(name)
    if index not in INDEX_KINDS:
        raise UserError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
    if shard_size < 1 or batch_size < 1:
        raise UserError("--shard-size and --batch-size must be positive")
    src = source if isinstance(source, Source) else resolve_source(source)
    gallery_dir = Path(galleries_dir) / name
    identity = gallery_identity(model, weights)
    key = hashlib.sha1(json.dumps({k: identity.get(k) for k in _COMPARED}, sort_keys=True).encode()).hexdigest()[:12]

    with _build_lock(gallery_dir):
        staging = gallery_dir / f".staging-{key}"
        for old in gallery_dir.glob(".staging-*"):  # work of a build with another model
            if old != staging:
                shutil.rmtree(old, ignore_errors=True)
        staging.mkdir(exist_ok=True)

        hashes = _hash_all([im.path for im in src.images], progress)
        failures = [(im.rel, f"{im.rel}: cannot read the file") for im, h in zip(src.images, hashes) if h is None]
        entries = [(im, h) for im, h in zip(src.images, hashes) if h is not None]
        previous = _previous_version(gallery_dir, identity, progress)
        reusable = previous.row_by_hash() if previous is not None else {}
        staged = _staged_hashes(staging)
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
                    new_failures = _compute_local(model, todo, staging, batch_size=batch_size,
                                                  num_workers=num_workers, shard_size=shard_size, bar=bar)
            failed_paths = {Path(p) for p, _ in new_failures}
            by_path = {im.path: im.rel for im in src.images}
            failures += [(by_path.get(Path(p), str(p)), msg) for p, msg in new_failures]
            entries = [(im, h) for im, h in entries if im.path not in failed_paths]
            staged = _staged_hashes(staging)
        changed = [im for im, h in entries if h not in reusable and h not in staged]
        failures += [(im.rel, f"{im.rel}: changed while being indexed; run again to include it") for im in changed]
        entries = [(im, h) for im, h in entries if h in reusable or h in staged]
        if not entries:
            raise UserError(f"No readable images in {src.spec}" + (f" ({len(failures)} unreadable)" if failures
                                                                     else ""))

        manifest_entries = [_entry(im, h) for im, h in entries]
        old_entries = previous.manifest["entries"] if previous is not None else None
        if (previous is not None and old_entries == manifest_entries and previous.root == src.root
                and previous.manifest["index"]["kind"] == index):
            shutil.rmtree(staging, ignore_errors=True)
            return BuildReport(name, gallery_dir, previous.version, len(entries), 0, len(entries), 0, failures,
                               up_to_date=True)

        version = _next_version(gallery_dir)
        _clear_unpublished(gallery_dir, keep=previous.version if previous is not None else None)
        reused = sum(h in reusable for _, h in entries)
        kept_hashes = {h for _, h in entries}
        removed = sum(e["sha1"] not in kept_hashes for e in old_entries) if old_entries else 0
        _write_version(gallery_dir / version, model, identity, src, manifest_entries, previous, reusable, staged,
                       index, failures, gallery_dir, progress)
        manifest_sha = file_digest(gallery_dir / version / "manifest.json")
        write_text_atomic(gallery_dir / CURRENT, f"{version} {manifest_sha}\n")  # the switch
        if previous is not None:
            previous.close()
        _clear_unpublished(gallery_dir, keep=version)
        shutil.rmtree(staging, ignore_errors=True)
        computed = len({h for _, h in entries if h not in reusable})
        return BuildReport(name, gallery_dir, version, len(entries), computed, reused, removed, failures)


def _entry(im: SourceImage, sha1: str) -> dict:
    entry = {"name": im.name, "sha1": sha1, "size": im.path.stat().st_size}
    if im.rel != im.name:
        entry["path"] = im.rel
    return entry


def _previous_version(gallery_dir: Path, identity: dict, progress: bool) -> "Gallery | None":
    """The published version when its rows can be reused: same model and intact; otherwise None (full rebuild)."""
    if not (gallery_dir / CURRENT).exists():
        return None
    try:
        previous = Gallery.load(gallery_dir)
        check_compatible(previous.identity, identity, gallery_dir.name)
    except UserError as e:
        if progress:
            print(f"note: not reusing the existing gallery ({e}); recomputing every image", file=sys.stderr)
        return None
    return previous


def _next_version(gallery_dir: Path) -> str:
    numbers = [int(m.group(1)) for d in gallery_dir.iterdir() if (m := _VERSION.fullmatch(d.name))]
    return f"v-{max(numbers, default=0) + 1:06d}"


def _clear_unpublished(gallery_dir: Path, keep: str | None) -> None:
    """Remove version folders other than `keep`: replaced versions and ones a killed build left half-written.
    Readers that still hold files of a removed version keep them open; new readers follow CURRENT."""
    for d in gallery_dir.iterdir():
        if _VERSION.fullmatch(d.name) and d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


def _write_version(out: Path, model, identity: dict, src: Source, entries: list[dict], previous: "Gallery | None",
                   reusable: dict[str, int], staged: dict[str, Path], index_kind: str, failures, gallery_dir: Path,
                   progress: bool) -> None:
    """reusable: the previous version's row of each image hash; staged: the staging shard of each computed hash."""
    out.mkdir()
    n = len(entries)
    shapes = _row_shapes(model)
    arrays = {k: np.lib.format.open_memmap(out / f"{k}.npy", mode="w+", dtype=ARRAYS[k], shape=(n, *shapes[k]))
              for k in ARRAYS}
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
                    arrays[k][new_rows[s:s + 4096]] = src_array[old_rows[s:s + 4096]]
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
    for k, a in arrays.items():
        a.flush()
        del a
    arrays.clear()

    from .search import VectorIndex

    features = np.load(out / "features.npy", mmap_mode="r")
    vector_index = VectorIndex.build(features, "approximate" if index_kind == "approx" else index_kind, seed=0,
                                     progress=progress and n >= 100_000)
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
        "source": {"spec": src.spec, "root": str(src.root), "root_from_gallery": os.path.relpath(src.root,
                                                                                                  gallery_dir)},
        "count": n,
        "entries": entries,
        "skipped": [{"path": p, "reason": msg} for p, msg in failures],
        "index": {"kind": index_kind, "file": INDEX_FILE, "spec": vector_index.spec.describe()},
        "explain": explain_meta(model),
        "identity": identity,
        "files": files,
    }
    write_json_atomic(out / "manifest.json", manifest)
    _fsync(out)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- load ---------------------------------------------------------------------------------------------------------
class _Republished(Exception):
    """The version being read was replaced (and removed) meanwhile: read CURRENT again."""


class Gallery:
    """A published gallery version, opened read-only. Arrays are memory-mapped; `features` is in memory."""

    def __init__(self, directory: Path, version: str, manifest: dict, arrays: dict[str, np.ndarray], index):
        self.directory, self.version, self.manifest = directory, version, manifest
        self.name = manifest["name"]
        self.identity: dict = manifest["identity"]
        self._arrays = arrays
        self.index = index
        entries = manifest["entries"]
        self.names: list[str] = [e["name"] for e in entries]
        self.hashes: list[str] = [e["sha1"] for e in entries]
        self.root = self._resolve_root(manifest["source"])
        self.paths: list[Path] = [self.root / e.get("path", e["name"]) for e in entries]
        import torch

        self.features = torch.from_numpy(np.array(arrays["features"], dtype=np.float32))
        self._tokens: PseudoTokens | None = None
        self._row_of_name = {n: i for i, n in enumerate(self.names)}

    # -- opening --
    @classmethod
    def load(cls, path_or_name: str | os.PathLike, model=None, galleries_dir: str | os.PathLike = "galleries", *,
             verify: bool = True) -> "Gallery":
        """Open a gallery by name (under `galleries_dir`) or by its folder. With `model`, refuse a gallery built with
        another backbone, preprocessing or weights. verify: check every file against the manifest's checksums."""
        directory = _gallery_dir(path_or_name, galleries_dir)
        for _ in range(10):  # a build may replace the version while we read it
            version, manifest_sha = _read_current(directory)
            try:
                gallery = cls._open(directory, version, manifest_sha, verify)
                break
            except (_Republished, FileNotFoundError):
                if _read_current(directory) == (version, manifest_sha):
                    raise UserError(f"Gallery {directory} is incomplete: files of {version} are missing; rebuild it "
                                    f"with fti4cir index") from None
        else:
            raise UserError(f"Gallery {directory} keeps changing while being read; try again")
        if model is not None:
            check_compatible(gallery.identity, gallery_identity(model), gallery.name)
        return gallery

    @classmethod
    def _open(cls, directory: Path, version: str, manifest_sha: str, verify: bool) -> "Gallery":
        folder = directory / version
        if not folder.is_dir():
            raise _Republished()
        manifest_path = folder / "manifest.json"
        data = manifest_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest_sha:
            raise UserError(_corrupt(directory, "manifest.json", "its checksum in CURRENT does not match"))
        try:
            manifest = json.loads(data)
        except (ValueError, RecursionError):
            raise UserError(_corrupt(directory, "manifest.json", "it is not a gallery manifest")) from None
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT_VERSION:
            problem = _manifest_problem(manifest)
            if problem:
                raise UserError(_corrupt(directory, "manifest.json", problem))
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise UserError(_corrupt(directory, "manifest.json", "it is not a gallery manifest"))
        if manifest.get("format") != FORMAT_VERSION:
            raise UserError(f"Gallery {directory} has format {manifest.get('format')}; this version of fti4cir "
                            f"reads format {FORMAT_VERSION}: rebuild it with fti4cir index")
        for e in manifest["entries"]:  # rows name files inside the source folder, nothing else
            rel = Path(e.get("path", e["name"]))
            if rel.is_absolute() or ".." in rel.parts:
                raise UserError(_corrupt(directory, "manifest.json", f"row path {str(rel)!r} leaves the source"))
        for file, meta in files.items():
            path = folder / file
            if path.stat().st_size != meta["bytes"]:
                raise UserError(_corrupt(directory, file, f"its size is {path.stat().st_size} bytes, the manifest "
                                                           f"says {meta['bytes']}"))
            if verify and file_digest(path) != meta["sha256"]:
                raise UserError(_corrupt(directory, file, "its sha256 does not match the manifest"))
        arrays = {}
        for k in ARRAYS:
            meta = files[f"{k}.npy"]
            try:
                arrays[k] = np.load(folder / f"{k}.npy", mmap_mode="r")
            except ValueError as e:
                raise UserError(_corrupt(directory, f"{k}.npy", str(e))) from None
            if list(arrays[k].shape) != meta["shape"] or arrays[k].dtype.name != meta["dtype"]:
                raise UserError(_corrupt(directory, f"{k}.npy", f"shape {list(arrays[k].shape)} / "
                                                                f"{arrays[k].dtype.name} differs from the manifest"))
        from .search import VectorIndex

        try:
            index = VectorIndex.load(folder / manifest["index"]["file"])
        except UserError as e:
            if not (folder / manifest["index"]["file"]).exists():
                raise _Republished() from None
            raise UserError(_corrupt(directory, manifest["index"]["file"], str(e))) from None
        if index.ntotal != manifest["count"]:
            raise UserError(_corrupt(directory, manifest["index"]["file"],
                                     f"it holds {index.ntotal} vectors for {manifest['count']} images"))
        return cls(directory, version, manifest, arrays, index)

    def _resolve_root(self, source: dict) -> Path:
        """The source folder: beside the gallery as when built (survives moving both together), else as recorded."""
        beside = (self.directory / source["root_from_gallery"]).resolve()
        return beside if beside.is_dir() else Path(source["root"])

    def close(self) -> None:
        self._arrays.clear()

    # -- data --
    def __len__(self) -> int:
        return len(self.names)

    def array(self, key: str) -> np.ndarray:
        """A per-row array of the version (memory-mapped), see the module doc for keys and shapes."""
        return self._arrays[key]

    def row_by_hash(self) -> dict[str, int]:
        return {h: i for i, h in enumerate(self.hashes)}

    def row(self, name: str) -> int:
        try:
            return self._row_of_name[name]
        except KeyError:
            raise UserError(f"{quote(name, 80)} is not in gallery '{self.name}'") from None

    def tokens_of(self, rows) -> PseudoTokens:
        """Cached pseudo tokens of some rows (a reference picked from the gallery needs no visual pass)."""
        import torch

        from .inversion import PseudoTokens

        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        get = lambda k, dtype=torch.float32: torch.from_numpy(np.array(self._arrays[k][rows])).to(dtype)  # noqa
        return PseudoTokens(get("subject"), get("attributes"), get("num_kept", torch.long), self.features[rows])

    @property
    def tokens(self) -> PseudoTokens:
        if self._tokens is None:
            self._tokens = self.tokens_of(np.arange(len(self)))
        return self._tokens

    def explanations(self, i: int) -> dict:
        """What the app shows for reference row `i`: relevance of every attribute query with the epsilon threshold,
        the kept queries (in token order) and each query's attention map over the patch grid."""
        meta = self.manifest["explain"]
        gh, gw = meta["grid"]
        r = int(self._arrays["num_kept"][i])
        indices = np.array(self._arrays["indices"][i], dtype=np.int64)
        return {"relevance": np.array(self._arrays["relevance"][i], dtype=np.float32),
                "num_kept": r, "kept": indices[:r], "indices": indices,
                "attention": np.array(self._arrays["attention"][i], dtype=np.float32),  # [num_k, gh * gw]
                "epsilon": float(meta["epsilon"]), "grid": (gh, gw)}

    def search(self, query: torch.Tensor, k: int, exclude=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k rows by inner product for L2-normalised queries [B, E], best first.

        exclude: rows never returned (e.g. the reference itself): one list per query, or one flat list of rows for
        every query. Returns (scores [B, k'], indices [B, k']) with k' = min(k, rows); where exclusions leave fewer
        than k' rows, the tail is padded with index -1 and score -inf."""
        import torch

        q = torch.as_tensor(query).detach().float().cpu().reshape(-1, self.features.shape[1]).numpy()
        if exclude is not None and all(isinstance(e, (int, np.integer)) for e in exclude):
            exclude = [list(exclude)] * len(q)
        k = max(1, min(int(k), len(self)))
        scores, ids = self.index.search(q, k, exclude_ids=exclude)
        return torch.from_numpy(scores), torch.from_numpy(ids)


_MANIFEST_FILES = frozenset([*(f"{k}.npy" for k in ARRAYS), INDEX_FILE, "identity.json"])


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with the structure of a (format 1) manifest, or None: every field the loader reads has its
    type, the files are exactly the version's own (plain names: no path is taken from the manifest) and the row
    counts agree. The manifest is checksummed, but a gallery folder may come from anywhere."""
    def plain(value) -> bool:
        return isinstance(value, str) and 0 < len(value) <= 4096 and "\0" not in value

    count = manifest.get("count")
    entries, files, source = manifest.get("entries"), manifest.get("files"), manifest.get("source")
    index, explain = manifest.get("index"), manifest.get("explain")
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
        return "its count is not a number of rows"
    if not plain(manifest.get("name")) or not isinstance(manifest.get("identity"), dict):
        return "its name or identity is missing"
    if not (isinstance(source, dict) and plain(source.get("root")) and plain(source.get("root_from_gallery"))):
        return "its source is not a folder"
    grid = explain.get("grid") if isinstance(explain, dict) else None
    if not (isinstance(index, dict) and index.get("file") == INDEX_FILE and isinstance(grid, list) and len(grid) == 2
            and all(isinstance(g, int) and 0 < g <= 4096 for g in grid)
            and isinstance(explain.get("epsilon"), (int, float)) and math.isfinite(explain["epsilon"])):
        return "its index or explanation settings are malformed"
    if not isinstance(entries, list) or len(entries) != count:
        return f"it lists {len(entries) if isinstance(entries, list) else 'no'} rows for a count of {count}"
    for e in entries:
        if not (isinstance(e, dict) and plain(e.get("name")) and plain(e.get("sha1"))
                and ("path" not in e or plain(e["path"]))):
            return "a row is not a name, path and sha1"
    if not isinstance(files, dict) or set(files) != _MANIFEST_FILES:
        return "its files are not the version's own"
    for file, meta in files.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and plain(meta.get("sha256"))):
            return f"{file} has no size or checksum"
        if file.endswith(".npy") and not (isinstance(meta.get("shape"), list) and meta["shape"][:1] == [count]
                                          and isinstance(meta.get("dtype"), str)):
            return f"{file} has no shape of {count} rows"
    return None


def _corrupt(directory: Path, file: str, why: str) -> str:
    return (f"Gallery {directory} is corrupted: {file} failed verification ({why}). Rebuild it with "
            f"fti4cir index (the rebuild recomputes what it cannot trust)")


def _gallery_dir(path_or_name: str | os.PathLike, galleries_dir: str | os.PathLike) -> Path:
    """A name (validated) under galleries_dir, or a path to a gallery folder (trusted callers: the CLI)."""
    if isinstance(path_or_name, os.PathLike) or (isinstance(path_or_name, str) and not is_valid_name(path_or_name)
                                                 and (Path(path_or_name) / CURRENT).is_file()):
        directory = Path(path_or_name)
    else:
        directory = Path(galleries_dir) / validate_name(path_or_name)
    if not (directory / CURRENT).is_file():
        raise UserError(f"No gallery at {directory} (build one with: fti4cir index SOURCE --name {directory.name})")
    return directory


def _read_current(directory: Path) -> tuple[str, str]:
    try:
        version, manifest_sha = (directory / CURRENT).read_text().split()
    except (OSError, ValueError):
        raise UserError(_corrupt(directory, CURRENT, "it is not '<version> <sha256>'")) from None
    if not _VERSION.fullmatch(version):
        raise UserError(_corrupt(directory, CURRENT, f"{version!r} is not a version name"))
    return version, manifest_sha


# ---- CLI ----------------------------------------------------------------------------------------------------------
MODEL_SPEC_KEYS = ("model", "backbone", "pretrained", "weights", "weights_revision", "device", "preprocess", "seed")
DEFINITION_KEYS = {"source", "backbone", "pretrained", "weights", "m2c_weights", "preprocess", "index", "description"}


def model_from_spec(spec: dict):
    """A CIRModel from the CLI's model flags (a dict of MODEL_SPEC_KEYS), identical in every process that builds it:
    the driver, each Ray worker, the app (create_model seeds random initialisations)."""
    from .cli import model_from_args

    return model_from_args(argparse.Namespace(**{"seed": 0, **spec}))


def read_definition(path: str | os.PathLike) -> dict:
    """A gallery definition `<name>.json`: {"source", "backbone", "pretrained", "weights"[, "preprocess", "index",
    "description"]}. Relative paths in it (source, a benchmark root, weight files) are relative to the file."""
    path = Path(path)
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read gallery definition {path}: {e}") from None
    if not isinstance(definition, dict) or "source" not in definition or set(definition) - DEFINITION_KEYS:
        raise UserError(f"Gallery definition {path} must be a JSON object with 'source' and only the keys "
                        f"{', '.join(sorted(DEFINITION_KEYS))}")
    base = path.resolve().parent
    source = str(definition["source"])
    if source.startswith("benchmark:"):
        head, _, root = source.rpartition(":")
        source = f"{head}:{(base / root).resolve()}"
    else:
        source = str((base / source).resolve())
    definition["source"] = source
    for key in ("pretrained", "weights", "m2c_weights"):
        value = definition.get(key)
        if isinstance(value, str) and (base / value).exists():
            definition[key] = str((base / value).resolve())
    return definition


def add_parser(subparsers) -> None:
    from .cli import add_model_args

    p = subparsers.add_parser("index", help="build or update a gallery: features, pseudo tokens, explanations, index",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="image folder (searched recursively) or "
                   "benchmark:<fashioniq|cirr|circo>:<split>[:category]:<root>")
    p.add_argument("--name", help="gallery name (letters, digits, . _ -); default: the definition's file name")
    p.add_argument("--definition", help="gallery definition galleries/<name>.json (source, backbone, pretrained, "
                   "weights); its values replace the SOURCE and model flags")
    p.add_argument("--galleries-dir", default=None,
                   help="folder of galleries (default: the definition's folder, else 'galleries')")
    add_model_args(p)
    p.add_argument("--index", choices=INDEX_KINDS, default=None,
                   help="search index: exact inner product, approximate, or auto (exact unless large; default)")
    p.add_argument("--batch-size", type=int, default=32, help="images per visual pass (default %(default)s)")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding processes (default: up to 4)")
    p.add_argument("--shard-size", type=int, default=256,
                   help="images per staged shard: the unit of resumed work and of Ray tasks (default %(default)s)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="compute on a Ray cluster: 'auto', ray://host:10001, host:6379; without ADDRESS, RAY_ADDRESS, "
                        "a cluster running here, or a new local instance (give SOURCE before a bare --ray)")
    p.add_argument("--ray-workers", type=int, default=None,
                   help="Ray actors, each holding one model (default: cluster CPUs / --ray-cpus-per-worker)")
    p.add_argument("--ray-cpus-per-worker", type=float, default=1.0, help="CPUs each Ray actor reserves (default %(default)s)")
    p.add_argument("--ray-gpus-per-worker", type=float, default=0.0, help="GPUs each Ray actor reserves, fractions allowed (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_index_command)


def _index_command(args) -> int:
    index = args.index
    galleries_dir = args.galleries_dir
    if args.definition:
        if args.source:
            raise UserError("Give either SOURCE or --definition, not both")
        definition = read_definition(args.definition)
        args.source = definition["source"]
        for key in ("backbone", "pretrained", "weights", "preprocess"):
            if key in definition:
                setattr(args, key, definition[key])
        index = index or definition.get("index")
        args.name = args.name or Path(args.definition).stem
        galleries_dir = galleries_dir or Path(args.definition).parent
    if not args.source or not args.name:
        raise UserError("fti4cir index needs SOURCE and --name, or --definition galleries/<name>.json")
    validate_name(args.name)
    source = resolve_source(args.source)  # before loading a model: a wrong path fails fast
    from .presets import resolve_model

    args.backbone, args.pretrained, args.weights = resolve_model(args.model, args.backbone, args.pretrained,
                                                                 args.weights)  # a preset's weights: a local file
    args.model = None
    spec = {k: getattr(args, k) for k in MODEL_SPEC_KEYS}
    if spec["weights"] is not None and Path(spec["weights"]).exists():
        spec["weights"] = str(Path(spec["weights"]).resolve())  # Ray workers may run elsewhere
    model = model_from_spec(spec)
    ray = None
    if args.ray is not None:
        from .gallery_ray import RayCompute

        ray = RayCompute(address=args.ray or None, model_spec=spec, num_workers=args.ray_workers,
                         cpus_per_worker=args.ray_cpus_per_worker, gpus_per_worker=args.ray_gpus_per_worker,
                         batch_size=args.batch_size)
    report = build_gallery(model, source, args.name, galleries_dir=galleries_dir or "galleries",
                           index=index or "auto", batch_size=args.batch_size, num_workers=args.num_workers,
                           shard_size=args.shard_size, weights=weights_label(spec["weights"], spec["seed"]), ray=ray,
                           progress=not args.quiet)
    print(report.summary())
    for _, message in report.failures[:SHOWN_FAILURES]:
        print(f"  skipped {message}")
    return 0
