"""`fti4cir evaluate` / `fti4cir submit` end to end: real annotation files, placeholder images, the tiny backbone.

Every run is a subset run (a few queries, a gallery cut to the images they use plus a few distractors), so the
metric values are meaningless; the tests check the pipeline: output formats, the official rules each benchmark
applies, and that a rerun is served from the feature cache.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark_fixtures import benchmark_root, circo_image_ids, make_placeholder_images, write_circo_image_info
from fti4cir import cli
from fti4cir.backbone import Backbone
from fti4cir.commands.common import spec_from_args
from fti4cir.compose import METHODS
from fti4cir.evaluation import run
from fti4cir.evaluation.datasets import FASHIONIQ_CATEGORIES, load_benchmark
from fti4cir.evaluation.metrics import cirr_metrics
from fti4cir.evaluation.submission import validate_circo_submission, validate_cirr_submission
from fti4cir.factory import create_model
from fti4cir.features import FileHashes
from fti4cir.inputs import load_image

TINY = ["--backbone", "fti4cir-tiny", "--pretrained", "none", "--device", "cpu", "--num-workers", "0"]
QUERIES, DISTRACTORS = 4, 6
METRIC_KEYS = {
    "cirr": {
        "recall@1",
        "recall@5",
        "recall@10",
        "recall@50",
        "recall_subset@1",
        "recall_subset@2",
        "recall_subset@3",
        "avg",
    },
    "circo": {"map@5", "map@10", "map@25", "map@50", "recall@5", "recall@10", "recall@25", "recall@50"},
}
HEADERS = {
    "cirr": "| method | R@1 | R@5 | R@10 | R@50 | Rs@1 | Rs@2 | Rs@3 | avg |",
    "circo": "| method | mAP@5 | mAP@10 | mAP@25 | mAP@50 | R@5 | R@10 | R@25 | R@50 |",
    "fashioniq": "| method | dress R@10 | dress R@50 | shirt R@10 | shirt R@50 | toptee R@10 | toptee R@50 "
    "| avg R@10 | avg R@50 | avg |",
}


def _invoke(*argv, seed=0):
    """`fti4cir <argv> --seed SEED`: the seed picks the random tiny backbone, as a checkpoint would."""
    return cli.main([str(a) for a in argv] + ["--seed", str(seed)])


@pytest.fixture(scope="module")
def visual_calls():
    """Counts images through the visual tower (both entry points) for the rest of the module."""
    counted = {"images": 0}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("encode_visual", "encode_image"):
            original = getattr(Backbone, name)

            def counting(self, images, _original=original):
                counted["images"] += len(images)
                return _original(self, images)

            patch.setattr(Backbone, name, counting)
        yield counted


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, visual_calls):
    """dataset -> the same subset evaluation run twice (memoised: several tests inspect the same runs)."""
    runs = {}

    def get(dataset):
        if dataset not in runs:
            folder = tmp_path_factory.mktemp(dataset)
            root, galleries = _root_with_images(folder, dataset, "val")
            args = _evaluate_args(dataset, root, folder)
            record = {"folder": folder, "root": root, "galleries": galleries}
            for key in ("first", "second"):
                before, stdout = visual_calls["images"], io.StringIO()
                with contextlib.redirect_stdout(stdout):
                    assert _invoke(*args) == 0
                record[key] = json.loads((folder / "out" / "results.json").read_text())
                record[key + " calls"] = visual_calls["images"] - before
                record[key + " stdout"] = stdout.getvalue()
                record[key + " markdown"] = (folder / "out" / "results.md").read_text()
            runs[dataset] = record
        return runs[dataset]

    return get


def _used_images(query):
    return {query.reference, *([query.target] if query.target else []), *query.ground_truths, *query.group}


def _subset_gallery(benchmark, distractors=DISTRACTORS):
    """What the subset mode must rank: images of the first QUERIES queries + the first `distractors` others."""
    used = set().union(*(_used_images(q) for q in benchmark.queries[:QUERIES]))
    others = [name for name in benchmark.images if name not in used][:distractors]
    return [name for name in benchmark.images if name in used or name in others]


def _root_with_images(tmp_path, dataset, split, distractors=DISTRACTORS):
    """A benchmark root on the real annotations with placeholder images for the subset run."""
    root = benchmark_root(tmp_path, dataset)
    if dataset == "circo":  # the gallery is the COCO image-info file: the queries' images plus 50 distractors
        write_circo_image_info(root, circo_image_ids(root, split, QUERIES) + list(range(1, 51)))
    galleries = {}
    for category in FASHIONIQ_CATEGORIES if dataset == "fashioniq" else [None]:
        benchmark = load_benchmark(dataset, root, split, category)
        galleries[category or dataset] = _subset_gallery(benchmark, distractors)
        # CIRCO submissions rank the whole (small) image-info gallery; elsewhere only the subset gets images
        make_placeholder_images(benchmark, benchmark.images if dataset == "circo" else galleries[category or dataset])
    return root, galleries


def _evaluate_args(dataset, root, tmp_path, *extra, cache="cache", batch_size=3):
    """A subset evaluation; by default batches of 3, so that batches split the queries and the images."""
    return [
        "evaluate",
        "--dataset",
        dataset,
        "--root",
        root,
        "--max-queries",
        QUERIES,
        "--subset-gallery",
        DISTRACTORS,
        "--out",
        tmp_path / "out",
        "--cache-dir",
        tmp_path / cache,
        "--batch-size",
        batch_size,
        *TINY,
        *extra,
    ]


@pytest.mark.parametrize("dataset", ["fashioniq", "cirr", "circo"])
def test_evaluate_writes_one_table(evaluated, dataset):
    runs = evaluated(dataset)
    results, markdown, galleries = runs["first"], runs["first markdown"], runs["galleries"]

    assert (results["dataset"], results["split"], results["protocol"]) == (dataset, "val", "subset")
    assert [p["name"] for p in results["parts"]] == list(galleries)
    for part in results["parts"]:
        assert part["queries"] == QUERIES and part["gallery"] == len(galleries[part["name"]])
        assert part["queries_total"] > QUERIES
    assert list(results["methods"]) == list(METHODS)
    assert results["prompts"] == {"fti4cir": run.prompts.DEFAULT, "subject-only": run.prompts.SUBJECT_ONLY}
    for values in results["methods"].values():
        if dataset == "fashioniq":
            assert set(values) == {*FASHIONIQ_CATEGORIES, "average"}
            assert set(values["average"]) == {"recall@10", "recall@50", "mean"}
            flat = [v for per_part in values.values() for v in per_part.values()]
        else:
            assert set(values) == METRIC_KEYS[dataset]
            flat = list(values.values())
        assert all(0 <= v <= 100 for v in flat)
    assert "Subset run, not comparable" in markdown
    table = markdown.splitlines()
    header = table.index(HEADERS[dataset])
    assert [row.split(" | ")[0] for row in table[header + 2 :]] == [f"| {m}" for m in METHODS]
    assert markdown in runs["first stdout"]


@pytest.mark.parametrize("dataset", ["fashioniq", "cirr", "circo"])
def test_rerun_computes_no_visual_features_and_gives_the_same_numbers(evaluated, dataset):
    runs = evaluated(dataset)
    expected_passes = len(set().union(*map(set, runs["galleries"].values())))  # references lie in the gallery
    assert runs["first"]["features"]["visual_passes"] == runs["first calls"] == expected_passes
    assert runs["second"]["features"]["visual_passes"] == runs["second calls"] == 0
    assert runs["second"]["methods"] == runs["first"]["methods"]


def test_cirr_metrics_match_a_direct_computation(evaluated):
    """image-only through the CLI equals ranking the references' own CLIP features (fp16, as cached) by hand.

    Batches of one image on both sides: a different batch composition can flip the fp16 rounding of a feature."""
    runs = evaluated("cirr")
    assert (
        _invoke(
            *_evaluate_args(
                "cirr", runs["root"], runs["folder"], "--methods", "image-only", cache="cache-batch-1", batch_size=1
            )
        )
        == 0
    )
    reported = json.loads((runs["folder"] / "out" / "results.json").read_text())["methods"]["image-only"]

    torch.manual_seed(0)
    model = create_model(spec_from_args(cli.build_parser().parse_args(["inspect", "x", *TINY[:6]])))
    benchmark = load_benchmark("cirr", runs["root"], "val")
    queries, gallery = benchmark.queries[:QUERIES], runs["galleries"]["cirr"]
    with torch.no_grad():
        pixels = model.preprocess([load_image(benchmark.images[name]) for name in gallery])
        features = torch.cat([model.backbone.encode_visual(image[None]).global_features for image in pixels])
        features = F.normalize(features.half().float(), dim=-1)
    similarity = features[[gallery.index(q.reference) for q in queries]] @ features.T
    expected = cirr_metrics(
        similarity.numpy(),
        gallery,
        [q.reference for q in queries],
        [q.target for q in queries],
        [q.group for q in queries],
    )
    assert {k: v for k, v in reported.items() if k != "avg"} == pytest.approx(expected)
    assert reported["avg"] == pytest.approx((expected["recall@5"] + expected["recall_subset@1"]) / 2)


def test_new_prompt_or_method_reuses_features_but_another_backbone_does_not(evaluated, visual_calls):
    runs = evaluated("cirr")
    folder, before = runs["folder"], visual_calls["images"]
    template = "a picture of * showing {attrs}, {text}"
    assert (
        _invoke(
            *_evaluate_args("cirr", runs["root"], folder, "--methods", "fti4cir,subject-only", "--prompt", template)
        )
        == 0
    )
    results = json.loads((folder / "out" / "results.json").read_text())
    assert visual_calls["images"] == before and results["features"]["visual_passes"] == 0
    assert results["prompts"]["fti4cir"] == template and list(results["methods"]) == ["fti4cir", "subject-only"]

    # another random backbone under the same name and tag must not read the first one's features
    assert _invoke(*_evaluate_args("cirr", runs["root"], folder, "--methods", "text-only"), seed=1) == 0
    assert visual_calls["images"] == before + runs["first calls"]


def test_submit_cirr_writes_both_official_files(tmp_path, capsys):
    root, galleries = _root_with_images(tmp_path, "cirr", "test1", distractors=40)
    out = tmp_path / "submission"
    assert (
        _invoke(
            "submit",
            "--dataset",
            "cirr",
            "--root",
            root,
            "--max-queries",
            QUERIES,
            "--subset-gallery",
            40,
            "--out",
            out,
            "--cache-dir",
            tmp_path / "cache",
            *TINY,
        )
        == 0
    )
    assert "partial submission" in capsys.readouterr().err

    queries = load_benchmark("cirr", root, "test").queries[:QUERIES]
    ids = [int(q.query_id) for q in queries]
    references = {q.query_id: q.reference for q in queries}
    groups = {q.query_id: q.group for q in queries}
    recall = json.loads((out / "cirr" / "fti4cir.json").read_text())
    subset = json.loads((out / "cirr" / "subset_fti4cir.json").read_text())
    assert (recall["version"], recall["metric"], subset["metric"]) == ("rc2", "recall", "recall_subset")
    validate_cirr_submission(recall, "recall", ids, references=references)
    validate_cirr_submission(subset, "recall_subset", ids, references=references, groups=groups)
    for query in queries:
        top50 = recall[query.query_id]
        assert len(set(top50)) == 50 and query.reference not in top50
        # the subset answer is the global ranking filtered to the group (members outside the top 50 rank later)
        in_top50 = [name for name in top50 if name in query.group][:3]
        assert subset[query.query_id][: len(in_top50)] == in_top50


def test_submit_circo_excludes_the_reference(tmp_path):
    root, _ = _root_with_images(tmp_path, "circo", "test")
    out = tmp_path / "submission"
    assert (
        _invoke(
            "submit",
            "--dataset",
            "circo",
            "--root",
            root,
            "--max-queries",
            QUERIES,
            "--method",
            "image+text",
            "--out",
            out,
            "--cache-dir",
            tmp_path / "cache",
            *TINY,
        )
        == 0
    )

    benchmark = load_benchmark("circo", root, "test")
    queries = benchmark.queries[:QUERIES]
    obj = json.loads((out / "circo" / "image+text.json").read_text())
    validate_circo_submission(
        obj, [q.query_id for q in queries], references={q.query_id: int(q.reference) for q in queries}
    )
    gallery = {int(name) for name in benchmark.images}
    for query in queries:
        assert len(obj[query.query_id]) == 50 and all(isinstance(i, int) and i in gallery for i in obj[query.query_id])


@pytest.mark.parametrize("command", ["evaluate", "submit"])
def test_missing_images_fail_before_any_model_work(tmp_path, monkeypatch, capsys, command):
    root = benchmark_root(tmp_path, "cirr")
    split = "val" if command == "evaluate" else "test1"
    benchmark = load_benchmark("cirr", root, split)
    make_placeholder_images(benchmark, list(benchmark.images)[:5])
    monkeypatch.setattr(
        "fti4cir.factory.create_model", lambda *a, **k: pytest.fail("model built despite missing images")
    )
    code = _invoke(
        command,
        "--dataset",
        "cirr",
        "--root",
        root,
        "--max-queries",
        2,
        "--out",
        tmp_path / "out",
        "--cache-dir",
        tmp_path / "cache",
        *TINY,
    )
    error = capsys.readouterr().err
    assert code == 2
    assert f"error: {len(benchmark.images) - 5} of {len(benchmark.images)} images missing for cirr" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "fti4cir,clip"], "--methods: unknown clip"),
        (["--categories", "dress,shoes"], "--categories: unknown shoes"),
        (["--prompt", "a photo of {text}"], "--prompt must be"),
    ],
)
def test_bad_options_are_user_errors(tmp_path, capsys, extra, message):
    root = benchmark_root(tmp_path, "fashioniq")
    assert _invoke("evaluate", "--dataset", "fashioniq", "--root", root, *TINY, *extra) == 2
    assert message in capsys.readouterr().err


def test_file_hashes_follow_content_changes(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"one")
    memo = FileHashes(tmp_path / "hashes.json")
    assert memo.known([path]) == [None]
    memo.record([path], ["h1"])
    memo.save()
    reopened = FileHashes(tmp_path / "hashes.json")
    assert reopened.known([path]) == ["h1"]
    path.write_bytes(b"other")  # new size (and mtime): the remembered hash is stale
    assert reopened.known([path]) == [None]
    (tmp_path / "hashes.json").write_text("{torn")  # a damaged memo only costs rehashing
    assert FileHashes(tmp_path / "hashes.json").known([path]) == [None]


def test_subset_selection_keeps_official_order_and_every_image_the_queries_use(tmp_path):
    root = benchmark_root(tmp_path, "cirr")
    benchmark = load_benchmark("cirr", root, "val")
    part = run.select("cirr", benchmark, QUERIES, DISTRACTORS)
    assert part.gallery == _subset_gallery(benchmark) and part.subset
    order = list(benchmark.images)
    assert [order.index(name) for name in part.gallery] == sorted(order.index(name) for name in part.gallery)
    full = run.select("cirr", benchmark)
    assert not full.subset and full.gallery == order and len(full.queries) == len(benchmark.queries)
    assert np.all([name in part.gallery for q in part.queries for name in _used_images(q)])
