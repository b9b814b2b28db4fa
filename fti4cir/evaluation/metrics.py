"""Retrieval metrics of FashionIQ, CIRR and CIRCO, as their official evaluation code defines them (and of this
project's clothing-cir benchmark).

All functions take a similarity matrix ``[queries, gallery]`` (numpy array or torch tensor; higher is better) and
the gallery names in column order, and return percentages.

Ranking and ties. The official FashionIQ and CIRR code ranks ``torch.argsort(1 - similarity)``; the official CIRCO
code takes ``torch.topk(similarity, 50)``. Neither asks for a stable order, so its tie order is left to the kernel
(current CPU and CUDA sorts happen to be stable). Here ties are defined: among equal keys the earlier gallery
column ranks first, i.e. a stable sort, which is what those kernels give in practice. ``order_by="distance"`` ranks
by ``1 - similarity`` computed in the input's float dtype (as the official FashionIQ/CIRR code, so two close
similarities that round to the same distance tie exactly as there); ``order_by="similarity"`` ranks by the raw
similarity (CIRCO). Half-precision inputs are upcast to float32 first, the precision the official code ranks in.

Protocol details that change numbers:

* FashionIQ: the reference image stays in the gallery (the official code does not remove it).
* CIRR: the reference is removed from the ranking before Recall@K, so a target ranked right after the reference
  moves up one place. Recall_subset@K ranks the query's ``img_set`` members, minus the reference, by their order
  in that global ranking.
* CIRCO: nothing is removed (the reference can take a top-50 slot). AP@K sums precision at the ranks of ground
  truths within the top K and divides by ``min(#ground truths, K)``; Recall@K only counts the annotated target.
* clothing-cir: the reference is removed from the ranking (as CIRR); mAP@K as CIRCO over all ground truths;
  Recall@K = at least one ground truth within the top K (every ground truth is an equally good answer). Also per
  query type (colour / class / both).

Work is batched over row chunks, so memory stays bounded for 120k-image galleries.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from statistics import mean
from typing import Any, Literal

import numpy as np

OrderBy = Literal["distance", "similarity"]

FASHIONIQ_KS = (10, 50)
CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
CIRCO_KS = (5, 10, 25, 50)
CLOTHING_MAP_KS = (5, 10, 25)
CLOTHING_RECALL_KS = (1, 5, 10)
CLOTHING_PAIRED_METRIC = "map@10"  # kept per query, so that two methods can be compared query by query

_CHUNK_ELEMENTS = 1 << 22  # similarity entries processed at once (bounds temporaries to tens of MB)


def _as_matrix(similarity: Any) -> np.ndarray:
    """A finite 2-D float numpy view of a numpy array or torch tensor."""
    if hasattr(similarity, "detach"):  # torch.Tensor, converted without importing torch here
        tensor = similarity.detach().cpu()
        if tensor.is_floating_point() and tensor.element_size() < 4:  # float16 / bfloat16 have no numpy view
            tensor = tensor.float()
        similarity = tensor.numpy()
    matrix = np.asarray(similarity)
    if matrix.dtype.kind != "f":
        raise ValueError(f"similarity must be a float matrix, got dtype {matrix.dtype}")
    if matrix.dtype.itemsize < 4:
        matrix = matrix.astype(np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"similarity must be 2-D [queries, gallery], got shape {matrix.shape}")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"similarity is empty (shape {matrix.shape})")
    if not np.isfinite(matrix).all():
        raise ValueError("similarity contains NaN or infinite values")
    return matrix


def _sort_key(similarity: np.ndarray, order_by: OrderBy) -> np.ndarray:
    """An ascending sort key: the official distance ``1 - s`` (in the input dtype) or ``-s``."""
    if order_by == "distance":
        return similarity.dtype.type(1) - similarity
    if order_by == "similarity":
        return -similarity
    raise ValueError(f"order_by must be 'distance' or 'similarity', got {order_by!r}")


def _row_chunks(n_rows: int, n_columns: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // n_columns)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _gallery_index(gallery_names: Sequence[str], n_columns: int) -> dict[str, int]:
    if len(gallery_names) != n_columns:
        raise ValueError(f"{len(gallery_names)} gallery names for {n_columns} similarity columns")
    index = {name: column for column, name in enumerate(gallery_names)}
    if len(index) != len(gallery_names):
        raise ValueError("gallery names are not unique")
    return index


def _columns_of(names: Sequence[str], index: Mapping[str, int], what: str, n_rows: int) -> np.ndarray:
    """Gallery columns of one name per query."""
    if len(names) != n_rows:
        raise ValueError(f"{len(names)} {what} for {n_rows} queries")
    unknown = [name for name in names if name not in index]
    if unknown:
        raise ValueError(f"{len(unknown)} {what} not in the gallery, e.g. {unknown[:3]}")
    return np.fromiter((index[name] for name in names), dtype=np.int64, count=len(names))


def _padded_columns(name_sets: Sequence[Sequence[str]], index: Mapping[str, int], what: str, n_rows: int) -> np.ndarray:
    """Gallery columns of several names per query, de-duplicated, padded with -1 to ``[queries, max size]``."""
    if len(name_sets) != n_rows:
        raise ValueError(f"{len(name_sets)} {what} for {n_rows} queries")
    unique_sets = [list(dict.fromkeys(names)) for names in name_sets]
    unknown = [name for names in unique_sets for name in names if name not in index]
    if unknown:
        raise ValueError(f"{len(unknown)} {what} not in the gallery, e.g. {unknown[:3]}")
    columns = np.full((n_rows, max(1, max(map(len, unique_sets)))), -1, dtype=np.int64)
    for row, names in enumerate(unique_sets):
        columns[row, : len(names)] = [index[name] for name in names]
    return columns


def _precedes(key_a: np.ndarray, column_a: np.ndarray, key_b: np.ndarray, column_b: np.ndarray) -> np.ndarray:
    """Whether item a ranks before item b: smaller key, or an equal key and an earlier gallery column."""
    return (key_a < key_b) | ((key_a == key_b) & (column_a < column_b))


def _keys_at(similarity: np.ndarray, columns: np.ndarray, order_by: OrderBy) -> np.ndarray:
    """Sort keys of the given columns per row (``columns`` is ``[queries]`` or ``[queries, m]``; -1 is padding)."""
    picked = np.take_along_axis(similarity, np.maximum(columns, 0).reshape(len(columns), -1), axis=1)
    return _sort_key(picked, order_by).reshape(columns.shape)


def _ranks(similarity: np.ndarray, columns: np.ndarray, order_by: OrderBy) -> np.ndarray:
    """0-based rank of gallery column ``columns[q]`` in query q's ranking over the whole gallery."""
    ranks = np.empty(len(columns), dtype=np.int64)
    all_columns = np.arange(similarity.shape[1])
    for rows in _row_chunks(*similarity.shape):
        key = _sort_key(similarity[rows], order_by)
        pivot_columns = columns[rows, None]
        pivot_keys = np.take_along_axis(key, pivot_columns, axis=1)
        ranks[rows] = _precedes(key, all_columns, pivot_keys, pivot_columns).sum(axis=1)
    return ranks


def _top_k_columns(key: np.ndarray, k: int) -> np.ndarray:
    """The k best columns per row in rank order, exactly as a stable full argsort would list them."""
    n_rows, n_columns = key.shape
    if k >= n_columns:
        return np.argsort(key, axis=1, kind="stable")
    kth_key = np.partition(key, k - 1, axis=1)[:, k - 1 : k]
    better = key < kth_key
    # Among items tied with the k-th key, the earliest columns fill the remaining slots.
    tied = key == kth_key
    slots_left = k - better.sum(axis=1, keepdims=True)
    chosen = better | (tied & (np.cumsum(tied, axis=1) <= slots_left))
    columns = np.nonzero(chosen)[1].reshape(n_rows, k)  # row-major: ascending columns within a row
    order = np.argsort(np.take_along_axis(key, columns, axis=1), axis=1, kind="stable")
    return np.take_along_axis(columns, order, axis=1)


def _top_columns(similarity: np.ndarray, k: int, order_by: OrderBy, excluded: np.ndarray | None) -> np.ndarray:
    top = np.empty((similarity.shape[0], k), dtype=np.int64)
    for rows in _row_chunks(*similarity.shape):
        key = _sort_key(similarity[rows], order_by)
        if excluded is not None:  # +inf sorts last, and k leaves the excluded column out
            np.put_along_axis(key, excluded[rows, None], np.inf, axis=1)
        top[rows] = _top_k_columns(key, k)
    return top


def rank_names(
    similarity: Any,
    gallery_names: Sequence[str],
    k: int | None = None,
    exclude: Sequence[str] | None = None,
    *,
    order_by: OrderBy = "distance",
) -> np.ndarray:
    """Gallery names ranked best first, ``[queries, k]``.

    ``exclude`` names one gallery image per query to drop from its ranking (CIRR's reference). ``k`` defaults to
    the whole ranking and may not exceed it.
    """
    matrix = _as_matrix(similarity)
    index = _gallery_index(gallery_names, matrix.shape[1])
    excluded = None if exclude is None else _columns_of(exclude, index, "excluded names", matrix.shape[0])
    available = matrix.shape[1] - (excluded is not None)
    k = available if k is None else k
    if not 1 <= k <= available:
        raise ValueError(f"k must be between 1 and {available}, got {k}")
    return np.asarray(gallery_names)[_top_columns(matrix, k, order_by, excluded)]


def rank_within_groups(
    similarity: Any,
    gallery_names: Sequence[str],
    groups: Sequence[Sequence[str]],
    exclude: Sequence[str],
    k: int,
) -> np.ndarray:
    """Each query's group members minus its ``exclude`` name, in their order in the CIRR ranking, ``[queries, k]``.

    This is the official CIRR subset ranking: the global ranking by ``1 - similarity`` filtered to the group.
    """
    matrix = _as_matrix(similarity)
    n_rows = matrix.shape[0]
    index = _gallery_index(gallery_names, matrix.shape[1])
    excluded = _columns_of(exclude, index, "excluded names", n_rows)
    members = _padded_columns(groups, index, "group members", n_rows)
    members[members == excluded[:, None]] = -1
    valid = members >= 0
    too_small = np.flatnonzero(valid.sum(axis=1) < k)
    if too_small.size:
        raise ValueError(f"{too_small.size} groups have fewer than {k} members besides the excluded one")
    keys = np.where(valid, _keys_at(matrix, members, "distance"), np.inf)
    order = np.lexsort((members, keys), axis=-1)[:, :k]  # key first, then gallery column
    return np.asarray(gallery_names)[np.take_along_axis(members, order, axis=1)]


def fashioniq_recall(similarity: Any, gallery_names: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """FashionIQ Recall@10/@50 (percent) of one category; every target must be in the gallery."""
    matrix = _as_matrix(similarity)
    index = _gallery_index(gallery_names, matrix.shape[1])
    ranks = _ranks(matrix, _columns_of(targets, index, "targets", matrix.shape[0]), "distance")
    return {f"recall@{k}": float(np.mean(ranks < k) * 100) for k in FASHIONIQ_KS}


def fashioniq_average(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per-category Recall@10/@50 plus their unweighted average over categories and the mean of the two averages.

    The papers' "Average" columns: ``average.recall@10``, ``average.recall@50`` and ``average.mean`` (their mean).
    """
    if not per_category:
        raise ValueError("no FashionIQ categories to average")
    result = {
        category: {f"recall@{k}": float(metrics[f"recall@{k}"]) for k in FASHIONIQ_KS}
        for category, metrics in per_category.items()
    }
    average = {f"recall@{k}": mean(metrics[f"recall@{k}"] for metrics in result.values()) for k in FASHIONIQ_KS}
    average["mean"] = mean(average[f"recall@{k}"] for k in FASHIONIQ_KS)
    result["average"] = average
    return result


def cirr_metrics(
    similarity: Any,
    gallery_names: Sequence[str],
    references: Sequence[str],
    targets: Sequence[str],
    groups: Sequence[Sequence[str]],
) -> dict[str, float]:
    """CIRR Recall@1/5/10/50 (reference removed) and Recall_subset@1/2/3 within the group (percent)."""
    matrix = _as_matrix(similarity)
    n_rows = matrix.shape[0]
    index = _gallery_index(gallery_names, matrix.shape[1])
    reference_columns = _columns_of(references, index, "references", n_rows)
    target_columns = _columns_of(targets, index, "targets", n_rows)
    if np.any(reference_columns == target_columns):
        raise ValueError("a target equals its reference, which the CIRR protocol removes from the ranking")

    # Rank over the gallery without the reference: one place better when the reference ranked before the target.
    target_keys = _keys_at(matrix, target_columns, "distance")
    reference_keys = _keys_at(matrix, reference_columns, "distance")
    reference_before = _precedes(reference_keys, reference_columns, target_keys, target_columns)
    ranks = _ranks(matrix, target_columns, "distance") - reference_before

    members = _padded_columns(groups, index, "group members", n_rows)
    if not np.all((members == target_columns[:, None]).any(axis=1)):
        raise ValueError("a target is not a member of its query's group")
    others = (members >= 0) & (members != reference_columns[:, None]) & (members != target_columns[:, None])
    member_keys = _keys_at(matrix, members, "distance")
    member_before = _precedes(member_keys, members, target_keys[:, None], target_columns[:, None])
    subset_ranks = (others & member_before).sum(axis=1)

    metrics = {f"recall@{k}": float(np.mean(ranks < k) * 100) for k in CIRR_KS}
    metrics.update({f"recall_subset@{k}": float(np.mean(subset_ranks < k) * 100) for k in CIRR_SUBSET_KS})
    return metrics


def circo_metrics(
    similarity: Any,
    gallery_names: Sequence[str],
    targets: Sequence[str],
    ground_truths: Sequence[Sequence[str]],
) -> dict[str, float]:
    """CIRCO mAP@5/10/25/50 over all ground truths and Recall@5/10/25/50 of the annotated target (percent).

    Ground truths must be in the gallery, unique per query, and include the target. With a gallery smaller than
    50, the ranking simply ends early (the official code would fail).
    """
    matrix = _as_matrix(similarity)
    n_rows = matrix.shape[0]
    index = _gallery_index(gallery_names, matrix.shape[1])
    target_columns = _columns_of(targets, index, "targets", n_rows)
    if any(len(set(truths)) != len(truths) for truths in ground_truths):
        raise ValueError("a query lists the same ground truth twice")
    truth_columns = _padded_columns(ground_truths, index, "ground truths", n_rows)
    truth_counts = (truth_columns >= 0).sum(axis=1)
    if np.any(truth_counts == 0):
        raise ValueError("a query has no ground truths")
    if not np.all((truth_columns == target_columns[:, None]).any(axis=1)):
        raise ValueError("a target is not among its query's ground truths")

    depth = min(max(CIRCO_KS), matrix.shape[1])
    top = _top_columns(matrix, depth, "similarity", excluded=None)
    hits = (top[:, :, None] == truth_columns[:, None, :]).any(axis=2)
    precision_at_hits = np.cumsum(hits, axis=1) * hits / np.arange(1, depth + 1)
    target_hits = top == target_columns[:, None]

    metrics = {}
    for k in CIRCO_KS:
        average_precision = precision_at_hits[:, :k].sum(axis=1) / np.minimum(truth_counts, k)
        metrics[f"map@{k}"] = float(np.mean(average_precision) * 100)
    for k in CIRCO_KS:
        metrics[f"recall@{k}"] = float(np.mean(target_hits[:, :k].any(axis=1)) * 100)
    return metrics


def clothing_cir_metrics(
    similarity: Any,
    gallery_names: Sequence[str],
    references: Sequence[str],
    ground_truths: Sequence[Sequence[str]],
    kinds: Sequence[str],
) -> dict[str, Any]:
    """clothing-cir mAP@5/10/25 and Recall@1/5/10 (percent) with the reference removed from the ranking, overall
    and under ``by_type`` for each query type (in order of first appearance); ``per_query`` holds each query's
    AP@10 (percent, query order) for paired comparisons (`fti4cir.evaluation.intervals`).

    Ground truths must be in the gallery, unique per query, and not the reference.
    """
    matrix = _as_matrix(similarity)
    n_rows = matrix.shape[0]
    index = _gallery_index(gallery_names, matrix.shape[1])
    reference_columns = _columns_of(references, index, "references", n_rows)
    if any(len(set(truths)) != len(truths) for truths in ground_truths):
        raise ValueError("a query lists the same ground truth twice")
    truth_columns = _padded_columns(ground_truths, index, "ground truths", n_rows)
    truth_counts = (truth_columns >= 0).sum(axis=1)
    if np.any(truth_counts == 0):
        raise ValueError("a query has no ground truths")
    if np.any(truth_columns == reference_columns[:, None]):
        raise ValueError("a reference is among its query's ground truths")
    if len(kinds) != n_rows:
        raise ValueError(f"{len(kinds)} query types for {n_rows} queries")

    depth = min(max(CLOTHING_MAP_KS + CLOTHING_RECALL_KS), matrix.shape[1] - 1)
    top = _top_columns(matrix, depth, "similarity", excluded=reference_columns)
    hits = (top[:, :, None] == truth_columns[:, None, :]).any(axis=2)
    precision_at_hits = np.cumsum(hits, axis=1) * hits / np.arange(1, depth + 1)
    per_query = {
        f"map@{k}": precision_at_hits[:, :k].sum(axis=1) / np.minimum(truth_counts, k) for k in CLOTHING_MAP_KS
    }
    per_query.update({f"recall@{k}": hits[:, :k].any(axis=1).astype(np.float64) for k in CLOTHING_RECALL_KS})

    def summary(rows: np.ndarray) -> dict[str, float]:
        return {name: float(np.mean(values[rows]) * 100) for name, values in per_query.items()}

    kinds = np.asarray(kinds)
    result: dict[str, Any] = summary(np.arange(n_rows))
    result["by_type"] = {
        kind: {"queries": int((kinds == kind).sum()), **summary(np.flatnonzero(kinds == kind))}
        for kind in dict.fromkeys(kinds.tolist())
    }
    result["per_query"] = {CLOTHING_PAIRED_METRIC: (per_query[CLOTHING_PAIRED_METRIC] * 100).tolist()}
    return result
