"""Prediction files for the CIRR and CIRCO test servers, and checks of their format.

CIRR (Cuberick-Orion/CIRR ``Test-split_server.md``): one JSON object per metric, with ``"version": "rc2"``,
``"metric": "recall"`` or ``"recall_subset"``, and for every test ``pairid`` (as a string key) the top-50 (recall)
or top-3 (recall_subset) image names. The file may not exceed 5 MB.

CIRCO (miccunifi/CIRCO README): a JSON object mapping every test query id (string key) to the top-50 retrieved
image ids. The README example lists integers; the server parses the lists with ``np.array(..., dtype=int)``, so
decimal strings pass as well. We write integers. The server does not reject duplicates, and a duplicated ground
truth would inflate AP, so duplicates are rejected here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fti4cir.evaluation.metrics import rank_names, rank_within_groups

CIRR_VERSION = "rc2"
CIRR_LENGTHS = {"recall": 50, "recall_subset": 3}
CIRR_MAX_BYTES = 5 * 1024 * 1024
CIRCO_LENGTH = 50

_EXAMPLES = 3  # ids quoted per problem in an error message


def cirr_rankings(
    similarity: Any,
    gallery_names: Sequence[str],
    references: Sequence[str],
    groups: Sequence[Sequence[str]],
) -> tuple[np.ndarray, np.ndarray]:
    """Top-50 names over the gallery and top-3 names within the group, the reference excluded from both.

    Ranked as the official CIRR code does (``1 - similarity``, ties to the earlier gallery column).
    """
    top = rank_names(similarity, gallery_names, k=CIRR_LENGTHS["recall"], exclude=references, order_by="distance")
    group_top = rank_within_groups(
        similarity, gallery_names, groups, exclude=references, k=CIRR_LENGTHS["recall_subset"]
    )
    return top, group_top


def circo_rankings(
    similarity: Any, gallery_names: Sequence[str], references: Sequence[str] | None = None
) -> np.ndarray:
    """Top-50 names ranked by similarity (as the official CIRCO code), without ``references`` when given.

    The official FTI4CIR/SEARLE CIRCO code keeps the reference in the ranking; pass ``references=None`` for that
    behaviour. No CIRCO val query lists its reference as a ground truth, so dropping it can only raise scores.
    """
    return rank_names(similarity, gallery_names, k=CIRCO_LENGTH, exclude=references, order_by="similarity")


def _prediction_lists(query_ids: Sequence[Any], ranked: Any, what: str) -> dict[str, list]:
    rows = np.asarray(ranked).tolist()
    if len(set(map(str, query_ids))) != len(query_ids):
        raise ValueError("query ids are not unique")
    if len(rows) != len(query_ids):
        raise ValueError(f"{len(rows)} {what} rows for {len(query_ids)} query ids")
    return {str(query_id): row for query_id, row in zip(query_ids, rows)}


def cirr_submission(query_ids: Sequence[Any], ranked_names_top50: Any, ranked_group_top3: Any) -> tuple[dict, dict]:
    """The recall and recall_subset submission objects, validated."""
    submissions = []
    for metric, ranked in (("recall", ranked_names_top50), ("recall_subset", ranked_group_top3)):
        submission: dict[str, Any] = {"version": CIRR_VERSION, "metric": metric}
        submission.update(_prediction_lists(query_ids, ranked, metric))
        validate_cirr_submission(submission, metric, query_ids)
        submissions.append(submission)
    return submissions[0], submissions[1]


def circo_submission(query_ids: Sequence[Any], ranked_names_top50: Any) -> dict[str, list[int]]:
    """The CIRCO submission object (image ids as integers), validated."""
    lists = _prediction_lists(query_ids, ranked_names_top50, "ranking")
    try:
        submission = {query_id: [int(name) for name in names] for query_id, names in lists.items()}
    except (TypeError, ValueError) as error:
        raise ValueError(f"CIRCO image names must be integer ids: {error}") from None
    validate_circo_submission(submission, query_ids)
    return submission


def _examples(ids: Iterable[str]) -> str:
    ids = list(ids)
    shown = ", ".join(ids[:_EXAMPLES])
    return f"{shown}, ..." if len(ids) > _EXAMPLES else shown


def _check_predictions(
    predictions: Mapping[str, Any],
    expected_ids: Iterable[Any],
    length: int,
    canonical: Callable[[Any], Hashable | None],
    excluded: Mapping[str, Hashable] | None,
    allowed: Mapping[str, set] | None,
) -> list[str]:
    """Problems of a {query id: ranked list} mapping, one line per kind of problem.

    ``canonical`` maps an image entry to the value compared for duplicates, exclusion and membership, or to None
    when the entry is not a valid image name; ``excluded`` and ``allowed`` hold such values.
    """
    expected = [str(query_id) for query_id in expected_ids]
    expected_set = set(expected)
    problems = []
    missing = [query_id for query_id in expected if query_id not in predictions]
    unexpected = [query_id for query_id in predictions if query_id not in expected_set]
    if missing:
        problems.append(f"{len(missing)} query ids missing ({_examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")

    kinds: dict[str, list[str]] = defaultdict(list)
    for query_id, ranked in predictions.items():
        if query_id not in expected_set:
            continue
        if not isinstance(ranked, list):
            kinds["not a list"].append(query_id)
            continue
        if len(ranked) != length:
            kinds[f"not {length} entries"].append(query_id)
        values = [canonical(name) for name in ranked]
        if None in values:
            kinds["invalid image names"].append(query_id)
            continue
        if len(set(values)) != len(values):
            kinds["duplicate images"].append(query_id)
        if excluded is not None and query_id in excluded and excluded[query_id] in values:
            kinds["the reference image"].append(query_id)
        if allowed is not None and query_id in allowed and not set(values) <= allowed[query_id]:
            kinds["images outside the query's group"].append(query_id)
    problems.extend(f"{len(ids)} lists have {kind} ({_examples(ids)})" for kind, ids in kinds.items())
    return problems


def _cirr_name(name: Any) -> str | None:
    return name if isinstance(name, str) and name else None


def validate_cirr_submission(
    obj: Any,
    metric: str,
    expected_ids: Iterable[Any],
    *,
    references: Mapping[Any, str] | None = None,
    groups: Mapping[Any, Sequence[str]] | None = None,
) -> None:
    """Raise ValueError listing what keeps ``obj`` from being a valid CIRR ``metric`` submission.

    Optionally also checks that no list contains its query's reference (``references``: pairid -> name) and, for
    recall_subset, that lists only hold members of the query's group (``groups``: pairid -> members).
    """
    if metric not in CIRR_LENGTHS:
        raise ValueError(f"metric must be one of {sorted(CIRR_LENGTHS)}, got {metric!r}")
    if not isinstance(obj, dict):
        raise ValueError(f"a CIRR submission is a JSON object, got {type(obj).__name__}")
    problems = []
    if obj.get("version") != CIRR_VERSION:
        problems.append(f"'version' must be {CIRR_VERSION!r}, got {obj.get('version')!r}")
    if obj.get("metric") != metric:
        problems.append(f"'metric' must be {metric!r}, got {obj.get('metric')!r}")
    predictions = {key: value for key, value in obj.items() if key not in ("version", "metric")}
    excluded = None if references is None else {str(query_id): name for query_id, name in references.items()}
    allowed = None
    if groups is not None and metric == "recall_subset":
        allowed = {str(query_id): set(members) for query_id, members in groups.items()}
    problems += _check_predictions(predictions, expected_ids, CIRR_LENGTHS[metric], _cirr_name, excluded, allowed)
    size = len(json.dumps(obj, separators=(",", ":")).encode("utf-8"))
    if size > CIRR_MAX_BYTES:
        problems.append(f"{size} bytes exceed the server's 5 MB limit")
    if problems:
        raise ValueError(f"invalid CIRR {metric} submission: " + "; ".join(problems))


def _circo_id(name: Any) -> int | None:
    """The integer id the server reads from an entry (an int or a decimal string), or None."""
    if isinstance(name, int) and not isinstance(name, bool) and name >= 0:
        return name
    if isinstance(name, str) and name.isascii() and name.isdigit():
        return int(name)
    return None


def validate_circo_submission(
    obj: Any, expected_ids: Iterable[Any], *, references: Mapping[Any, Any] | None = None
) -> None:
    """Raise ValueError listing what keeps ``obj`` from being a valid CIRCO submission.

    Image ids may be non-negative integers or decimal strings (both parse on the server); duplicates are compared
    by integer value. ``references`` (query id -> reference id), when given, must not appear in the lists.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"a CIRCO submission is a JSON object, got {type(obj).__name__}")
    excluded = None if references is None else {str(query_id): _circo_id(ref) for query_id, ref in references.items()}
    problems = _check_predictions(obj, expected_ids, CIRCO_LENGTH, _circo_id, excluded, None)
    if problems:
        raise ValueError("invalid CIRCO submission: " + "; ".join(problems))


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = None) -> None:
    """Write ``obj`` as JSON via a temporary file in the same folder, fsync and rename.

    Without ``indent`` the JSON is compact (keeps CIRR files well under the 5 MB limit).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    separators = (",", ":") if indent is None else None
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            json.dump(obj, handle, indent=indent, separators=separators)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
