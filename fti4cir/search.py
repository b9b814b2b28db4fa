"""Nearest-neighbour search over L2-normalised feature vectors on faiss-cpu (inner product = cosine similarity).

Data path position: composed query features -> **index search** -> ranked gallery ids.

Index kinds (chosen by `choose_index_spec`, measured in bench/bench_search.py, results in bench/RESULTS.md):

* ``exact``: brute-force scan (faiss ``IndexFlatIP``); no training, results are exact. Used below
  `EXACT_MAX_VECTORS` vectors: a scan reads at most ~300 MB per query there (~25 ms at 100k x 768 on an idle core of
  the 2-core development machine, several times that on a loaded one), and an IVF index would need training.
* ``ivf``: inverted file (``IndexIVFFlat``): spherical k-means cells, a query scans the `nprobe` cells whose
  centroids are most similar. The automatic choice above the threshold.
* ``hnsw``: graph index (``IndexHNSWFlat``); only on request. Measured on CLIP-like synthetic data it loses much
  recall for text-side (composed) queries, which lie away from the image features (the modality gap), and it builds
  slowly on few cores; it cannot remove vectors.

Ids are always the row numbers of the indexed vectors, in the order they were added; `VectorIndex.remove_ids`
compacts them like ``np.delete`` so that callers apply the same deletion to their own per-row metadata.

Input vectors must be finite and L2-normalised (norm within `NORM_TOLERANCE` of 1): they are refused rather than
normalised silently, since an unnormalised gallery almost always means the wrong features were passed. Use
`l2_normalize` where normalisation is intended. Other float dtypes are converted to float32.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


def _work_around_old_openblas() -> None:
    """faiss-cpu wheels bundle OpenBLAS 0.3.15, which does not recognise recent Xeons and falls back to its generic
    SSE3 kernels: k-means training and batched search run ~4x slower. Pick the kernel from the CPU flags unless the
    user chose one or faiss is already loaded (the variable is read once, when the library loads)."""
    if "OPENBLAS_CORETYPE" in os.environ or "faiss" in sys.modules:
        return
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= set(flags):
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif {"avx2", "fma"} <= set(flags):
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"


_work_around_old_openblas()

import faiss  # noqa: E402  (after the OpenBLAS kernel choice above)
from tqdm.auto import tqdm  # noqa: E402

from .atomic import atomic_path  # noqa: E402
from .errors import UserError  # noqa: E402

log = logging.getLogger(__name__)

EXACT_MAX_VECTORS = 100_000  # auto: exact scan below this many vectors, IVF from here on
NORM_TOLERANCE = 1e-2  # accepts float16/bfloat16 rounding of unit vectors, refuses raw (unnormalised) CLIP features
KINDS = ("exact", "ivf", "hnsw")
_ADD_CHUNK = 65_536  # vectors per faiss add call: bounds temporary memory and drives the progress bar
_IVF_TRAIN_PER_CELL = 50  # k-means sample size per cell (faiss warns below 39)
_IVF_KMEANS_ITERATIONS = 10  # faiss' default 25 costs 2.5x the build time for no measurable recall gain


@dataclass(frozen=True)
class IndexSpec:
    """What index to build. Parameters of the other kinds stay None."""

    kind: str  # "exact" | "ivf" | "hnsw"
    nlist: int | None = None  # ivf: number of k-means cells
    nprobe: int | None = None  # ivf: cells scanned per query (recall/latency trade-off; changeable after build)
    hnsw_m: int | None = None  # hnsw: neighbours per node
    ef_construction: int | None = None  # hnsw: candidate list size while building
    ef_search: int | None = None  # hnsw: candidate list size while searching

    def __post_init__(self):
        required = {"exact": (), "ivf": ("nlist", "nprobe"), "hnsw": ("hnsw_m", "ef_construction", "ef_search")}
        if self.kind not in required:
            raise UserError(f"unknown index kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        for name in required[self.kind]:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{self.kind} index needs a positive integer {name}, got {value!r}")
        if self.kind == "ivf" and self.nprobe > self.nlist:
            raise UserError(f"nprobe ({self.nprobe}) cannot exceed nlist ({self.nlist})")

    def describe(self) -> str:
        params = {k: v for k, v in vars(self).items() if k != "kind" and v is not None}
        return self.kind + "".join(f" {k}={v}" for k, v in params.items())


def choose_index_spec(n: int, dim: int, kind: str = "auto") -> IndexSpec:
    """Index for `n` vectors of dimension `dim`.

    kind: "auto" (exact below `EXACT_MAX_VECTORS`, else IVF), "approximate" (the approximate kind auto would use,
    whatever the size), or one of `KINDS` with parameters picked for `n`.

    IVF parameters (measured on 1M CLIP-like vectors, see bench/RESULTS.md): nlist ~ sqrt(n) rounded to a power of
    two (1024 at 1M) keeps both the centroid scan and the per-cell scan short; nprobe = max(16, nlist / 64) gave
    recall@10 0.995-0.999 (image-like queries) and 0.961-0.989 (text-like queries, d=512-768) against exact at 1M,
    p50 < 20 ms on 2 loaded cores. More recall: `VectorIndex.set_nprobe` (24: 0.979, 32: 0.989 for text-like queries
    at d=512; latency grows about linearly).
    HNSW (never chosen automatically): M=32, efConstruction=64, efSearch=128.
    """
    if n < 0 or dim < 1:
        raise UserError(f"invalid index size: {n} vectors of dimension {dim}")
    if kind == "auto":
        kind = "exact" if n < EXACT_MAX_VECTORS else "ivf"
    elif kind == "approximate":
        kind = "ivf"
    if kind == "exact":
        return IndexSpec("exact")
    if kind == "ivf":
        nlist = 2 ** round(math.log2(max(n, 1)) / 2)
        nlist = max(1, min(nlist, n // _IVF_TRAIN_PER_CELL))  # enough training points per cell on small data
        return IndexSpec("ivf", nlist=nlist, nprobe=min(nlist, max(16, nlist // 64)))
    if kind == "hnsw":
        return IndexSpec("hnsw", hnsw_m=32, ef_construction=64, ef_search=128)
    raise UserError(f"unknown index kind {kind!r}; expected auto, approximate, {', '.join(KINDS)}")


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (zero rows stay zero and are refused later by the index)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1)


def set_num_threads(threads: int | None = None) -> int:
    """Threads faiss uses (process-wide); None = all cores usable by this process. IVF runs one query on one thread
    (it parallelises over queries); the exact scan splits even one query over all threads, which costs more than it
    gains on a heavily loaded machine (measured 2.5x slower with 2 threads than 1 at load ~9 on 2 cores)."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    faiss.omp_set_num_threads(threads)
    return threads


def _checked_vectors(vectors, dim: int | None, what: str) -> np.ndarray:
    """`vectors` as a C-contiguous float32 [N, dim] array of finite unit vectors, or UserError."""
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise UserError(f"{what} must be a 2-D array [N, dim], got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise UserError(f"{what} must be numeric, got dtype {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise UserError(f"{what} have dimension {array.shape[1]}, the index has {dim}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    for start in range(0, len(array), _ADD_CHUNK):  # chunked: no full-size temporaries on million-row inputs
        chunk = array[start : start + _ADD_CHUNK]
        squared_norms = np.einsum("ij,ij->i", chunk, chunk)  # non-finite inputs make their row's sum non-finite
        if not np.isfinite(squared_norms).all():
            row = start + int(np.flatnonzero(~np.isfinite(squared_norms))[0])
            raise UserError(f"{what} contain non-finite values (first in row {row})")
        deviation = np.abs(np.sqrt(squared_norms) - 1)
        if (deviation > NORM_TOLERANCE).any():
            row = start + int(np.argmax(deviation))
            raise UserError(
                f"{what} must be L2-normalised; row {row} has norm {math.sqrt(squared_norms[row - start]):.4g} "
                "(normalise them first, e.g. with fti4cir.search.l2_normalize)"
            )
    return array


def _new_faiss_index(spec: IndexSpec, dim: int) -> faiss.Index:
    if spec.kind == "exact":
        return faiss.IndexFlatIP(dim)
    if spec.kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # unit centroids: cells are cosine cones, matching the search metric
        index.cp.niter = _IVF_KMEANS_ITERATIONS
        index.nprobe = spec.nprobe
        return index
    index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = spec.ef_construction
    index.hnsw.efSearch = spec.ef_search
    return index


def _spec_of(index: faiss.Index) -> IndexSpec:
    """The spec a loaded faiss index corresponds to; UserError for anything this module does not build."""
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise UserError("index does not use inner-product similarity")
    if isinstance(index, faiss.IndexIVFFlat):
        return IndexSpec("ivf", nlist=index.nlist, nprobe=index.nprobe)
    if isinstance(index, faiss.IndexHNSWFlat):
        hnsw = index.hnsw
        m = hnsw.nb_neighbors(1)  # faiss stores 2*M neighbours on level 0 and M above
        return IndexSpec("hnsw", hnsw_m=m, ef_construction=hnsw.efConstruction, ef_search=hnsw.efSearch)
    if isinstance(index, faiss.IndexFlat):
        return IndexSpec("exact")
    raise UserError(f"unsupported index type {type(index).__name__}")


class VectorIndex:
    """A faiss index over unit vectors whose ids are row numbers; see the module docstring for the kinds."""

    def __init__(self, index: faiss.Index, spec: IndexSpec):
        self._index = index
        self._spec = spec

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def spec(self) -> IndexSpec:
        return self._spec

    @property
    def faiss_index(self) -> faiss.Index:
        """The underlying faiss index (read access; changing it bypasses this class' checks)."""
        return self._index

    def nbytes(self) -> int:
        """Size of the index as saved (its memory footprint, give or take faiss' small bookkeeping)."""
        size = 0

        def count(chunk: bytes) -> int:
            nonlocal size
            size += len(chunk)
            return len(chunk)

        faiss.write_index(self._index, faiss.PyCallbackIOWriter(count))
        return size

    def set_nprobe(self, nprobe: int) -> None:
        """IVF only: cells scanned per query (more: higher recall, proportionally slower)."""
        if self._spec.kind != "ivf":
            raise UserError(f"nprobe applies to ivf indexes, this one is {self._spec.kind}")
        spec = replace(self._spec, nprobe=nprobe)  # validates the value
        self._index.nprobe = nprobe
        self._spec = spec

    @classmethod
    def build(cls, vectors, spec: IndexSpec | str = "auto", *, seed: int = 0, progress: bool = False) -> VectorIndex:
        """Index `vectors` [N, d] (row i gets id i). `spec`: an IndexSpec or a kind for `choose_index_spec`.
        `seed` fixes the IVF training sample and k-means initialisation (builds are then reproducible)."""
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[1] < 1:
            raise UserError(f"vectors must be a 2-D array [N, dim], got shape {array.shape}")
        if isinstance(spec, str):
            spec = choose_index_spec(len(array), array.shape[1], spec)
        array = _checked_vectors(array, None, "vectors")
        index = _new_faiss_index(spec, array.shape[1])
        if spec.kind == "ivf":
            if len(array) < spec.nlist:
                raise UserError(f"an ivf index with nlist={spec.nlist} needs at least {spec.nlist} vectors")
            rng = np.random.default_rng(seed)
            sample_size = min(len(array), spec.nlist * _IVF_TRAIN_PER_CELL)
            sample = array if sample_size == len(array) else array[np.sort(rng.choice(len(array), sample_size, False))]
            index.cp.seed = seed
            if progress:
                log.info("training %d IVF cells on %d vectors", spec.nlist, sample_size)
            index.train(sample)
        built = cls(index, spec)
        built._add_checked(array, progress)
        return built

    def add(self, vectors, *, progress: bool = False) -> np.ndarray:
        """Append vectors; returns their ids (ntotal before the call, onwards). IVF keeps its trained cells (build a
        new index when the data has grown several-fold or changed in kind); HNSW links them into the graph."""
        return self._add_checked(_checked_vectors(vectors, self.dim, "vectors"), progress)

    def _add_checked(self, array: np.ndarray, progress: bool) -> np.ndarray:
        first = self.ntotal
        with tqdm(total=len(array), desc="indexing vectors", unit="vec", disable=not progress) as bar:
            for start in range(0, len(array), _ADD_CHUNK):
                chunk = array[start : start + _ADD_CHUNK]
                self._index.add(chunk)
                bar.update(len(chunk))
        return np.arange(first, self.ntotal, dtype=np.int64)

    def remove_ids(self, ids) -> int:
        """Remove vectors by id; later ids shift down (like ``np.delete``). Returns how many were removed; ids not in
        the index are ignored. Exact and IVF only: HNSW graphs cannot drop nodes (rebuild without them)."""
        if self._spec.kind == "hnsw":
            raise UserError("hnsw indexes cannot remove vectors; build a new index without them")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = np.unique(ids[(ids >= 0) & (ids < self.ntotal)])
        if len(ids) == 0:
            return 0
        removed = int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
        if self._spec.kind == "ivf":  # IndexFlat compacts by itself; IVF keeps its labels, so renumber them
            _shift_ivf_ids_down(self._index, ids)
        return removed

    def search(self, queries, k: int, *, exclude_ids: Sequence[Sequence[int]] | None = None):
        """Top-k by inner product: (scores float32 [Q, k], ids int64 [Q, k]), best first.

        exclude_ids: per query, ids that must not be returned (e.g. the reference image); ids not in the index are
        ignored. Rows with fewer than k results (exclusions, small approximate probes) are padded with id -1 and
        score -inf. Equal scores are listed by ascending id; which of several candidates tied with the k-th score
        make the cut is faiss' choice.
        """
        queries = _checked_vectors(queries, self.dim, "queries")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"k must be a positive integer, got {k!r}")
        if k > self.ntotal:
            raise UserError(f"k={k} exceeds the number of indexed vectors ({self.ntotal})")
        n_queries = len(queries)
        if exclude_ids is not None and len(exclude_ids) != n_queries:
            raise UserError(f"exclude_ids has {len(exclude_ids)} entries for {n_queries} queries")
        excluded = _excluded_keys(exclude_ids, self.ntotal) if exclude_ids is not None else None
        extra = 0 if excluded is None else int(excluded[1])
        scores, ids = self._index.search(queries, min(k + extra, self.ntotal))
        drop = ids < 0
        if excluded is not None and len(excluded[0]):
            row_keys = np.arange(n_queries, dtype=np.int64)[:, None] * self.ntotal + ids
            drop |= np.isin(row_keys, excluded[0]) & (ids >= 0)
        scores[drop] = -np.inf
        ids[drop] = -1
        # Best first, ties by ascending id, dropped entries (-inf) last; then keep k.
        order = np.lexsort((np.where(drop, np.iinfo(np.int64).max, ids), -scores), axis=1)[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def save(self, path) -> None:
        """Write the index (faiss format) atomically: a crash leaves the previous file intact."""
        with atomic_path(path) as tmp:
            faiss.write_index(self._index, str(tmp))

    @classmethod
    def load(cls, path) -> VectorIndex:
        """Read an index written by `save`; UserError if the file is missing, truncated or not such an index."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"index file not found: {path}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:  # faiss reports truncation and bad headers as RuntimeError
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise UserError(f"index file is corrupted: {path}: {reason}") from error
        try:
            spec = _spec_of(index)
            if not index.is_trained:
                raise UserError("index is not trained")
            if spec.kind == "ivf" and index.invlists.compute_ntotal() != index.ntotal:
                raise UserError("inverted lists do not add up to the vector count")
        except UserError as error:
            raise UserError(f"index file is corrupted: {path}: {error}") from error
        return cls(index, spec)


def _excluded_keys(exclude_ids: Sequence[Sequence[int]], ntotal: int) -> tuple[np.ndarray, int]:
    """Excluded (query row, id) pairs encoded as row * ntotal + id (ids outside the index dropped), and the largest
    number of exclusions of one query (how many extra results to fetch)."""
    lengths = np.fromiter((len(row) for row in exclude_ids), dtype=np.int64, count=len(exclude_ids))
    flat = np.fromiter((i for row in exclude_ids for i in row), dtype=np.int64, count=int(lengths.sum()))
    rows = np.repeat(np.arange(len(exclude_ids), dtype=np.int64), lengths)
    valid = (flat >= 0) & (flat < ntotal)
    keys = np.unique(rows[valid] * ntotal + flat[valid])
    per_row = np.bincount(keys // ntotal, minlength=1) if len(keys) else np.zeros(1, dtype=np.int64)
    return keys, int(per_row.max())


def _shift_ivf_ids_down(index: faiss.IndexIVF, removed_sorted: np.ndarray) -> None:
    """After removing `removed_sorted` from an IVF index, renumber the remaining ids to stay row numbers."""
    invlists = index.invlists
    for list_no in range(index.nlist):
        size = invlists.list_size(list_no)
        if size == 0:
            continue
        ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy()
        if ids.max() < removed_sorted[0]:  # nothing above the first removed id: no shift
            continue
        ids -= np.searchsorted(removed_sorted, ids)
        codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * invlists.code_size).copy()
        invlists.update_entries(list_no, 0, size, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
