"""Search stage: exact parity with numpy, approximate recall, exclusions, add/remove, persistence, validation."""

from __future__ import annotations

import numpy as np
import pytest

from fti4cir import search
from fti4cir.errors import UserError
from fti4cir.search import IndexSpec, VectorIndex, choose_index_spec, l2_normalize


def random_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, dim)))


def clustered_unit(n: int, dim: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Mixture of gaussians on the sphere (the shape of real CLIP features, in miniature)."""
    rng = np.random.default_rng(seed)
    centres = random_unit(n_clusters, dim, seed + 1)
    points = centres[rng.integers(0, n_clusters, n)] + 0.6 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return l2_normalize(points)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def numpy_top_k(base: np.ndarray, queries: np.ndarray, k: int):
    scores = queries @ base.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_exact_equals_numpy_ranking():
    base, queries = random_unit(3000, 64, seed=1), random_unit(7, 64, seed=2)
    index = VectorIndex.build(base, "exact")
    scores, ids = index.search(queries, 10)
    expected_scores, expected_ids = numpy_top_k(base, queries, 10)
    # Random gaussian data has no ties at this precision (seeded), so the order must match exactly.
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_equal_scores_are_ordered_by_ascending_id():
    base = random_unit(50, 16, seed=3)
    base[[31, 4, 17]] = base[9]  # four identical rows: identical scores for any query
    scores, ids = VectorIndex.build(base, "exact").search(base[9:10], 4)
    np.testing.assert_array_equal(ids[0], [4, 9, 17, 31])
    assert np.ptp(scores[0]) == 0


def test_ivf_recall_on_clustered_data():
    data = clustered_unit(20_200, 64, n_clusters=200, seed=4)
    base, queries = data[:20_000], data[20_000:]  # held-out points of the same clusters
    spec = choose_index_spec(len(base), 64, "ivf")
    index = VectorIndex.build(base, spec, seed=0)
    assert index.spec.kind == "ivf" and index.ntotal == 20_000
    _, truth = VectorIndex.build(base, "exact").search(queries, 10)
    _, found = index.search(queries, 10)
    assert recall_at_k(found, truth) >= 0.95
    index.set_nprobe(1)  # a single cell must do worse: the test can tell good from bad parameters
    assert recall_at_k(index.search(queries, 10)[1], truth) < recall_at_k(found, truth)


def test_hnsw_recall_and_no_removal():
    base = clustered_unit(3000, 32, n_clusters=30, seed=6)
    queries = random_unit(50, 32, seed=7) * 0.2 + base[:50]
    queries = l2_normalize(queries)
    index = VectorIndex.build(base, "hnsw")
    _, truth = VectorIndex.build(base, "exact").search(queries, 10)
    assert recall_at_k(index.search(queries, 10)[1], truth) >= 0.9
    with pytest.raises(UserError, match="cannot remove"):
        index.remove_ids([1])


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_exclude_ids_drops_per_query_ids(kind):
    base = clustered_unit(2000, 32, n_clusters=20, seed=8)
    index = VectorIndex.build(base, IndexSpec("ivf", nlist=16, nprobe=16) if kind == "ivf" else "exact")
    queries = base[[5, 6]]
    _, plain = index.search(queries, 10)
    assert plain[0, 0] == 5 and plain[1, 0] == 6  # each query finds itself first
    scores, ids = index.search(queries, 10, exclude_ids=[[5, 999_999, -3], [6, int(plain[1, 1])]])
    assert 5 not in ids[0] and 6 not in ids[1] and plain[1, 1] not in ids[1]
    np.testing.assert_array_equal(ids[0], plain[0, 1:].tolist() + [ids[0, -1]])  # the rest moves up one place
    np.testing.assert_array_equal(ids[1, :8], plain[1, 2:])
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_exclusions_leaving_fewer_than_k_pad_with_minus_one():
    base = random_unit(6, 8, seed=9)
    scores, ids = VectorIndex.build(base).search(base[:2], 6, exclude_ids=[[0, 1, 2], []])
    assert sorted(ids[0, :3]) == [3, 4, 5] and list(ids[0, 3:]) == [-1, -1, -1]
    assert np.all(np.isneginf(scores[0, 3:])) and sorted(ids[1]) == list(range(6))


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_remove_ids_renumbers_like_np_delete(kind):
    base = clustered_unit(1500, 16, n_clusters=10, seed=10)
    spec = IndexSpec("ivf", nlist=8, nprobe=8) if kind == "ivf" else IndexSpec("exact")  # full probe: exact results
    index = VectorIndex.build(base, spec)
    removed = [3, 700, 701, 1499, 5000]
    assert index.remove_ids(removed) == 4 and index.ntotal == 1496
    queries = random_unit(5, 16, seed=11)
    _, ids = index.search(queries, 10)
    _, expected = numpy_top_k(np.delete(base, removed[:4], axis=0), queries, 10)
    np.testing.assert_array_equal(ids, expected)


def test_add_appends_rows_with_next_ids():
    base = random_unit(100, 16, seed=12)
    index = VectorIndex.build(base[:60])
    new_ids = index.add(base[60:])
    np.testing.assert_array_equal(new_ids, np.arange(60, 100))
    _, ids = index.search(base[[75, 10]], 1)
    np.testing.assert_array_equal(ids[:, 0], [75, 10])


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    base = clustered_unit(1200, 24, n_clusters=12, seed=13)
    queries = random_unit(4, 24, seed=14)
    spec = choose_index_spec(len(base), 24, kind)
    index = VectorIndex.build(base, spec)
    if kind == "ivf":
        index.set_nprobe(3)  # a non-default search parameter must survive the round trip
    path = tmp_path / "gallery.faiss"
    index.save(path)
    loaded = VectorIndex.load(path)
    assert loaded.spec == index.spec and loaded.ntotal == 1200 and loaded.dim == 24
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["gallery.faiss"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "flipped_header"])
def test_damaged_index_file_is_a_user_error(tmp_path, damage):
    path = tmp_path / "gallery.faiss"
    VectorIndex.build(clustered_unit(800, 16, n_clusters=8, seed=15), IndexSpec("ivf", nlist=8, nprobe=2)).save(path)
    data = path.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "garbage": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "empty": b"",
        "flipped_header": b"XXXX" + data[4:],
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(UserError, match="index file is corrupted"):
        VectorIndex.load(path)


def test_missing_index_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        VectorIndex.load(tmp_path / "absent.faiss")


def test_auto_choice_switches_at_the_threshold(monkeypatch):
    threshold = search.EXACT_MAX_VECTORS
    assert choose_index_spec(threshold - 1, 512).kind == "exact"
    large = choose_index_spec(threshold, 512)
    assert large.kind == "ivf" and large.nprobe <= large.nlist
    at_million = choose_index_spec(1_000_000, 768)
    assert (at_million.nlist, at_million.nprobe) == (1024, 16)  # the measured setting (bench/RESULTS.md)
    assert choose_index_spec(10, 8, "approximate").kind == "ivf"
    monkeypatch.setattr(search, "EXACT_MAX_VECTORS", 500)
    assert VectorIndex.build(random_unit(400, 8)).spec.kind == "exact"
    assert VectorIndex.build(random_unit(1000, 8)).spec.kind == "ivf"


def test_invalid_inputs_are_user_errors():
    base = random_unit(20, 8, seed=16)
    index = VectorIndex.build(base)
    bad_queries = {
        "dimension": random_unit(2, 9),
        "non-finite": np.where(np.arange(8) == 3, np.nan, base[:1]),
        "normalised": base[:2] * 3,
        "2-D": base[0],
    }
    for message, queries in bad_queries.items():
        with pytest.raises(UserError, match=message):
            index.search(queries, 3)
    for k in (0, 21):
        with pytest.raises(UserError, match="k"):
            index.search(base[:1], k)
    with pytest.raises(UserError, match="zero|normalised"):
        VectorIndex.build(np.zeros((3, 8)))
    with pytest.raises(UserError, match="exclude_ids"):
        index.search(base[:2], 3, exclude_ids=[[1]])
    with pytest.raises(UserError, match="unknown index kind"):
        choose_index_spec(10, 8, "lsh")
    # float64 and float16 unit vectors are fine (converted to float32)
    np.testing.assert_array_equal(index.search(base[:1].astype(np.float16), 1)[1], [[0]])
