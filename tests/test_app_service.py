"""The app's logic without a browser: searches through compose, gallery references, switches, rank diffs, bad inputs,
and app.py's configuration (flags, environment, banners instead of crashes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from app_helpers import api_search, brute_force, build_small_gallery, page_props
from bad_inputs import generate_image_cases, text_cases
from fti4cir.app_service import MAX_K, Hit, Reference, SearchService, rank_changes, summarize_moves
from fti4cir.compose import compose
from fti4cir.errors import UserError


@pytest.fixture(scope="module")
def service(tiny_model, demo_galleries):
    from fti4cir.gallery import Gallery

    return SearchService(tiny_model, Gallery.load("demo", model=tiny_model, galleries_dir=demo_galleries))


# ---- searches --------------------------------------------------------------------------------------------------
def test_gallery_reference_search_is_the_evaluation_query_path(service, tiny_model):
    result = service.search(3, "is red and longer", "fti4cir", k=5)
    assert result.reference.gallery_index == 3 and result.reference.name == service.gallery.names[3]
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
    with torch.no_grad():
        query = compose(tiny_model, service.gallery.tokens_of([3]), ["is red and longer"])
    expected = brute_force(service, query, exclude=3)[:5]
    assert [h.index for h in result.hits] == expected  # the reference itself is left out
    for hit in result.hits:
        assert hit.name == service.gallery.names[hit.index] and hit.path == service.gallery.paths[hit.index]
        assert hit.score == pytest.approx(float(service.gallery.features[hit.index] @ query[0]), abs=1e-4)
        assert hit.caption == f"{hit.name} · {hit.score:.3f}"
    assert result.sentence.startswith("a photo of [") and result.sentence.endswith(" but is red and longer")
    assert result.timings["compose"] > 0 and result.timings["search"] > 0
    assert result.timing_text().endswith("(cached tokens)") and " ms (compose " in result.timing_text()


def test_upload_of_a_gallery_image_matches_its_cached_tokens(service):
    path = service.gallery.paths[5]
    uploaded = service.reference(str(path))
    cached = service.reference(5)
    assert uploaded.gallery_index is None and uploaded.name == path.name
    assert torch.allclose(uploaded.tokens.subject, cached.tokens.subject, atol=1e-3)
    assert uploaded.explanation.kept.tolist() == cached.explanation.kept.tolist()
    assert np.allclose(uploaded.explanation.relevance, cached.explanation.relevance, rtol=1e-2, atol=1e-5)
    # image-only: an uploaded copy finds its gallery twin first, with cosine ~1
    result = service.search(uploaded, "", "image-only", k=3)
    assert result.hits[0].index == 5 and result.hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert len(uploaded.explanation.heatmaps) == uploaded.num_kept
    assert "reference" not in result.timing_text()  # prepared before: no reference time in this query
    assert service.search(str(path), "", k=1).timing_text().endswith("(visual pass + inversion)")


@pytest.mark.parametrize("method", ["fti4cir", "subject-only", "image-only", "text-only", "image+text"])
def test_every_method_ranks_by_its_compose_query(service, tiny_model, method):
    result = service.search(2, "has long sleeves", method, k=4)
    with torch.no_grad():
        query = compose(tiny_model, service.gallery.tokens_of([2]), ["has long sleeves"], method=method)
    assert [h.index for h in result.hits] == brute_force(service, query, exclude=2)[:4]


def test_switches_change_the_query_exactly_like_compose(service, tiny_model):
    reference = service.reference(7)
    r = reference.num_kept
    keep = [i % 2 == 1 for i in range(r)]
    result = service.search(reference, "is blue", "fti4cir", k=service.size, keep_attributes=keep, keep_subject=False)
    mask = torch.zeros(1, reference.tokens.attributes.shape[1], dtype=torch.bool)
    mask[0, :r] = torch.tensor(keep)
    with torch.no_grad():
        query = compose(
            tiny_model, reference.tokens, ["is blue"], keep_attributes=mask, keep_subject=torch.tensor([False])
        )
        full = compose(tiny_model, reference.tokens, ["is blue"])
    assert not torch.allclose(query, full)
    assert [h.index for h in result.hits] == brute_force(service, query, exclude=7)[: service.size - 1]
    assert result.keep_attributes == keep and result.keep_subject is False
    assert result.sentence.startswith("a photo of something with ")
    with pytest.raises(UserError, match="switches"):
        service.search(reference, "is blue", keep_attributes=[True] * (r + 1))


def test_references_without_display_skip_image_and_heatmaps(service):
    for source in (6, str(service.gallery.paths[6])):
        shown, bare = service.reference(source), service.reference(source, display=False)
        assert shown.image is not None and len(shown.explanation.heatmaps) == shown.num_kept >= 1
        assert bare.image is None and bare.explanation.heatmaps == []
        assert bare.explanation.kept.tolist() == shown.explanation.kept.tolist()
        assert [h.index for h in service.search(bare, "is red", k=4).hits] == [
            h.index for h in service.search(shown, "is red", k=4).hits
        ]


def test_k_is_clamped_and_bad_arguments_are_user_errors(service):
    assert len(service.search(0, "x", k=10_000).hits) == min(MAX_K, service.size - 1)
    assert len(service.search(0, "x", k=0).hits) == 1
    assert len(service.search(str(service.gallery.paths[0]), "x", k=10_000).hits) == min(MAX_K, service.size)
    with pytest.raises(UserError, match="Unknown method"):
        service.search(0, "x", "clip-magic")
    with pytest.raises(UserError, match="no gallery image number"):
        service.reference(service.size)
    with pytest.raises(UserError, match="no gallery image number"):
        service.reference(-1)


def test_long_text_is_reported_as_truncated(service):
    assert not service.search(0, "is red", k=2).truncated
    long_text = " ".join(["striped"] * 90)  # ~90 tokens: more than CLIP's 77-token context
    assert service.search(0, long_text, k=2).truncated
    assert service.search(0, long_text, "text-only", k=2).truncated
    assert not service.search(0, long_text, "image-only", k=2).truncated


def test_large_uploads_are_kept_small_for_display(service, tmp_path):
    path = tmp_path / "wide.png"
    PIL.Image.new("RGB", (3000, 1200), (10, 120, 200)).save(path)
    reference = service.reference(path)
    assert max(reference.image.size) == 1024 and reference.image.size[1] == pytest.approx(410, abs=1)


# ---- rank diffs --------------------------------------------------------------------------------------------------
def hits(names: str) -> list[Hit]:
    return [Hit(rank, rank, name, Path(name), 1.0 - rank / 10) for rank, name in enumerate(names, start=1)]


def test_rank_changes_up_down_new_out():
    moves = rank_changes(hits("abcd"), hits("bace"))
    assert [(m.name, m.kind, m.arrow) for m in moves] == [
        ("b", "up", "↑1"),
        ("a", "down", "↓1"),
        ("c", "same", ""),
        ("e", "new", "new"),
        ("d", "out", "out"),
    ]
    assert summarize_moves(moves) == "1 up, 1 down, 1 new, 1 dropped out, 1 unchanged"
    assert summarize_moves(rank_changes(hits("abc"), hits("abc"))) == "no change"


# ---- the bad-input corpus: a message or a result, never another exception -------------------------------------
def test_every_bad_image_gives_a_message_or_a_result(service, tmp_path):
    cases = generate_image_cases(tmp_path)
    assert len(cases) >= 25
    for case in cases:
        try:
            reference = service.reference(case.payload)
        except UserError as e:
            case.check_error(e)
            continue
        assert case.outcome == "ok", f"{case.name}: accepted, expected {case.message!r}"
        assert isinstance(reference, Reference)
        result = service.search(reference, "is red", k=3)
        assert len(result.hits) == 3, case.name


def test_every_text_case_gives_a_message_or_a_result(service):
    reference = service.reference(1)
    for case in text_cases():
        try:
            result = service.search(reference, case.text, k=2)
        except UserError as e:
            assert case.outcome == "error" and case.message in str(e), case.name
            continue
        assert case.outcome == "ok", case.name
        assert result.text == case.expected, case.name
        assert len(result.hits) == 2
        if case.expected:
            assert result.sentence.endswith(f" but {case.expected}"), case.name


# ---- app.py: configuration and banners -------------------------------------------------------------------------
def test_flags_honour_hosting_environment(monkeypatch, tmp_path):
    import app

    for var in (
        "GRADIO_SERVER_NAME",
        "GRADIO_SERVER_PORT",
        "PORT",
        "FTI4CIR_GALLERY",
        "FTI4CIR_WEIGHTS",
        "FTI4CIR_BACKBONE",
        "FTI4CIR_PRETRAINED",
        "FTI4CIR_M2C_WEIGHTS",
        "FTI4CIR_GALLERIES_DIR",
    ):
        monkeypatch.delenv(var, raising=False)
    args = app.parse_args(["--galleries-dir", str(tmp_path)])  # no gallery to take a model from: the defaults
    assert (args.host, args.port, args.gallery, args.weights) == ("127.0.0.1", 7860, None, None)
    assert (args.backbone, args.pretrained, args.m2c_weights) == ("ViT-L-14", "openai", None)
    args = app.parse_args([])  # the embedded demo: its gallery's definition names the model
    assert (args.gallery, args.backbone) == ("clothing", "fti4cir-clothing")
    assert args.weights.endswith("weights/clothing-fti4cir.safetensors")
    assert args.m2c_weights.endswith("weights/clothing-m2c.safetensors")
    given = app.parse_args(["--weights", "x.safetensors"])  # a model flag given: nothing from the definition
    assert (given.backbone, given.pretrained, given.weights, given.m2c_weights) == (
        "ViT-L-14",
        "openai",
        "x.safetensors",
        None,
    )
    monkeypatch.setenv("PORT", "9000")
    assert app.parse_args([]).port == 9000
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("FTI4CIR_GALLERY", "clothing")
    args = app.parse_args([])
    assert (args.host, args.port, args.gallery) == ("0.0.0.0", 7861, "clothing")
    assert app.parse_args(["--port", "1234", "--host", "::1"]).port == 1234
    tiny = app.parse_args(["--tiny", "--weights", "x.safetensors"])
    assert (tiny.backbone, tiny.pretrained, tiny.weights) == ("fti4cir-tiny", None, None)


def test_unreachable_weights_give_a_banner_not_a_crash(monkeypatch, tmp_path):
    import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    setup = app.load_service(
        app.parse_args(["--backbone", "RN50", "--pretrained", "openai", "--gallery", "x", "--device", "cpu"])
    )
    assert setup.service is None
    assert "could not be loaded" in setup.problems[0] and "RN50" in setup.problems[0]
    assert "--tiny" in setup.problems[0] and "--weights" in setup.problems[0]

    missing = app.parse_args(["--tiny", "--galleries-dir", str(tmp_path), "--device", "cpu"])
    missing.weights = str(tmp_path / "nope.safetensors")
    setup = app.load_service(missing)
    assert setup.service is None and "nope.safetensors" in setup.problems[0]


def test_gallery_problems_give_a_banner(tmp_path):
    import app

    args = app.parse_args(["--tiny", "--galleries-dir", str(tmp_path), "--device", "cpu"])
    setup = app.load_service(args)
    assert setup.service is None and "No gallery chosen" in setup.problems[0]
    assert any("random-weight" in n for n in setup.notes)
    args.gallery = "../etc"
    assert "Invalid gallery name" in app.load_service(args).problems[0]
    args.gallery = "absent"
    assert "No gallery" in app.load_service(args).problems[0]


def test_gallery_of_another_model_is_refused(tiny_model, tmp_path):
    """A gallery built with a different (here: randomly re-initialised) inversion network must not be searched."""
    import app
    from fti4cir import create_model

    other = create_model("fti4cir-tiny", None, device="cpu", seed=123)
    galleries = build_small_gallery(other, tmp_path, 2, name="other")
    setup = app.load_service(app.parse_args(["--tiny", "--galleries-dir", str(galleries), "--device", "cpu"]))
    assert setup.service is None and "could not be loaded" in setup.problems[0]


def test_tiny_mode_loads_a_gallery_built_by_another_process_model(tmp_path):
    """Galleries built with the app's tiny model load in the app (the random weights are reproducible)."""
    import app
    from fti4cir import create_model

    args = app.parse_args(["--tiny", "--galleries-dir", str(tmp_path / "galleries"), "--device", "cpu"])
    build_small_gallery(create_model(app.model_spec(args)), tmp_path, 3)
    setup = app.load_service(args)  # a fresh model, as in another process
    assert setup.service is not None and setup.service.size == 3 and not setup.problems


def test_relevance_chart_marks_kept_queries_and_epsilon(service):
    from matplotlib.colors import to_hex

    import app

    explanation = service.reference(4).explanation
    figure = app.relevance_figure(explanation)
    ax = figure.axes[0]
    bars = ax.patches
    assert len(bars) == len(explanation.relevance) == 24
    kept = set(explanation.kept.tolist())
    kept_colours = {to_hex(b.get_facecolor()) for i, b in enumerate(bars) if i in kept}
    dropped_colours = {to_hex(b.get_facecolor()) for i, b in enumerate(bars) if i not in kept}
    assert len(kept_colours) == 1 and kept_colours.isdisjoint(dropped_colours)
    assert [b.get_height() for b in bars] == pytest.approx(explanation.relevance.tolist())
    assert ax.lines[0].get_ydata()[0] == pytest.approx(explanation.epsilon)
    assert {t.get_text() for t in ax.texts} >= {a.word for a in explanation.attributes}


def test_switch_values_round_trip(service):
    import app

    explanation = service.reference(4).explanation
    choices = app.switch_choices(explanation)
    assert len(choices) == 1 + len(explanation.attributes)
    values = [v for _, v in choices]
    assert app.switches_from_values(values, len(explanation.attributes)) == ([True] * len(explanation.attributes), True)
    assert app.switches_from_values(values[:1], len(explanation.attributes)) == (
        [False] * len(explanation.attributes),
        True,
    )
    assert app.browser_rows(1000, 60)[:2] == [0, 17] and len(app.browser_rows(1000, 60)) == 60
    assert app.browser_rows(5, 60) == [0, 1, 2, 3, 4] and app.browser_rows(0) == []


def test_page_without_a_model_shows_the_banner_and_disables_search():
    import app

    demo = app.build_demo(app.Setup(None, ["**The model could not be loaded** (backbone X).\n\nhow to fix"], []))
    props = page_props(demo)
    assert "could not be loaded" in props["banner"]["value"] and props["banner"]["visible"]
    assert props["search"]["interactive"] is False and props["upload"]["interactive"] is False
    assert api_search(demo)(None, "x", "t", "fti4cir", 5) == {
        "error": "Search is disabled: The model could not be loaded (backbone X)."
    }


def test_api_endpoint_answers_with_results_or_an_error(service, tmp_path):
    import app

    demo = app.build_demo(app.Setup(service, [], []))
    props = page_props(demo)
    assert props["banner"]["visible"] is False and props["topk"]["maximum"] == service.size
    search = api_search(demo)
    name = service.gallery.names[2]
    answer = search(None, name, "is red", "fti4cir", 4)
    expected = service.search(2, "is red", "fti4cir", 4)
    assert answer["reference"] == name and answer["text"] == "is red"
    assert [r["name"] for r in answer["results"]] == [h.name for h in expected.hits]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    assert "not a supported image" in search(str(bad), "", "is red", "fti4cir", 4)["error"]
    assert "is not in gallery" in search(None, "../../etc/passwd", "x", "fti4cir", 4)["error"]
    assert "is not in gallery" in search(None, "/etc/passwd", "x", "fti4cir", 4)["error"]
    assert "Unknown method" in search(None, name, "x", "magic", 4)["error"]
    assert search(None, "", "x", "fti4cir", 4) == {"error": app.NO_REFERENCE}
