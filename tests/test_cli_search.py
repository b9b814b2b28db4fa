"""fti4cir search: the gallery's own model, a file or a gallery image as the reference, lines or JSON, clear errors."""

import json

import pytest

from fti4cir.app_service import SearchService
from fti4cir.cli import main
from fti4cir.gallery import Gallery, gallery_model_spec
from fti4cir.spec import ModelSpec


def test_model_comes_from_the_gallery(demo_galleries):
    assert gallery_model_spec("demo", demo_galleries) == ModelSpec(
        backbone="fti4cir-tiny", pretrained=None, weights=None, preprocess="targetpad", seed=0
    )


def test_gallery_image_reference_as_json_equals_the_service(demo_galleries, tiny_model, capsys):
    gallery = Gallery.load("demo", tiny_model, galleries_dir=demo_galleries)
    name = gallery.names[3]
    assert (
        main(
            [
                "search",
                "--gallery",
                "demo",
                "--galleries-dir",
                str(demo_galleries),
                "--image",
                name,
                "--text",
                "is red",
                "-k",
                "4",
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)
    expected = SearchService(tiny_model, gallery).search(3, "is red", k=4)
    assert [r["name"] for r in answer["results"]] == [h.name for h in expected.hits]
    assert name not in [r["name"] for r in answer["results"]] and answer["reference"] == name
    assert [r["score"] for r in answer["results"]] == pytest.approx([h.score for h in expected.hits], abs=1e-5)


def test_file_reference_prints_lines_and_the_random_weights_notice(demo_galleries, tiny_model, capsys, caplog):
    gallery = Gallery.load("demo", tiny_model, galleries_dir=demo_galleries)
    assert (
        main(
            [
                "search",
                "--gallery",
                "demo",
                "--galleries-dir",
                str(demo_galleries),
                "--image",
                str(gallery.paths[0]),
                "--text",
                "is blue",
                "-k",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0].startswith("a photo of [") and lines[0].endswith("but is blue") and len(lines) == 3
    expected = SearchService(tiny_model, gallery).search(gallery.paths[0], "is blue", k=2)  # an upload: kept in
    assert [line.split()[2] for line in lines[1:]] == [h.name for h in expected.hits]
    assert lines[1].split()[:2] == ["1", f"{expected.hits[0].score:.4f}"]
    assert "randomly initialised" in out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gallery", "nope", "--image", "x.jpg"], "No gallery at"),
        (["--gallery", "demo", "--image", "missing.jpg"], "neither an image file nor an image of gallery 'demo'"),
        (["--gallery", "demo", "--image", "x.jpg", "--backbone", "fti4cir-tiny", "--seed", "7"], "was built with"),
    ],
)
def test_clear_errors(demo_galleries, capsys, argv, message):
    assert main(["search", "--galleries-dir", str(demo_galleries), "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err
