"""CIRR / CIRCO test-server files: rankings, official formats, validation and atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmark_fixtures import benchmark_root, circo_image_ids, write_circo_image_info
from fti4cir.evaluation.datasets import load_circo, load_cirr
from fti4cir.evaluation.submission import (
    circo_rankings,
    circo_submission,
    cirr_rankings,
    cirr_submission,
    validate_circo_submission,
    validate_cirr_submission,
    write_json_atomic,
)


def _names(n):
    return [f"img{i}" for i in range(n)]


def _cirr_inputs(q=4, n=60, seed=0):
    rng = np.random.default_rng(seed)
    names = _names(n)
    similarity = rng.random((q, n), dtype=np.float32)
    groups = [list(rng.choice(names, size=6, replace=False)) for _ in range(q)]
    references = [group[2] for group in groups]
    return similarity, names, references, groups


def test_cirr_rankings_exclude_the_reference_and_rank_group_members():
    similarity, names, references, groups = _cirr_inputs()
    top, group_top = cirr_rankings(similarity, names, references, groups)
    assert top.shape == (4, 50) and group_top.shape == (4, 3)
    for row, reference, group, ranked, ranked_group in zip(similarity, references, groups, top, group_top):
        order = [names[c] for c in np.argsort(-row, kind="stable") if names[c] != reference]
        assert ranked.tolist() == order[:50]
        assert ranked_group.tolist() == [name for name in order if name in group][:3]
        assert reference not in ranked_group


def test_cirr_submission_has_the_official_layout():
    similarity, names, references, groups = _cirr_inputs()
    pair_ids = [12063, 12064, 12065, 12066]
    recall, subset = cirr_submission(pair_ids, *cirr_rankings(similarity, names, references, groups))
    for obj, metric, length in ((recall, "recall", 50), (subset, "recall_subset", 3)):
        assert obj["version"] == "rc2" and obj["metric"] == metric
        assert set(obj) == {"version", "metric", "12063", "12064", "12065", "12066"}
        assert all(len(obj[str(p)]) == length and all(isinstance(n, str) for n in obj[str(p)]) for p in pair_ids)
    by_id = {"references": dict(zip(pair_ids, references)), "groups": dict(zip(pair_ids, groups))}
    validate_cirr_submission(subset, "recall_subset", pair_ids, **by_id)


def _valid_cirr(metric="recall", ids=("1", "2")):
    length = 50 if metric == "recall" else 3
    return {"version": "rc2", "metric": metric} | {i: _names(length) for i in ids}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda obj: obj.pop("2"), r"1 query ids missing \(2\)"),
        (lambda obj: obj.update({"3": _names(50)}), r"1 unexpected keys \(3\)"),
        (lambda obj: obj.update({"version": "rc1"}), "'version' must be 'rc2'"),
        (lambda obj: obj.update({"metric": "recall_subset"}), "'metric' must be 'recall'"),
        (lambda obj: obj.update({"1": _names(49)}), r"1 lists have not 50 entries \(1\)"),
        (lambda obj: obj.update({"1": [*_names(49), "img0"]}), "duplicate images"),
        (lambda obj: obj.update({"1": [*_names(49), 7]}), "invalid image names"),
        (lambda obj: obj.update({"1": "img0"}), "not a list"),
    ],
)
def test_validate_cirr_reports_the_reason(change, message):
    obj = _valid_cirr()
    validate_cirr_submission(obj, "recall", ["1", "2"])
    change(obj)
    with pytest.raises(ValueError, match=message):
        validate_cirr_submission(obj, "recall", [1, 2])


def test_validate_cirr_checks_references_groups_and_size():
    obj = _valid_cirr("recall_subset")
    with pytest.raises(ValueError, match="the reference image"):
        validate_cirr_submission(obj, "recall_subset", ["1", "2"], references={"1": "img1", "2": "img9"})
    with pytest.raises(ValueError, match="outside the query's group"):
        validate_cirr_submission(obj, "recall_subset", ["1", "2"], groups={"1": ["img0", "img1"], "2": _names(5)})
    validate_cirr_submission(obj, "recall_subset", ["1", "2"], groups={"1": _names(3), "2": _names(5)})
    long_names = {str(i): [f"{i}-{j}" + "x" * 100 for j in range(50)] for i in range(1000)}
    big = {"version": "rc2", "metric": "recall"} | long_names
    with pytest.raises(ValueError, match="5 MB"):
        validate_cirr_submission(big, "recall", range(1000))
    with pytest.raises(ValueError, match="metric must be one of"):
        validate_cirr_submission(obj, "precision", ["1", "2"])


def test_circo_rankings_keep_or_drop_the_reference_and_submission_uses_integer_ids():
    rng = np.random.default_rng(3)
    names = [str(100 + i) for i in range(80)]
    similarity = rng.random((3, 80), dtype=np.float32)
    best = [names[int(np.argmax(row))] for row in similarity]
    kept = circo_rankings(similarity, names)
    assert kept[:, 0].tolist() == best  # the official code leaves the reference in
    dropped = circo_rankings(similarity, names, references=best)
    assert not any(ref in row for ref, row in zip(best, dropped.tolist()))
    assert dropped[:, :49].tolist() == kept[:, 1:50].tolist()

    submission = circo_submission([0, 1, 2], dropped)
    assert list(submission) == ["0", "1", "2"]
    assert submission["1"] == [int(name) for name in dropped[1]]
    validate_circo_submission(submission, range(3), references=dict(enumerate(best)))
    with pytest.raises(ValueError, match="the reference image"):
        validate_circo_submission(circo_submission([0, 1, 2], kept), range(3), references=dict(enumerate(best)))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (list(range(49)), "not 50 entries"),
        ([*range(49), "48"], "duplicate images"),  # "48" and 48 are the same image for the server
        ([*range(49), True], "invalid image names"),
        ([*range(49), -5], "invalid image names"),
        ([*range(49), "12a"], "invalid image names"),
    ],
)
def test_validate_circo_reports_the_reason(entries, message):
    validate_circo_submission({"0": [*range(49), "49"]}, [0])  # decimal strings are accepted
    with pytest.raises(ValueError, match=message):
        validate_circo_submission({"0": entries}, [0])
    with pytest.raises(ValueError, match="query ids missing"):
        validate_circo_submission({"0": list(range(50))}, [0, 1])


def test_circo_submission_rejects_non_numeric_names():
    with pytest.raises(ValueError, match="integer ids"):
        circo_submission([0], [["abc"] * 50])


def test_write_json_atomic_replaces_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "out" / "cirr" / "recall.json"
    write_json_atomic(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    write_json_atomic(path, {"b": 1}, indent=2)
    assert json.loads(path.read_text()) == {"b": 1} and "\n" in path.read_text()
    with pytest.raises(TypeError):
        write_json_atomic(path, {"c": object()})
    assert json.loads(path.read_text()) == {"b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["recall.json"]


def test_full_cirr_test1_submission_validates(tmp_path):
    benchmark = load_cirr(benchmark_root(tmp_path, "cirr"), "test")
    names = list(benchmark.images)
    queries = benchmark.queries
    similarity = np.random.default_rng(4).random((len(queries), len(names)), dtype=np.float32)
    references = [q.reference for q in queries]
    top, group_top = cirr_rankings(similarity, names, references, [q.group for q in queries])
    ids = [q.query_id for q in queries]
    recall, subset = cirr_submission(ids, top, group_top)

    references_by_id = {q.query_id: q.reference for q in queries}
    validate_cirr_submission(recall, "recall", ids, references=references_by_id)
    groups_by_id = {q.query_id: q.group for q in queries}
    validate_cirr_submission(subset, "recall_subset", ids, references=references_by_id, groups=groups_by_id)
    for metric, obj in (("recall", recall), ("recall_subset", subset)):
        path = tmp_path / f"{metric}.json"
        write_json_atomic(path, obj)
        assert path.stat().st_size < 5 * 1024 * 1024
        validate_cirr_submission(json.loads(path.read_text()), metric, ids)


def test_full_circo_test_submission_validates(tmp_path):
    root = benchmark_root(tmp_path, "circo")
    ids = circo_image_ids(root, "test")
    write_circo_image_info(root, ids)
    benchmark = load_circo(root, "test")
    names = list(benchmark.images)
    queries = benchmark.queries
    similarity = np.random.default_rng(5).random((len(queries), len(names)), dtype=np.float32)
    references = [q.reference for q in queries]
    submission = circo_submission([q.query_id for q in queries], circo_rankings(similarity, names, references))

    path = tmp_path / "circo.json"
    write_json_atomic(path, submission)
    loaded = json.loads(path.read_text())
    # The CIRCO server requires the keys to be exactly 0..n-1.
    assert sorted(int(key) for key in loaded) == list(range(len(queries)))
    validate_circo_submission(loaded, range(len(queries)), references={q.query_id: q.reference for q in queries})
