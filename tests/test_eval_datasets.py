"""Benchmark readers on the real annotation files (placeholder images only where a test needs them)."""

from __future__ import annotations

import json

import pytest

from benchmark_fixtures import (
    benchmark_root,
    circo_image_ids,
    make_placeholder_images,
    write_circo_image_info,
)
from fti4cir.errors import UserError
from fti4cir.evaluation.datasets import (
    FASHIONIQ_CATEGORIES,
    Query,
    check_images_exist,
    load_benchmark,
    load_circo,
    load_cirr,
    load_fashioniq,
)


def _json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("category", FASHIONIQ_CATEGORIES)
def test_fashioniq_matches_annotation_files(tmp_path, category, split):
    root = benchmark_root(tmp_path, "fashioniq")
    captions = _json(root / "captions" / f"cap.{category}.{split}.json")
    gallery = _json(root / "image_splits" / f"split.{category}.{split}.json")

    benchmark = load_fashioniq(root, split, category)

    assert (benchmark.name, benchmark.split) == ("fashioniq", split)
    assert list(benchmark.images) == gallery
    assert benchmark.images[gallery[0]] == root / category / f"{gallery[0]}.jpg"
    assert len(benchmark.queries) == len(captions)
    last = len(captions) - 1
    assert benchmark.queries[last] == Query(
        query_id=f"{category}:{last}",
        reference=captions[last]["candidate"],
        texts=tuple(captions[last]["captions"]),  # raw, not stripped or joined
        target=captions[last]["target"] if split == "val" else None,
        category=category,
    )
    assert all(query.target is None for query in benchmark.queries) == (split == "test")
    assert all(query.reference in benchmark.images for query in benchmark.queries)


def test_fashioniq_uses_images_folder_only_without_category_folder(tmp_path):
    root = benchmark_root(tmp_path, "fashioniq")
    (root / "images").mkdir()
    fallback = load_fashioniq(root, "val", "dress")
    assert all(path.parent == root / "images" for path in fallback.images.values())

    (root / "dress").mkdir()
    official = load_fashioniq(root, "val", "dress")
    assert all(path.parent == root / "dress" for path in official.images.values())


@pytest.mark.parametrize("split", ["val", "test1", "test"])
def test_cirr_matches_annotation_files(tmp_path, split):
    root = benchmark_root(tmp_path, "cirr")
    file_split = "test1" if split == "test" else split
    captions = _json(root / "cirr" / "captions" / f"cap.rc2.{file_split}.json")
    relpaths = _json(root / "cirr" / "image_splits" / f"split.rc2.{file_split}.json")

    benchmark = load_cirr(root, split)

    assert benchmark.split == file_split
    assert list(benchmark.images) == list(relpaths)
    name, relpath = next(iter(relpaths.items()))
    assert relpath.startswith("./")
    assert benchmark.images[name] == root / relpath[2:]
    assert len(benchmark.queries) == len(captions)
    entry, query = captions[0], benchmark.queries[0]
    assert query.query_id == str(entry["pairid"])
    assert query.reference == entry["reference"]
    assert query.texts == (entry["caption"],)
    assert query.group == tuple(entry["img_set"]["members"]) and len(query.group) == 6
    assert query.target == (entry["target_hard"] if file_split == "val" else None)
    assert len({q.query_id for q in benchmark.queries}) == len(captions)


def test_circo_reads_gallery_from_coco_info(tmp_path):
    root = benchmark_root(tmp_path, "circo")
    annotations = _json(root / "annotations" / "val.json")
    ids = circo_image_ids(root, "val")
    write_circo_image_info(root, ids)

    benchmark = load_circo(root, "val")

    assert list(benchmark.images) == [str(image_id) for image_id in ids]
    first = ids[0]
    assert benchmark.images[str(first)] == root / "COCO2017_unlabeled" / "unlabeled2017" / f"{first:012d}.jpg"
    assert len(benchmark.queries) == len(annotations) == 220
    entry, query = annotations[5], benchmark.queries[5]
    assert query.query_id == str(entry["id"])
    assert query.reference == str(entry["reference_img_id"])
    assert query.texts == (entry["relative_caption"],)
    assert query.target == str(entry["target_img_id"]) == query.ground_truths[0]
    assert query.ground_truths == tuple(str(gt) for gt in entry["gt_img_ids"])


def test_circo_test_split_has_no_targets(tmp_path):
    root = benchmark_root(tmp_path, "circo")
    write_circo_image_info(root, circo_image_ids(root, "test"))
    benchmark = load_circo(root, "test")
    assert len(benchmark.queries) == len(_json(root / "annotations" / "test.json"))
    assert all(q.target is None and q.ground_truths == () for q in benchmark.queries)
    assert all(q.reference in benchmark.images for q in benchmark.queries)


def test_circo_without_coco_info_names_the_missing_file(tmp_path):
    root = benchmark_root(tmp_path, "circo")
    with pytest.raises(UserError, match="image_info_unlabeled2017.json"):
        load_circo(root, "val")


def test_load_benchmark_dispatches_and_rejects_bad_input(tmp_path):
    root = benchmark_root(tmp_path, "cirr")
    assert load_benchmark("CIRR", root, "val").name == "cirr"
    with pytest.raises(UserError, match="unknown benchmark"):
        load_benchmark("coco", root, "val")
    with pytest.raises(UserError, match="split"):
        load_benchmark("cirr", root, "test2")
    with pytest.raises(UserError, match="category"):
        load_benchmark("fashioniq", root, "val")
    with pytest.raises(UserError, match="category"):
        load_fashioniq(root, "val", "shoes")


def test_missing_annotation_file_is_a_user_error_with_its_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "cirr" / "image_splits" / "split.rc2.val.json")):
        load_cirr(tmp_path, "val")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "cannot read"),
        ('{"a": 1}', "expected a JSON list"),
        ('[{"candidate": "x", "target": "y"}]', "lacks 'captions'"),
        ('[{"candidate": 3, "target": "y", "captions": ["a", "b"]}]', "int for 'candidate'"),
        ('[{"candidate": "x", "target": "y", "captions": ["a"]}]', "1 captions"),
    ],
)
def test_malformed_captions_are_user_errors_naming_the_file(tmp_path, content, reason):
    (tmp_path / "image_splits").mkdir()
    (tmp_path / "image_splits" / "split.dress.val.json").write_text('["x", "y"]')
    (tmp_path / "captions").mkdir()
    captions = tmp_path / "captions" / "cap.dress.val.json"
    captions.write_text(content)
    with pytest.raises(UserError, match=reason) as error:
        load_fashioniq(tmp_path, "val", "dress")
    assert str(captions) in str(error.value)


def test_loading_never_touches_images(tmp_path):
    root = benchmark_root(tmp_path, "fashioniq")
    benchmark = load_fashioniq(root, "val", "shirt")  # no image exists anywhere
    assert len(benchmark.images) > 6000
    assert not (root / "shirt").exists()


def test_check_images_exist_reports_count_and_first_missing(tmp_path):
    root = benchmark_root(tmp_path, "cirr")
    benchmark = load_cirr(root, "val")
    names = list(benchmark.images)
    make_placeholder_images(benchmark, names[:3])

    check_images_exist(benchmark, needed=names[:3])
    with pytest.raises(UserError) as error:
        check_images_exist(benchmark)
    message = str(error.value)
    assert f"{len(names) - 3} of {len(names)} images missing" in message
    assert str(benchmark.images[names[3]]) in message
    assert str(benchmark.images[names[0]]) not in message
    assert "more" in message


def test_check_images_exist_counts_names_outside_the_gallery(tmp_path):
    root = benchmark_root(tmp_path, "fashioniq")
    benchmark = load_fashioniq(root, "val", "toptee")
    present = list(benchmark.images)[:2]
    make_placeholder_images(benchmark, present)
    with pytest.raises(UserError, match=r"1 of 3 images missing.*B0NOTINSPLIT \(not in the gallery index\)"):
        check_images_exist(benchmark, needed=[*present, "B0NOTINSPLIT"])


def test_placeholders_are_created_only_for_requested_names(tmp_path):
    root = benchmark_root(tmp_path, "circo")
    write_circo_image_info(root, circo_image_ids(root, "val", n_queries=2))
    benchmark = load_circo(root, "val")
    needed = [query.reference for query in benchmark.queries[:2]]
    paths = make_placeholder_images(benchmark, needed)
    assert sorted(p.name for p in (root / "COCO2017_unlabeled" / "unlabeled2017").iterdir()) == sorted(
        p.name for p in paths
    )
    check_images_exist(benchmark, needed=needed)
