"""The M2C methods in `fti4cir evaluate` / `fti4cir submit`: same table, same caches, official M2C prompts and texts.

Tiny random backbone and random M2C networks (stage I, and stage II with adapters scaled up so that "m2c+compose"
differs from "m2c"); real annotation files with placeholder images, as in test_evaluate_cli.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmark_fixtures import benchmark_root
from conftest import random_m2c
from fti4cir import cli, factory
from fti4cir.backbone import VisualFeatures
from fti4cir.commands.common import spec_from_args
from fti4cir.compose import METHODS
from fti4cir.evaluation import run
from fti4cir.evaluation.datasets import load_benchmark
from fti4cir.evaluation.submission import validate_cirr_submission
from fti4cir.inputs import load_image
from fti4cir.m2c import PROMPTS, M2CModel, m2c_compose, save_m2c_weights
from test_evaluate_cli import QUERIES, TINY, _evaluate_args, _invoke, _root_with_images


@pytest.fixture(scope="module")
def m2c_weights(tmp_path_factory, tiny_backbone):
    """{"stage1": path, "stage2": path} of random M2C networks for the tiny backbone (the same stage-I part)."""
    folder = tmp_path_factory.mktemp("m2c-weights")
    return {
        f"stage{stage}": save_m2c_weights(
            random_m2c(tiny_backbone, stage, seed=3), folder / f"stage{stage}.safetensors"
        )
        for stage in (1, 2)
    }


@pytest.fixture(scope="module")
def cirr_run(tmp_path_factory, m2c_weights):
    folder = tmp_path_factory.mktemp("cirr-m2c")
    root, galleries = _root_with_images(folder, "cirr", "val")
    outputs = []
    for _ in range(2):
        assert _invoke(*_evaluate_args("cirr", root, folder, "--m2c-weights", m2c_weights["stage2"])) == 0
        outputs.append(json.loads((folder / "out" / "results.json").read_text()))
    return {"folder": folder, "root": root, "galleries": galleries, "first": outputs[0], "second": outputs[1]}


def test_default_methods_add_both_m2c_methods_to_the_one_table(cirr_run, m2c_weights):
    results = cirr_run["first"]
    assert list(results["methods"]) == [*METHODS, "m2c", "m2c+compose"]
    assert results["prompts"]["m2c"] == results["prompts"]["m2c+compose"] == PROMPTS["cirr"]
    assert PROMPTS["cirr"] == "a photo of * , that {text}"
    assert results["model"]["m2c_weights"] == str(m2c_weights["stage2"])
    assert results["model"]["m2c_preprocess"] == "clip" and results["model"]["preprocess"] == "targetpad"
    assert results["methods"]["m2c"] != results["methods"]["m2c+compose"]
    markdown = (cirr_run["folder"] / "out" / "results.md").read_text()
    assert "| m2c |" in markdown and "| m2c+compose |" in markdown


def test_m2c_has_its_own_preprocessing_cache_and_a_rerun_computes_nothing(cirr_run):
    images = len(cirr_run["galleries"]["cirr"])  # references lie in the gallery
    assert cirr_run["first"]["features"]["visual_passes"] == 2 * images  # targetpad for FTI4CIR, clip for M2C
    assert cirr_run["second"]["features"]["visual_passes"] == 0
    assert cirr_run["second"]["methods"] == cirr_run["first"]["methods"]


def test_m2c_weights_without_an_m2c_method_are_not_loaded(cirr_run, m2c_weights, monkeypatch):
    monkeypatch.setattr(factory, "load_m2c_weights", lambda *a, **kw: pytest.fail("M2C loaded for no M2C method"))
    folder = cirr_run["folder"]
    assert (
        _invoke(
            *_evaluate_args(
                "cirr", cirr_run["root"], folder, "--methods", "fti4cir", "--m2c-weights", m2c_weights["stage2"]
            )
        )
        == 0
    )
    results = json.loads((folder / "out" / "results.json").read_text())
    assert list(results["methods"]) == ["fti4cir"] and "m2c_weights" not in results["model"]


def test_m2c_with_fti4cir_preprocessing_shares_the_cache(cirr_run, m2c_weights):
    folder = cirr_run["folder"]
    assert (
        _invoke(
            *_evaluate_args(
                "cirr",
                cirr_run["root"],
                folder,
                "--methods",
                "fti4cir,m2c",
                "--m2c-weights",
                m2c_weights["stage1"],
                "--m2c-preprocess",
                "targetpad",
            )
        )
        == 0
    )
    results = json.loads((folder / "out" / "results.json").read_text())
    assert list(results["methods"]) == ["fti4cir", "m2c"] and results["features"]["visual_passes"] == 0


@pytest.mark.parametrize("method", ["m2c", "m2c+compose"])
def test_similarities_equal_m2c_compose_on_the_images(tmp_path, m2c_weights, method):
    """part_similarities for an M2C method = m2c_compose on the decoded references (features rounded to fp16 as
    the cache stores them) against the gallery's clip-preprocessed CLIP features."""
    root, galleries = _root_with_images(tmp_path, "cirr", "val")
    (part,) = run.load_parts("cirr", root, "val", max_queries=QUERIES, subset_gallery=6)
    args = cli.build_parser().parse_args(
        [
            "evaluate",
            "--dataset",
            "cirr",
            "--root",
            str(root),
            *TINY,
            "--m2c-weights",
            str(m2c_weights["stage2"]),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    model = factory.create_model(spec_from_args(args, m2c_weights=args.m2c_weights))
    cache = run.FeatureCache(model, args.cache_dir, batch_size=2, num_workers=0, progress=False)
    side = run.make_m2c_side(model, cache, args.m2c_weights, run.m2c_preprocess(args.dataset, args.m2c_preprocess))
    templates = run.method_prompts([method], run.resolve_prompt(None, "cirr"), "cirr")
    [(name, similarity)] = list(
        run.part_similarities(model, "cirr", part, cache, templates, [method], 3, progress=False, m2c_side=side)
    )
    assert name == method

    m2c_model = side.model
    assert isinstance(m2c_model, M2CModel) and m2c_model.backbone is model.backbone
    images = part.benchmark.images
    with torch.no_grad():

        def features(names):
            visual = [m2c_model.backbone.encode_visual(m2c_model.preprocess([load_image(images[n])])) for n in names]
            return VisualFeatures(
                torch.cat([v.global_features for v in visual]).half().float(),
                torch.cat([v.patch_tokens for v in visual]).half().float(),
            )

        references = features([q.reference for q in part.queries])
        queries = m2c_compose(
            m2c_model,
            references,
            [q.texts[0] for q in part.queries],
            prompt=PROMPTS["cirr"],
            use_adapters=method == "m2c+compose",
        )
        gallery = F.normalize(features(part.gallery).global_features, dim=-1)
    torch.testing.assert_close(torch.from_numpy(similarity), queries @ gallery.T, atol=2e-3, rtol=0)


def test_fashioniq_m2c_text_is_the_second_caption_then_the_first(tmp_path):
    root = benchmark_root(tmp_path, "fashioniq")
    queries = load_benchmark("fashioniq", root, "val", "dress").queries[:3]
    texts = run.query_texts("fashioniq", queries, "m2c")
    assert texts == [f"{q.texts[1]} and {q.texts[0]}" for q in queries]
    assert run.method_prompts(["m2c"], "unused", "fashioniq") == {"m2c": "a photo of * , that {text}"}
    assert run.method_prompts(["m2c+compose"], "unused", "circo") == {"m2c+compose": "a photo of * that {text}"}


def test_fashioniq_and_circo_evaluate_with_m2c(tmp_path, m2c_weights):
    for dataset in ("fashioniq", "circo"):
        folder = tmp_path / dataset
        root, _ = _root_with_images(folder, dataset, "val")
        assert (
            _invoke(
                *_evaluate_args(
                    dataset, root, folder, "--methods", "m2c,m2c+compose", "--m2c-weights", m2c_weights["stage2"]
                )
            )
            == 0
        )
        results = json.loads((folder / "out" / "results.json").read_text())
        assert list(results["methods"]) == ["m2c", "m2c+compose"]
        assert results["prompts"]["m2c"] == PROMPTS[dataset]


def test_submit_with_m2c_compose(tmp_path, m2c_weights):
    root, _ = _root_with_images(tmp_path, "cirr", "test1", distractors=40)
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
            "--method",
            "m2c+compose",
            "--m2c-weights",
            m2c_weights["stage2"],
            *TINY,
        )
        == 0
    )
    queries = load_benchmark("cirr", root, "test").queries[:QUERIES]
    recall = json.loads((out / "cirr" / "m2c+compose.json").read_text())
    validate_cirr_submission(
        recall, "recall", [int(q.query_id) for q in queries], references={q.query_id: q.reference for q in queries}
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "fti4cir,m2c"], "method m2c needs --m2c-weights"),
        (
            ["--methods", "m2c+compose", "--m2c-weights", "STAGE1"],
            "m2c+compose needs the weights of `fti4cir m2c-train --stage 2`",
        ),
        (["--m2c-weights", "FTI4CIR"], "not an M2C weights file"),
        (["--m2c-weights", "MISSING"], "M2C weights file not found"),
        (["--m2c-weights", "FOLDER"], "must be a .safetensors file"),
    ],
)
def test_bad_m2c_options_are_user_errors(tmp_path, capsys, m2c_weights, tiny_model, monkeypatch, extra, message):
    """Every bad M2C option is an exit-2 message before any model is built."""
    from fti4cir import save_weights

    fti4cir_weights = save_weights(tiny_model.inversion, tmp_path / "fti4cir.safetensors")
    files = {
        "STAGE1": m2c_weights["stage1"],
        "FTI4CIR": fti4cir_weights,
        "MISSING": tmp_path / "none.safetensors",
        "FOLDER": tmp_path,
    }
    extra = [str(files.get(v, v)) for v in extra]
    monkeypatch.setattr("fti4cir.factory.create_model", lambda *a, **k: pytest.fail("model built despite a bad option"))
    root, _ = _root_with_images(tmp_path, "cirr", "val")
    assert (
        _invoke(
            "evaluate",
            "--dataset",
            "cirr",
            "--root",
            root,
            "--max-queries",
            2,
            "--subset-gallery",
            2,
            "--cache-dir",
            tmp_path / "cache",
            "--out",
            tmp_path / "out",
            *TINY,
            *extra,
        )
        == 2
    )
    assert message in capsys.readouterr().err
