"""Official FashionIQ / CIRR / CIRCO metrics: hand-computed cases, ties, edge cases, and a loop reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fti4cir.evaluation import metrics
from fti4cir.evaluation.metrics import (
    circo_metrics,
    cirr_metrics,
    fashioniq_average,
    fashioniq_recall,
    rank_names,
    rank_within_groups,
)


def _names(n):
    return [f"img{i}" for i in range(n)]


def _similarity_for_rankings(rankings, n):
    """Similarities under which row q ranks gallery columns in the order ``rankings[q]`` (rest after, by column)."""
    similarity = np.zeros((len(rankings), n), dtype=np.float32)
    for row, order in enumerate(rankings):
        similarity[row, list(order)] = np.linspace(1.0, 0.5, len(order), dtype=np.float32)
    return similarity


# --- rank_names ----------------------------------------------------------------------------------------------------


def test_rank_names_orders_by_similarity_and_breaks_ties_by_gallery_order():
    similarity = np.array([[0.1, 0.9, 0.5, 0.9, 0.5], [0.3, 0.3, 0.3, 0.3, 0.3]], dtype=np.float32)
    ranked = rank_names(similarity, list("abcde"))
    assert ranked.tolist() == [list("bdcea"), list("abcde")]
    assert rank_names(similarity, list("abcde"), k=2).tolist() == [["b", "d"], ["a", "b"]]


def test_rank_names_excludes_one_name_per_query():
    similarity = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.4]], dtype=np.float32)
    ranked = rank_names(similarity, list("abc"), exclude=["b", "c"])
    assert ranked.tolist() == [["c", "a"], ["a", "b"]]
    with pytest.raises(ValueError, match="k must be between 1 and 2"):
        rank_names(similarity, list("abc"), k=3, exclude=["b", "c"])


def test_rank_names_top_k_equals_stable_full_sort_under_heavy_ties():
    rng = np.random.default_rng(0)
    similarity = rng.integers(0, 4, size=(7, 40)).astype(np.float32) / 4  # many exact ties
    names = _names(40)
    expected = np.asarray(names)[np.argsort(1 - similarity, axis=1, kind="stable")]
    for k in (1, 5, 13, 39, 40):
        assert (rank_names(similarity, names, k=k) == expected[:, :k]).all()


def test_distance_ranking_keeps_the_ties_created_by_one_minus_similarity():
    low = np.float32(0.26)
    high = np.nextafter(low, np.float32(1))  # a larger similarity that rounds to the same float32 distance
    assert high > low and np.float32(1) - high == np.float32(1) - low
    assert (1 - torch.tensor([low, high]))[0] == (1 - torch.tensor([low, high]))[1]  # as in the official torch code
    similarity = np.array([[low, high]], dtype=np.float32)
    assert rank_names(similarity, ["low", "high"]).tolist() == [["low", "high"]]  # tie: earlier column first
    assert rank_names(similarity, ["low", "high"], order_by="similarity").tolist() == [["high", "low"]]


def test_rank_names_accepts_torch_and_half_precision():
    similarity = torch.tensor([[0.2, 0.7, 0.4]], dtype=torch.bfloat16)
    assert rank_names(similarity, list("xyz")).tolist() == [["y", "z", "x"]]
    assert rank_names(np.float16([[0.2, 0.7, 0.4]]), list("xyz"))[0, 0] == "y"


@pytest.mark.parametrize(
    ("similarity", "names", "message"),
    [
        (np.zeros((2, 3), dtype=np.float32), ["a", "b"], "2 gallery names for 3"),
        (np.zeros((2, 2), dtype=np.float32), ["a", "a"], "not unique"),
        (np.array([[0.1, np.nan]], dtype=np.float32), ["a", "b"], "NaN"),
        (np.zeros((2, 2), dtype=np.int64), ["a", "b"], "float"),
        (np.zeros(3, dtype=np.float32), ["a", "b", "c"], "2-D"),
    ],
)
def test_rank_names_rejects_bad_input(similarity, names, message):
    with pytest.raises(ValueError, match=message):
        rank_names(similarity, names)


# --- FashionIQ -----------------------------------------------------------------------------------------------------


def test_fashioniq_recall_hand_computed():
    n = 60
    names = _names(n)
    # Target ranked 0, 9, 10, 49, 50 (0-based): R@10 = 2/5, R@50 = 4/5.
    target_ranks = [0, 9, 10, 49, 50]
    rankings = [[c for c in range(n) if c != 7][:rank] + [7] for rank in target_ranks]
    similarity = _similarity_for_rankings(rankings, n)
    result = fashioniq_recall(similarity, names, ["img7"] * 5)
    assert result == pytest.approx({"recall@10": 40.0, "recall@50": 80.0})


def test_fashioniq_keeps_the_reference_in_the_gallery_and_ties_go_to_earlier_columns():
    names = _names(12)
    similarity = np.zeros((2, 12), dtype=np.float32)
    # Row 0: columns 0..9 tie with target column 10 -> target is 11th -> miss at 10.
    similarity[0, :11] = 0.5
    # Row 1: target column 0 ties with ten later columns -> ranked first.
    similarity[1, :11] = 0.5
    result = fashioniq_recall(similarity, names, ["img10", "img0"])
    assert result["recall@10"] == pytest.approx(50.0)
    assert result["recall@50"] == pytest.approx(100.0)


def test_fashioniq_recall_rejects_targets_outside_the_gallery():
    with pytest.raises(ValueError, match="targets not in the gallery"):
        fashioniq_recall(np.zeros((1, 2), dtype=np.float32), ["a", "b"], ["c"])


def test_fashioniq_average_matches_the_paper_columns():
    per_category = {
        "dress": {"recall@10": 20.0, "recall@50": 40.0},
        "shirt": {"recall@10": 30.0, "recall@50": 50.0},
        "toptee": {"recall@10": 40.0, "recall@50": 90.0},
    }
    result = fashioniq_average(per_category)
    assert result["shirt"] == per_category["shirt"]
    assert result["average"] == pytest.approx({"recall@10": 30.0, "recall@50": 60.0, "mean": 45.0})


# --- CIRR ----------------------------------------------------------------------------------------------------------


def test_cirr_target_right_after_the_removed_reference_moves_up():
    names = _names(8)
    group = ["img0", "img1", "img2", "img3", "img4", "img5"]
    # Query 0: reference img0 ranked first, target img1 second -> rank 0 after removal.
    # Query 1: target img1 first, reference img0 second -> still rank 0.
    # Query 2: img6, img7 (outside the group), reference img0, img2, img3, target img1.
    rankings = [[0, 1], [1, 0], [6, 7, 0, 2, 3, 1]]
    similarity = _similarity_for_rankings(rankings, 8)
    result = cirr_metrics(similarity, names, ["img0"] * 3, ["img1"] * 3, [group] * 3)
    # Global ranks without reference: 0, 0, 4 -> R@1 = 2/3, R@5 = 1.
    assert result["recall@1"] == pytest.approx(200 / 3)
    assert result["recall@5"] == result["recall@10"] == result["recall@50"] == pytest.approx(100.0)
    # Subset ranks (group minus reference): 0, 0, 2 (img2, img3 before img1) -> R_s@1 = R_s@2 = 2/3, R_s@3 = 1.
    assert result["recall_subset@1"] == pytest.approx(200 / 3)
    assert result["recall_subset@2"] == pytest.approx(200 / 3)
    assert result["recall_subset@3"] == pytest.approx(100.0)


def test_cirr_subset_ties_follow_gallery_order():
    names = _names(6)
    group = names
    similarity = np.full((2, 6), 0.5, dtype=np.float32)  # everything tied
    # Query 0: reference img0, target img3 -> members img1, img2 before it -> subset rank 2, global rank 2.
    # Query 1: reference img4, target img1 -> only img0 before it -> subset rank 1.
    result = cirr_metrics(similarity, names, ["img0", "img4"], ["img3", "img1"], [group, group])
    assert result["recall@1"] == pytest.approx(0.0)
    assert result["recall_subset@1"] == pytest.approx(0.0)
    assert result["recall_subset@2"] == pytest.approx(50.0)
    assert result["recall_subset@3"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("reference", "target", "group", "message"),
    [
        ("img0", "img0", ["img0", "img1"], "equals its reference"),
        ("img0", "img1", ["img0", "img2"], "not a member"),
        ("img0", "img1", ["img0", "img1", "zzz"], "group members not in the gallery"),
        ("zzz", "img1", ["img0", "img1"], "references not in the gallery"),
    ],
)
def test_cirr_rejects_inconsistent_annotations(reference, target, group, message):
    with pytest.raises(ValueError, match=message):
        cirr_metrics(np.zeros((1, 3), dtype=np.float32), _names(3), [reference], [target], [group])


def test_rank_within_groups_drops_the_reference_and_follows_the_global_order():
    names = _names(7)
    similarity = _similarity_for_rankings([[6, 3, 0, 5, 1, 2, 4]], 7)
    ranked = rank_within_groups(similarity, names, [["img0", "img1", "img2", "img3", "img5"]], ["img3"], k=3)
    assert ranked.tolist() == [["img0", "img5", "img1"]]
    with pytest.raises(ValueError, match="fewer than 3"):
        rank_within_groups(similarity, names, [["img0", "img1", "img3"]], ["img3"], k=3)


def _official_cirr(similarity, names, references, targets, groups):
    """Loop transcription of the official CIRR protocol: stable argsort of 1 - s, drop reference, filter group."""
    names = np.asarray(names)
    recalls, subsets = [], []
    for row, reference, target, group in zip(similarity, references, targets, groups):
        ranked = [n for n in names[np.argsort(np.float32(1) - row, kind="stable")] if n != reference]
        in_group = [n for n in ranked if n in group]
        recalls.append(ranked.index(target))
        subsets.append(in_group.index(target))
    recalls, subsets = np.array(recalls), np.array(subsets)
    result = {f"recall@{k}": np.mean(recalls < k) * 100 for k in (1, 5, 10, 50)}
    result.update({f"recall_subset@{k}": np.mean(subsets < k) * 100 for k in (1, 2, 3)})
    return result


@pytest.mark.parametrize("chunk_elements", [1 << 22, 150])  # the small value forces many row chunks
def test_cirr_matches_official_loop_on_random_tied_scores(monkeypatch, chunk_elements):
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(1)
    n, q = 70, 40
    names = _names(n)
    similarity = (rng.integers(0, 6, size=(q, n)) / 6).astype(np.float32)
    groups = [list(rng.choice(names, size=6, replace=False)) for _ in range(q)]
    references = [group[0] for group in groups]
    targets = [group[int(rng.integers(1, 6))] for group in groups]
    result = cirr_metrics(similarity, names, references, targets, groups)
    assert result == pytest.approx(_official_cirr(similarity, names, references, targets, groups))


# --- CIRCO ---------------------------------------------------------------------------------------------------------


def test_circo_map_with_fewer_ground_truths_than_k():
    names = _names(60)
    # Query 0: GTs img1 (target), img2 at positions 1 and 3 -> AP = (1 + 2/3) / 2 for every K.
    # Query 1: single GT img9 at position 6 -> AP@5 = 0, AP@10 = AP@25 = AP@50 = 1/6.
    rankings = [[1, 0, 2], [0, 2, 3, 4, 5, 9]]
    similarity = _similarity_for_rankings(rankings, 60)
    result = circo_metrics(similarity, names, ["img1", "img9"], [["img1", "img2"], ["img9"]])
    ap0 = (1 + 2 / 3) / 2
    assert result["map@5"] == pytest.approx((ap0 + 0) / 2 * 100)
    for k in (10, 25, 50):
        assert result[f"map@{k}"] == pytest.approx((ap0 + 1 / 6) / 2 * 100)
    assert result["recall@5"] == pytest.approx(50.0)
    assert result["recall@10"] == pytest.approx(100.0)


def test_circo_map_normalises_by_k_when_ground_truths_exceed_it():
    names = _names(60)
    truths = [f"img{i}" for i in range(7)]
    # All seven GTs in the first seven places: AP@5 = 5/min(7, 5) = 1, AP@10 = 7/7 = 1.
    # Shifted by one non-GT first: AP@5 = (1/2+2/3+3/4+4/5)/5, AP@10 = sum_{i=1..7} i/(i+1) / 7.
    rankings = [list(range(7)), [50, *range(7)]]
    similarity = _similarity_for_rankings(rankings, 60)
    result = circo_metrics(similarity, names, ["img0", "img0"], [truths, truths])
    shifted_at5 = (1 / 2 + 2 / 3 + 3 / 4 + 4 / 5) / 5
    shifted_at10 = sum(i / (i + 1) for i in range(1, 8)) / 7
    assert result["map@5"] == pytest.approx((1 + shifted_at5) / 2 * 100)
    assert result["map@10"] == pytest.approx((1 + shifted_at10) / 2 * 100)


def test_circo_keeps_the_reference_and_counts_only_the_target_for_recall():
    names = _names(60)
    # The target img3 at position 6; another GT at position 1 helps mAP but not recall.
    similarity = _similarity_for_rankings([[4, 10, 11, 12, 13, 3]], 60)
    result = circo_metrics(similarity, names, ["img3"], [["img3", "img4"]])
    assert result["recall@5"] == pytest.approx(0.0)
    assert result["recall@10"] == pytest.approx(100.0)
    assert result["map@5"] == pytest.approx(50.0)  # one hit at rank 1, divided by min(2, 5)


def test_circo_ties_at_the_top_50_boundary_go_to_earlier_columns():
    names = _names(100)
    similarity = np.full((2, 100), 0.5, dtype=np.float32)
    result = circo_metrics(similarity, names, ["img49", "img50"], [["img49"], ["img50"]])
    assert result["recall@50"] == pytest.approx(50.0)
    assert result["map@50"] == pytest.approx(100 / 50 / 2)


def _official_circo(similarity, names, targets, truths):
    names = np.asarray(names)
    out = {f"map@{k}": [] for k in (5, 10, 25, 50)} | {f"recall@{k}": [] for k in (5, 10, 25, 50)}
    for row, target, gts in zip(similarity, targets, truths):
        top = names[np.argsort(-row, kind="stable")[:50]]
        labels = np.isin(top, gts)
        precisions = np.cumsum(labels) * labels / np.arange(1, 51)
        for k in (5, 10, 25, 50):
            out[f"map@{k}"].append(precisions[:k].sum() / min(len(gts), k))
            out[f"recall@{k}"].append((top[:k] == target).sum())
    return {key: np.mean(values) * 100 for key, values in out.items()}


@pytest.mark.parametrize("chunk_elements", [1 << 22, 500])
def test_circo_matches_official_loop_on_random_tied_scores(monkeypatch, chunk_elements):
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", chunk_elements)
    rng = np.random.default_rng(2)
    n, q = 120, 30
    names = _names(n)
    similarity = torch.from_numpy((rng.integers(0, 8, size=(q, n)) / 8).astype(np.float32))
    truths = [list(rng.choice(names, size=int(rng.integers(1, 15)), replace=False)) for _ in range(q)]
    targets = [gts[0] for gts in truths]
    result = circo_metrics(similarity, names, targets, truths)
    assert result == pytest.approx(_official_circo(similarity.numpy(), names, targets, truths))


@pytest.mark.parametrize(
    ("target", "truths", "message"),
    [("img1", ["img0"], "not among"), ("img0", ["img0", "img0"], "twice"), ("img0", ["img0", "zzz"], "not in")],
)
def test_circo_rejects_inconsistent_ground_truths(target, truths, message):
    with pytest.raises(ValueError, match=message):
        circo_metrics(np.zeros((1, 3), dtype=np.float32), _names(3), [target], [truths])
