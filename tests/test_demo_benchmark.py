"""clothing-cir: the committed benchmark file against the committed labels, its generator, its metrics, and
`fti4cir evaluate --dataset clothing-cir` with the tiny random model (all methods, M2C included)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import random_m2c
from fti4cir.commands import demo as commands
from fti4cir.commands import evaluate as evaluate_command
from fti4cir.demo.benchmark import PHRASINGS, QUERY_TYPES, generate, labels_digest, phrase
from fti4cir.demo.world import CLASS_WORDS
from fti4cir.errors import UserError
from fti4cir.evaluation.datasets import load_benchmark
from fti4cir.evaluation.metrics import clothing_cir_metrics
from fti4cir.m2c import save_m2c_weights

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "data" / "clothing-cir"
LABELS = REPO / "data" / "clothing" / "labels.json"


@pytest.fixture(scope="module")
def labels():
    return json.loads(LABELS.read_text())


@pytest.fixture(scope="module")
def committed():
    return json.loads((ROOT / "queries.json").read_text())


def test_ground_truths_are_every_other_test_photo_of_the_target_class_and_colour(labels, committed):
    by_name = {p["path"].removeprefix("test/"): p for p in labels["photos"] if p["split"] == "test"}
    assert committed["gallery"] == sorted(by_name)
    for q in committed["queries"]:
        reference = by_name[q["reference"]]
        assert (q["reference_class"], q["reference_colour"]) == (reference["class"], reference["colour"])
        expected = sorted(
            n
            for n, p in by_name.items()
            if n != q["reference"] and (p["class"], p["colour"]) == (q["target_class"], q["target_colour"])
        )
        assert sorted(q["ground_truths"]) == expected and expected
        assert q["reference"] not in q["ground_truths"]
        same_class, same_colour = q["target_class"] == reference["class"], q["target_colour"] == reference["colour"]
        assert (same_class, same_colour) == {"colour": (True, False), "class": (False, True), "both": (False, False)}[
            q["type"]
        ]


def test_query_types_are_balanced_phrased_several_ways_and_name_the_target(committed):
    queries = committed["queries"]
    counts = Counter(q["type"] for q in queries)
    assert set(counts) == set(QUERY_TYPES) and len(set(counts.values())) == 1 and len(queries) >= 240
    assert len({q["id"] for q in queries}) == len(queries)
    for kind in QUERY_TYPES:
        texts = [q["text"] for q in queries if q["type"] == kind]
        assert len(set(texts)) >= 20
    for q in queries:
        if q["type"] != "class":
            assert q["target_colour"] in q["text"].split()
        if q["type"] != "colour":
            assert CLASS_WORDS[q["target_class"]] in q["text"].split()


def test_the_committed_file_is_what_the_generator_makes_from_the_committed_labels(labels, committed):
    generator = committed["generator"]
    assert generator["labels_sha1"] == labels_digest(labels)
    again = generate(labels, seed=generator["seed"], per_type=generator["per_type"])
    assert again["queries"] == committed["queries"] and again["gallery"] == committed["gallery"]
    assert generate(labels, seed=generator["seed"] + 1, per_type=generator["per_type"])["queries"] != again["queries"]
    with pytest.raises(UserError):
        generate(labels, per_type=10_000)


def test_phrasings_agree_in_number():
    assert phrase(PHRASINGS["colour"][0], "pants", "red", "pants", "blue") == "are blue"
    assert phrase(PHRASINGS["class"][0], "dress", "red", "skirt", "red") == "is a skirt instead"
    assert phrase(PHRASINGS["class"][0], "dress", "red", "shoes", "red") == "are shoes instead"
    assert phrase(PHRASINGS["both"][1], "shoes", "red", "skirt", "blue") == "make them a blue skirt"


def test_demo_benchmark_command_writes_a_file_the_loader_reads(tmp_path):
    out = tmp_path / "bench" / "queries.json"
    from conftest import run_subcommand

    assert (
        run_subcommand(
            commands,
            [
                "demo-benchmark",
                "--out",
                str(out),
                "--per-type",
                "5",
                "--seed",
                "4",
                "--photos",
                str(REPO / "data" / "clothing"),
            ],
        )
        == 0
    )
    benchmark = load_benchmark("clothing-cir", out.parent, "test")
    assert len(benchmark.queries) == 15 and len(benchmark.images) == 372
    assert all(path.is_file() for path in benchmark.images.values())
    assert {q.kind for q in benchmark.queries} == set(QUERY_TYPES)
    assert all(q.target == q.ground_truths[0] for q in benchmark.queries)


def test_loader_refuses_a_reference_among_its_ground_truths(tmp_path, committed):
    broken = json.loads(json.dumps(committed))
    broken["queries"][0]["ground_truths"].append(broken["queries"][0]["reference"])
    (tmp_path / "queries.json").write_text(json.dumps(broken))
    with pytest.raises(UserError, match="reference"):
        load_benchmark("clothing-cir", tmp_path, "test")


def test_metrics_remove_the_reference_and_average_over_all_ground_truths():
    gallery = ["r", "a", "b", "c", "d"]
    # query 0: ranking without the reference: a (gt), c, b (gt), d -> AP@5 = (1/1 + 2/3) / 2; hit at rank 1
    # query 1: ranking without the reference: c, d, b, a (gt) -> AP@5 = (1/4) / 1; first hit at rank 4
    similarity = np.array([[0.99, 0.9, 0.7, 0.8, 0.1], [0.5, 0.1, 0.2, 0.9, 0.8]])
    m = clothing_cir_metrics(similarity, gallery, ["r", "b"], [["a", "b"], ["a"]], ["colour", "class"])
    assert m["map@5"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 4) / 2 * 100)
    assert m["recall@1"] == pytest.approx(50) and m["recall@5"] == pytest.approx(100)
    assert m["by_type"]["colour"]["map@5"] == pytest.approx((1 + 2 / 3) / 2 * 100)
    assert m["per_query"]["map@10"] == pytest.approx([(1 + 2 / 3) / 2 * 100, 25.0])
    assert m["by_type"]["class"] == {
        "queries": 1,
        **{
            k: pytest.approx(v)
            for k, v in {
                "map@5": 25.0,
                "map@10": 25.0,
                "map@25": 25.0,
                "recall@1": 0.0,
                "recall@5": 100.0,
                "recall@10": 100.0,
            }.items()
        },
    }
    with pytest.raises(ValueError, match="reference"):
        clothing_cir_metrics(similarity, gallery, ["a", "b"], [["a"], ["a"]], ["colour", "class"])


def test_evaluate_runs_every_method_on_clothing_cir(tmp_path, tiny_backbone):
    m2c_weights = save_m2c_weights(random_m2c(tiny_backbone, 2, seed=3), tmp_path / "m2c.safetensors")
    from conftest import run_subcommand

    out = tmp_path / "out"
    assert (
        run_subcommand(
            evaluate_command,
            [
                "evaluate",
                "--dataset",
                "clothing-cir",
                "--root",
                str(ROOT),
                "--max-queries",
                "9",
                "--subset-gallery",
                "12",
                "--backbone",
                "fti4cir-tiny",
                "--pretrained",
                "none",
                "--device",
                "cpu",
                "--num-workers",
                "0",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--m2c-weights",
                str(m2c_weights),
                "--out",
                str(out),
            ],
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    methods = ["fti4cir", "subject-only", "image-only", "text-only", "image+text", "m2c", "m2c+compose"]
    assert list(results["methods"]) == methods and results["split"] == "test"
    assert results["prompts"]["fti4cir"] == "a photo of * with {attrs}but {text}"
    keys = {"map@5", "map@10", "map@25", "recall@1", "recall@5", "recall@10"}
    for metrics in results["methods"].values():
        assert keys < set(metrics) and all(0 <= metrics[k] <= 100 for k in keys)
        assert {kind: v["queries"] for kind, v in metrics["by_type"].items()} == {"colour": 9}  # first 9: colour
    markdown = (out / "results.md").read_text()
    assert "| method | mAP@5 | mAP@10 | mAP@25 | R@1 | R@5 | R@10 |" in markdown
    assert "| m2c+compose | colour | 9 |" in markdown
    # the goals' comparisons, query by query: fti4cir against every other method, m2c+compose against m2c
    pairs = [(d["better"], d["other"]) for d in results["differences"]]
    assert pairs == [("fti4cir", m) for m in methods[1:]] + [("m2c+compose", "m2c")]
    for d in results["differences"]:
        per_query = [results["methods"][m]["per_query"]["map@10"] for m in (d["better"], d["other"])]
        assert d["queries"] == 9 and d["difference"] == pytest.approx(sum(per_query[0]) / 9 - sum(per_query[1]) / 9)
        assert d["low"] <= d["difference"] <= d["high"]
    assert "| fti4cir - text-only |" in markdown and "| m2c+compose - m2c |" in markdown


def test_a_validation_benchmark_for_choosing_settings(tmp_path):
    """`demo-benchmark --split validation` asks about the validation photos only; the loader reads it as that split
    and refuses it as the test split."""
    from conftest import run_subcommand

    out = tmp_path / "val" / "queries.json"
    argv = ["demo-benchmark", "--out", str(out), "--per-type", "4", "--split", "validation"]
    assert run_subcommand(commands, [*argv, "--photos", str(REPO / "data" / "clothing")]) == 0
    benchmark = load_benchmark("clothing-cir", out.parent, "validation")
    assert len(benchmark.queries) == 12 and len(benchmark.images) == 341
    assert all(path.parent.parent.name == "validation" for path in benchmark.images.values())
    with pytest.raises(UserError, match="validation"):
        load_benchmark("clothing-cir", out.parent, "test")
    with pytest.raises(UserError, match="validation"):  # fashioniq has no such split
        run_subcommand(
            evaluate_command,
            ["evaluate", "--dataset", "fashioniq", "--root", str(tmp_path), "--split", "validation"],
        )


def test_evaluate_refuses_a_split_clothing_cir_does_not_have(tmp_path):
    from conftest import run_subcommand

    with pytest.raises(UserError, match="test"):
        run_subcommand(
            evaluate_command,
            [
                "evaluate",
                "--dataset",
                "clothing-cir",
                "--root",
                str(ROOT),
                "--split",
                "val",
                "--backbone",
                "fti4cir-tiny",
                "--pretrained",
                "none",
            ],
        )


def test_a_ranking_by_the_labels_scores_full_marks_and_the_reference_alone_scores_none(labels, committed):
    benchmark = load_benchmark("clothing-cir", ROOT, "test")
    gallery = list(benchmark.images)
    by_name = {p["path"].removeprefix("test/"): p for p in labels["photos"] if p["split"] == "test"}
    queries = {q["id"]: q for q in committed["queries"]}
    oracle = np.array(
        [
            [
                float(
                    (by_name[n]["class"], by_name[n]["colour"])
                    == (queries[q.query_id]["target_class"], queries[q.query_id]["target_colour"])
                )
                for n in gallery
            ]
            for q in benchmark.queries
        ]
    )
    refs, truths, kinds = (
        [q.reference for q in benchmark.queries],
        [q.ground_truths for q in benchmark.queries],
        [q.kind for q in benchmark.queries],
    )
    perfect = clothing_cir_metrics(oracle, gallery, refs, truths, kinds)
    assert all(perfect[k] == pytest.approx(100) for k in ("map@5", "map@10", "map@25", "recall@1", "recall@10"))
    # the reference itself ranked first: removed from the ranking, so it earns nothing and costs nothing
    with_reference = oracle + np.array([[2.0 * (n == q.reference) for n in gallery] for q in benchmark.queries])
    assert clothing_cir_metrics(with_reference, gallery, refs, truths, kinds)["map@10"] == pytest.approx(100)
    worst = clothing_cir_metrics(-oracle, gallery, refs, truths, kinds)
    assert worst["recall@10"] < 5 and worst["map@10"] < 5
