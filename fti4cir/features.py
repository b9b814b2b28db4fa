"""Visual-feature stage: image files -> one visual pass each -> an on-disk, memory-mapped feature cache.

Shared by training (global features + patch tokens, so the frozen visual tower never runs again), evaluation and
galleries (global features, optionally patches for references). Rows are keyed by the file's content hash, the store by
the model identity (backbone, pretrained weights, preprocessing), so renamed or copied files are not recomputed and a
different backbone never reads stale features.

On-disk layout of one store (`<root>/<key>/`): `meta.json`, `global.f16` and `patches.f16` (raw float16 rows, appended)
and `hashes.txt` (one content hash per committed row). Rows are appended data-first, then their hashes; a kill at any
point leaves at most a torn tail, which the next writer cuts off, so nothing committed is ever lost or duplicated.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_path, write_json_atomic
from .digests import file_digest
from .errors import UserError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from .backbone import VisualFeatures
    from .inversion import PseudoTokens

# torch, the model modules and tqdm are imported where used: `fti4cir features --help` stays fast

HASH_CHARS = 40  # sha1 hex


def content_hash(path: str | os.PathLike) -> str:
    """The key of a file's rows: sha1 of its bytes."""
    return file_digest(path, "sha1")


def hash_files(paths: list[Path], threads: int = 8) -> list[str | None]:
    """Content hashes (None for unreadable files); threads because hashlib and file reads release the GIL."""

    def one(p):
        try:
            return content_hash(p)
        except OSError:
            return None

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, paths))


class FileHashes:
    """Content hashes remembered by (absolute path, size, mtime_ns), so a rerun stats files instead of reading them.

    A file rewritten with the same size within one mtime tick would keep its old hash; touch it to force a rehash.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._entries: dict[str, list] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent or damaged: start over, it is only a shortcut
            self._entries = {}
        self._changed = False

    @staticmethod
    def _signature(path: Path) -> list[int] | None:
        try:
            status = os.stat(path)
        except OSError:
            return None
        return [status.st_size, status.st_mtime_ns]

    def known(self, paths: Sequence[Path]) -> list[str | None]:
        hashes = []
        for path in paths:
            entry = self._entries.get(os.path.abspath(path))
            fresh = entry is not None and entry[:2] == self._signature(path)
            hashes.append(entry[2] if fresh else None)
        return hashes

    def record(self, paths: Sequence[Path], hashes: Sequence[str | None]) -> None:
        for path, content_hash in zip(paths, hashes):
            signature = self._signature(path)
            if content_hash is not None and signature is not None:
                self._entries[os.path.abspath(path)] = [*signature, content_hash]
                self._changed = True

    def save(self) -> None:
        if self._changed:
            write_json_atomic(self.path, self._entries, indent=None)
            self._changed = False


class FeatureStore:
    """Append-only, memory-mapped float16 feature rows keyed by content hash."""

    def __init__(
        self, root: str | os.PathLike, identity: dict, *, with_patches: bool, dims: tuple[int, int, int] | None = None
    ):
        """identity: what makes features comparable (model.identity(), plus weights if they matter).
        dims: (embed_dim, num_patch_tokens, patch_dim), needed when the store is created."""
        key = hashlib.sha1(json.dumps({**identity, "patches": with_patches}, sort_keys=True).encode()).hexdigest()
        self.dir = Path(root) / key[:16]
        self.identity, self.with_patches = identity, with_patches
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta["identity"] != identity:
                raise UserError(f"Feature cache {self.dir} belongs to another model: {meta['identity']}")
            self.dims = tuple(meta["dims"])
        else:
            if dims is None:
                raise ValueError("dims are needed to create a new feature store")
            self.dims = tuple(int(d) for d in dims)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                meta_path, {"identity": identity, "with_patches": with_patches, "dims": self.dims, "dtype": "float16"}
            )
        self._hashes: list[str] = []
        self._row_of: dict[str, int] = {}
        self._refresh()

    @classmethod
    def for_model(cls, root, model, *, with_patches: bool, extra_identity: dict | None = None) -> FeatureStore:
        bb = model.backbone
        tokens = 1 + bb.grid_size[0] * bb.grid_size[1]
        return cls(
            root,
            {**model.identity(), **(extra_identity or {})},
            with_patches=with_patches,
            dims=(bb.embed_dim, tokens, bb.patch_dim),
        )

    # ---- files ------------------------------------------------------------------------------------------------
    @property
    def _global_file(self) -> Path:
        return self.dir / "global.f16"

    @property
    def _patch_file(self) -> Path:
        return self.dir / "patches.f16"

    @property
    def _row_bytes(self) -> tuple[int, int]:
        embed, tokens, width = self.dims
        return 2 * embed, 2 * tokens * width

    @contextmanager
    def _locked(self):
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _refresh(self) -> None:
        """Read the committed rows (complete hash lines only)."""
        path = self.dir / "hashes.txt"
        text = path.read_text() if path.exists() else ""
        lines = text.split("\n")[:-1]  # the last element is "" or a torn line
        self._hashes = [h for h in lines if len(h) == HASH_CHARS]
        self._row_of = {h: i for i, h in enumerate(self._hashes)}

    def _repair(self) -> None:
        """Cut a torn tail left by a killed writer (caller holds the lock)."""
        self._refresh()
        n = len(self._hashes)
        hashes_path = self.dir / "hashes.txt"
        if hashes_path.exists() and hashes_path.stat().st_size != n * (HASH_CHARS + 1):
            os.truncate(hashes_path, n * (HASH_CHARS + 1))
        for file, size in ((self._global_file, self._row_bytes[0]), (self._patch_file, self._row_bytes[1])):
            if file.exists() and file.stat().st_size > n * size:
                os.truncate(file, n * size)

    def __len__(self) -> int:
        return len(self._hashes)

    # ---- API --------------------------------------------------------------------------------------------------
    def hash_of(self, row: int) -> str:
        return self._hashes[row]

    def lookup(self, hashes: list[str | None]) -> np.ndarray:
        return np.array([self._row_of.get(h, -1) if h else -1 for h in hashes], dtype=np.int64)

    def add(self, hashes: list[str], features: VisualFeatures) -> np.ndarray:
        """Append rows (already-present hashes are skipped); returns the row of every hash."""
        import torch

        with self._locked():
            self._repair()
            new, pending = [], set()
            for i, h in enumerate(hashes):
                if h not in self._row_of and h not in pending:
                    new.append(i)
                    pending.add(h)
            if new:
                index = torch.tensor(new)
                blocks = [(self._global_file, features.global_features[index])]
                if self.with_patches:
                    blocks.append((self._patch_file, features.patch_tokens[index]))
                for file, tensor in blocks:
                    with open(file, "ab") as f:
                        f.write(tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
                        f.flush()
                        os.fsync(f.fileno())
                with open(self.dir / "hashes.txt", "a") as f:  # the commit
                    f.write("".join(hashes[i] + "\n" for i in new))
                    f.flush()
                    os.fsync(f.fileno())
                self._refresh()
        return self.lookup(hashes)

    def _memmap(self, file: Path, shape: tuple[int, ...]) -> np.ndarray:
        return np.memmap(file, dtype=np.float16, mode="r", shape=(len(self),) + shape)

    def global_features(self, rows) -> torch.Tensor:
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(np.asarray(self._memmap(self._global_file, (self.dims[0],))[rows], np.float32))

    def get(self, rows) -> VisualFeatures:
        import torch

        from .backbone import VisualFeatures

        rows = np.asarray(rows, dtype=np.int64)
        if (rows < 0).any():
            raise KeyError("some rows are not in the feature store")
        patches = None
        if self.with_patches:
            _, tokens, width = self.dims
            patches = torch.from_numpy(np.asarray(self._memmap(self._patch_file, (tokens, width))[rows], np.float32))
        return VisualFeatures(self.global_features(rows), patches)


class TokenCache:
    """Pseudo tokens per content hash for one set of inversion weights, in one safetensors file (rewritten
    atomically when rows are added)."""

    FIELDS = ("subject", "attributes", "num_kept", "image_features")

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        self._tensors: dict[str, torch.Tensor] = {}
        self._row_of: dict[str, int] = {}
        if self.path.exists():
            try:
                with safe_open(str(self.path), framework="pt") as f:
                    hashes = json.loads(f.metadata()["hashes"])
                    self._tensors = {k: f.get_tensor(k) for k in self.FIELDS}
                self._row_of = {h: i for i, h in enumerate(hashes)}
            except Exception:  # noqa: BLE001 - a damaged cache is only a lost shortcut: start over
                self._tensors, self._row_of = {}, {}

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._row_of

    def add(self, hashes: list[str], tokens: PseudoTokens) -> None:
        import torch
        from safetensors.torch import save_file

        new = {k: getattr(tokens, k).detach().cpu() for k in self.FIELDS}
        self._tensors = {k: torch.cat([self._tensors[k], v]) if self._tensors else v for k, v in new.items()}
        for h in hashes:
            self._row_of[h] = len(self._row_of)
        ordered = sorted(self._row_of, key=self._row_of.get)
        with atomic_path(self.path) as tmp:
            save_file(
                {k: v.contiguous() for k, v in self._tensors.items()},
                str(tmp),
                metadata={"hashes": json.dumps(ordered)},
            )

    def get(self, hashes: list[str]) -> PseudoTokens:
        import torch

        from .inversion import PseudoTokens

        index = torch.tensor([self._row_of[h] for h in hashes], dtype=torch.long)
        return PseudoTokens(*(self._tensors[k][index] for k in self.FIELDS))


class _ImageFiles:  # a map-style dataset (what DataLoader indexes)
    """Decode + preprocess in DataLoader workers; a bad file yields its error message instead of a tensor."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from .inputs import load_image

        try:
            return i, self.transform(load_image(self.paths[i])), None
        except UserError as e:
            return i, None, str(e)
        except Exception as e:  # noqa: BLE001 - one bad file never aborts a run
            return i, None, f"{Path(self.paths[i]).name}: {type(e).__name__}: {e}"


def _collate(items):
    import torch

    ok = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, msg) for i, _, msg in items if msg is not None]
    index = [i for i, _ in ok]
    images = torch.stack([t for _, t in ok]) if ok else None
    return index, images, failed


def _worker_init(_):
    import torch

    torch.set_num_threads(1)  # decoding workers should not fight the encoder for cores


def default_num_workers(items: int, batch_size: int) -> int:
    """Image-decoding processes when none are asked for: up to 4 (one per core), none for a single batch."""
    return min(4, os.cpu_count() or 1) if items > batch_size else 0


def image_loader(paths: list[Path], transform, batch_size: int, num_workers: int | None = None) -> DataLoader:
    """Batches of (indices into paths, preprocessed images, failures) decoded in worker processes."""
    from torch.utils.data import DataLoader

    if num_workers is None:
        num_workers = default_num_workers(len(paths), batch_size)
    return DataLoader(
        _ImageFiles(paths, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )


@dataclass
class ExtractResult:
    rows: np.ndarray  # per input path: its row in the store, -1 when unreadable
    hashes: list[str | None]
    failures: list[tuple[Path, str]] = field(default_factory=list)
    computed: int = 0  # images that went through the visual tower in this call


def extract_features(
    model,
    paths: list[str | os.PathLike],
    store: FeatureStore,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Make sure every readable file in `paths` has a row in `store`: one visual pass per new image."""
    import torch
    from tqdm.auto import tqdm

    from .backbone import VisualFeatures

    paths = [Path(p) for p in paths]
    hashes = hash_files(paths)
    failures = [(p, f"{p.name}: cannot read the file") for p, h in zip(paths, hashes) if h is None]
    rows = store.lookup(hashes)
    todo, seen = [], set()
    for i, (h, r) in enumerate(zip(hashes, rows)):
        if h is not None and r < 0 and h not in seen:
            todo.append(i)
            seen.add(h)
    computed = 0
    if todo:
        bar = tqdm(total=len(todo), desc="visual features", unit="img", disable=not progress)
        loader = image_loader([paths[i] for i in todo], model.transform, batch_size, num_workers)
        with torch.no_grad():
            for index, images, failed in loader:
                failures += [(paths[todo[i]], msg) for i, msg in failed]
                if images is not None:
                    feats = model.backbone.encode_visual(images)
                    if not store.with_patches:
                        feats = VisualFeatures(feats.global_features, None)
                    store.add([hashes[todo[i]] for i in index], feats)
                    computed += len(index)
                bar.update(len(index) + len(failed))
        bar.close()
        rows = store.lookup(hashes)
    return ExtractResult(rows, hashes, failures, computed)
