"""The gallery format and its reader: `Gallery.load` opens the one published version of `galleries/NAME/`.

    CURRENT                 "<version> <sha256 of its manifest.json>": the one published version
    v-000007/               a complete, immutable version
        manifest.json       source, entries (name, relative path, sha1, size) in row order, array checksums, the model
                            (a `fti4cir.spec.ModelSpec` dict, galleries built since it is recorded)
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
    .staging-<key>/         work in progress of a build (`fti4cir.gallery.build`)

A reader follows CURRENT, so it sees the old or the new gallery, never a mix (a build replaces CURRENT atomically
after the new version is complete and fsynced); every file is checked against the manifest's sizes and checksums.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..digests import file_digest
from ..errors import UserError
from ..inputs import quote
from .identity import check_compatible, gallery_identity

if TYPE_CHECKING:
    import torch

    from ..inversion import PseudoTokens

# torch and the model modules are imported where used: `fti4cir index --help` stays fast

FORMAT_VERSION = 1
CURRENT = "CURRENT"
INDEX_FILE = "index.faiss"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
VERSION_NAME = re.compile(r"v-(\d{6,})")  # a version folder; group 1: its number
# per-row arrays: name -> dtype (shapes come from the model, see `fti4cir.gallery.shards.row_shapes`)
ARRAYS = {
    "features": np.float32,
    "subject": np.float32,
    "attributes": np.float32,
    "num_kept": np.int16,
    "relevance": np.float32,
    "indices": np.int16,
    "attention": np.float16,
}


# ---- names --------------------------------------------------------------------------------------------------------
def is_valid_name(name) -> bool:
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and ".." not in name


def validate_name(name: str) -> str:
    """Gallery names are exposed by the app: letters, digits, '.', '_', '-'; no separators, no '..', no leading dot."""
    if not is_valid_name(name):
        raise UserError(
            f"Invalid gallery name {quote(name)}: use 1-100 letters, digits, '.', '_' or '-' (not starting "
            f"with '.', no '..', no path separators)"
        )
    return name


def list_galleries(galleries_dir: str | os.PathLike = "galleries") -> list[str]:
    """Names of the published galleries under `galleries_dir` (the only names an app should offer)."""
    root = Path(galleries_dir)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if is_valid_name(d.name) and (d / CURRENT).is_file())


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
    def load(
        cls,
        path_or_name: str | os.PathLike,
        model=None,
        galleries_dir: str | os.PathLike = "galleries",
        *,
        verify: bool = True,
    ) -> Gallery:
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
                    raise UserError(
                        f"Gallery {directory} is incomplete: files of {version} are missing; rebuild it "
                        f"with fti4cir index"
                    ) from None
        else:
            raise UserError(f"Gallery {directory} keeps changing while being read; try again")
        if model is not None:
            check_compatible(gallery.identity, gallery_identity(model), gallery.name)
        return gallery

    @classmethod
    def _open(cls, directory: Path, version: str, manifest_sha: str, verify: bool) -> Gallery:
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
            raise UserError(
                f"Gallery {directory} has format {manifest.get('format')}; this version of fti4cir "
                f"reads format {FORMAT_VERSION}: rebuild it with fti4cir index"
            )
        for e in manifest["entries"]:  # rows name files inside the source folder, nothing else
            rel = Path(e.get("path", e["name"]))
            if rel.is_absolute() or ".." in rel.parts:
                raise UserError(_corrupt(directory, "manifest.json", f"row path {str(rel)!r} leaves the source"))
        for file, meta in files.items():
            path = folder / file
            if path.stat().st_size != meta["bytes"]:
                raise UserError(
                    _corrupt(
                        directory, file, f"its size is {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
                    )
                )
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
                raise UserError(
                    _corrupt(
                        directory,
                        f"{k}.npy",
                        f"shape {list(arrays[k].shape)} / {arrays[k].dtype.name} differs from the manifest",
                    )
                )
        from ..search import VectorIndex

        try:
            index = VectorIndex.load(folder / manifest["index"]["file"])
        except UserError as e:
            if not (folder / manifest["index"]["file"]).exists():
                raise _Republished() from None
            raise UserError(_corrupt(directory, manifest["index"]["file"], str(e))) from None
        if index.ntotal != manifest["count"]:
            raise UserError(
                _corrupt(
                    directory,
                    manifest["index"]["file"],
                    f"it holds {index.ntotal} vectors for {manifest['count']} images",
                )
            )
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

        from ..inversion import PseudoTokens

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
        return {
            "relevance": np.array(self._arrays["relevance"][i], dtype=np.float32),
            "num_kept": r,
            "kept": indices[:r],
            "indices": indices,
            "attention": np.array(self._arrays["attention"][i], dtype=np.float32),  # [num_k, gh * gw]
            "epsilon": float(meta["epsilon"]),
            "grid": (gh, gw),
        }

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
    if not (
        isinstance(index, dict)
        and index.get("file") == INDEX_FILE
        and isinstance(grid, list)
        and len(grid) == 2
        and all(isinstance(g, int) and 0 < g <= 4096 for g in grid)
        and isinstance(explain.get("epsilon"), (int, float))
        and math.isfinite(explain["epsilon"])
    ):
        return "its index or explanation settings are malformed"
    if not isinstance(entries, list) or len(entries) != count:
        return f"it lists {len(entries) if isinstance(entries, list) else 'no'} rows for a count of {count}"
    for e in entries:
        if not (
            isinstance(e, dict)
            and plain(e.get("name"))
            and plain(e.get("sha1"))
            and ("path" not in e or plain(e["path"]))
        ):
            return "a row is not a name, path and sha1"
    if not isinstance(files, dict) or set(files) != _MANIFEST_FILES:
        return "its files are not the version's own"
    for file, meta in files.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and plain(meta.get("sha256"))):
            return f"{file} has no size or checksum"
        if file.endswith(".npy") and not (
            isinstance(meta.get("shape"), list) and meta["shape"][:1] == [count] and isinstance(meta.get("dtype"), str)
        ):
            return f"{file} has no shape of {count} rows"
    return None


def _corrupt(directory: Path, file: str, why: str) -> str:
    return (
        f"Gallery {directory} is corrupted: {file} failed verification ({why}). Rebuild it with "
        f"fti4cir index (the rebuild recomputes what it cannot trust)"
    )


def _gallery_dir(path_or_name: str | os.PathLike, galleries_dir: str | os.PathLike) -> Path:
    """A name (validated) under galleries_dir, or a path to a gallery folder (trusted callers: the CLI)."""
    if isinstance(path_or_name, os.PathLike) or (
        isinstance(path_or_name, str) and not is_valid_name(path_or_name) and (Path(path_or_name) / CURRENT).is_file()
    ):
        directory = Path(path_or_name)
    else:
        directory = Path(galleries_dir) / validate_name(path_or_name)
    if not (directory / CURRENT).is_file():
        raise UserError(f"No gallery at {directory} (build one with: fti4cir index SOURCE --name {directory.name})")
    return directory


def published_version(directory: Path) -> str | None:
    """The version CURRENT names; None where there is no readable CURRENT."""
    if not (directory / CURRENT).is_file():
        return None
    try:
        return _read_current(directory)[0]
    except UserError:
        return None


def _read_current(directory: Path) -> tuple[str, str]:
    try:
        version, manifest_sha = (directory / CURRENT).read_text().split()
    except (OSError, ValueError):
        raise UserError(_corrupt(directory, CURRENT, "it is not '<version> <sha256>'")) from None
    if not VERSION_NAME.fullmatch(version):
        raise UserError(_corrupt(directory, CURRENT, f"{version!r} is not a version name"))
    return version, manifest_sha
