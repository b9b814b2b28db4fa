"""The page's events without a page: `fti4cir.ui.Page` on the tiny model's demo gallery (no gradio, no browser), and
the wiring of app.py's page to it (event names -> components)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fti4cir.errors import UserError
from fti4cir.ui import (
    DEFAULT_K,
    EXAMPLE_OUTPUTS,
    GENERIC_ERROR,
    NO_REFERENCE,
    REFERENCE_OUTPUTS,
    RESULT_OUTPUTS,
    SWITCH_OUTPUTS,
    Choices,
    Page,
    file_url,
    guarded,
    status_html,
)


@pytest.fixture(scope="module")
def service(tiny_model, demo_galleries):
    from fti4cir.app_service import SearchService
    from fti4cir.gallery import Gallery

    return SearchService(tiny_model, Gallery.load("demo", model=tiny_model, galleries_dir=demo_galleries))


@pytest.fixture
def page(service):
    return Page(service)


def test_layout_values(page, service):
    assert page.size == service.size == 12
    assert page.top_k_range() == (1, 12, DEFAULT_K)
    assert page.shown_rows == list(range(12))
    assert page.browser_items() == [(str(p), n) for p, n in zip(service.gallery.paths, service.gallery.names)]
    assert page.methods(("x",)) == list(service.methods)
    disabled = Page(None, ["**The model could not be loaded** (backbone X).\n\nhow to fix"])
    assert disabled.top_k_range() == (1, 2, 1) and disabled.browser_items() is None and disabled.example_rows == []
    assert disabled.methods(("fti4cir", "image-only")) == ["fti4cir", "image-only"]


def test_upload_makes_a_new_reference_with_every_output(page, service):
    out = page.upload(str(service.gallery.paths[4]), "is red", "fti4cir", 5)
    assert set(out) == set(REFERENCE_OUTPUTS)
    explanation = service.reference(4).explanation
    assert out["reference_view"].size == service.reference(4).image.size  # the decoded image, shown once
    assert out["reference_state"].image is None and out["reference_state"].explanation.heatmaps == []  # kept lean
    assert out["base_state"].reference is out["reference_state"] and len(out["base_state"].hits) == 5
    assert out["shown_state"] == [h.index for h in out["base_state"].hits]
    assert len(out["heatmaps"]) == len(explanation.attributes) and out["chart"].axes
    assert isinstance(out["switches"], Choices) and out["switches"].value == [v for _, v in out["switches"].choices]
    assert len(out["switches"].choices) == 1 + len(explanation.attributes)
    assert "but is red" in out["sentence"] and out["timing"].startswith("**Query time:**")
    assert out["results"] == [(str(h.path), h.caption) for h in out["base_state"].hits]
    assert out["status"] == "" and out["moved"] == "5 results; untick a token above to see which ones move."
    assert page.upload(None, "", "fti4cir", 5) == {"reference_state": None}  # the box was cleared


def test_search_and_settings_reuse_the_session_reference(page, service):
    reference = page.upload(str(service.gallery.paths[2]), "", "fti4cir", 3)["reference_state"]
    out = page.search(reference, "is blue", "image+text", 4)
    assert set(out) == set(RESULT_OUTPUTS) - {"chart", "heatmaps"}  # drawn for a new reference only
    expected = service.search(reference, "is blue", "image+text", 4)
    assert [h.index for h in out["base_state"].hits] == [h.index for h in expected.hits]
    assert page.settings(reference, "is blue", "fti4cir", 7)["shown_state"] == [
        h.index for h in service.search(reference, "is blue", "fti4cir", 7).hits
    ]
    assert page.settings(None, "is blue", "fti4cir", 7) is None  # nothing to search yet
    with pytest.raises(UserError, match=NO_REFERENCE):
        page.search(None, "x", "fti4cir", 3)


def test_gallery_picks_use_cached_tokens_and_leave_the_reference_out(page, service):
    out = page.browser_select(3, "is red", "fti4cir", 11)
    assert out["reference_state"].gallery_index == page.shown_rows[3]
    assert "(cached tokens)" in out["timing"] and page.shown_rows[3] not in out["shown_state"]
    picked = page.result_select(2, out["shown_state"], "is red", "fti4cir", 11)
    assert picked["reference_state"].gallery_index == out["shown_state"][2]


def test_switches_rerank_and_say_what_moved(page, service):
    base = page.browser_select(5, "is red", "fti4cir", 8)["base_state"]
    choices = page.show(service.search(5, "is red", "fti4cir", 8), False)["switches"]
    values = [v for _, v in choices.choices]
    same = page.switch(values, base)
    assert set(same) == set(SWITCH_OUTPUTS) and same["moved"].startswith("**Moved:**")
    assert same["shown_state"] == [h.index for h in base.hits]
    off = page.switch(values[1:], base)  # the subject token off
    expected = service.search(base.reference, "is red", "fti4cir", 8, [True] * base.reference.num_kept, False)
    assert off["shown_state"] == [h.index for h in expected.hits]
    assert "a photo of something" in off["sentence"] and "class='off'" in off["sentence"]
    other = page.switch(values[1:], page.browser_select(5, "is red", "image-only", 8)["base_state"])
    assert "no effect on method image-only" in other["moved"]
    with pytest.raises(UserError, match="Run a search first"):
        page.switch(values, None)


def test_example_searches_the_gallery_image_with_the_defaults(page, service):
    page.example_rows = [(6, "is green")]  # the tiny gallery holds none of the embedded demo's examples
    assert page.example_items() == [[str(service.gallery.paths[6]), "is green"]]
    out = page.example(str(service.gallery.paths[6]), "is green")
    assert set(out) == set(EXAMPLE_OUTPUTS) and (out["method"], out["top_k"]) == ("fti4cir", DEFAULT_K)
    assert out["reference_state"].gallery_index == 6 and len(out["shown_state"]) == DEFAULT_K
    with pytest.raises(UserError, match="not in the gallery"):
        page.example("/elsewhere/photo.jpg", "x")


def test_guarded_turns_failures_into_the_status_line(page):
    assert guarded(page.search)(None, "x", "fti4cir", 3) == {
        "status": status_html(NO_REFERENCE),
        "warning": NO_REFERENCE,
    }

    def broken():
        raise RuntimeError("/secret/path details")

    out = guarded(broken)()
    assert out == {"status": status_html(GENERIC_ERROR), "warning": GENERIC_ERROR}
    assert status_html("<b>") == "<div class='status'>⚠ &lt;b&gt;</div>" and status_html("") == ""


def test_disabled_page_says_why():
    page = Page(None, ["**The gallery could not be loaded.** No gallery 'x'.\n\nmore"])
    for call in (
        lambda: page.search(object(), "", "fti4cir", 3),
        lambda: page.browser_select(0, "", "fti4cir", 3),
        lambda: page.upload("x.jpg", "", "fti4cir", 3),
        lambda: page.switch([], None),
    ):
        with pytest.raises(UserError, match=r"^Search is disabled: The gallery could not be loaded\. No gallery"):
            call()
    assert page.settings(object(), "", "fti4cir", 3) is None
    assert page.api_search(None, "a.jpg", "", "fti4cir", 3) == {
        "error": "Search is disabled: The gallery could not be loaded. No gallery 'x'."
    }
    assert Page(None).api_search(None, "a", "", "", 1) == {"error": "Search is disabled: no model"}


def test_api_answers_carry_image_urls(page, service):
    name = service.gallery.names[1]
    answer = page.api_search(None, name, "is red", None, "4", root_url="https://user-space.hf.space/")
    expected = service.search(1, "is red", "fti4cir", 4)
    assert answer["method"] == "fti4cir" and answer["reference"] == name
    assert [(r["rank"], r["name"]) for r in answer["results"]] == [(h.rank, h.name) for h in expected.hits]
    for r, h in zip(answer["results"], expected.hits):
        assert r["url"] == f"https://user-space.hf.space/gradio_api/file={h.path}"
        assert r["score"] == round(h.score, 6)
    relative = page.api_search(None, name, "is red", "fti4cir", 4)
    assert relative["results"][0]["url"] == f"/gradio_api/file={expected.hits[0].path}"
    assert "whole number" in page.api_search(None, name, "", "fti4cir", 2.5)["error"]


def test_file_urls_are_quoted():
    assert file_url("/a b/c#d?.jpg", "http://h:1") == "http://h:1/gradio_api/file=/a%20b/c%23d%3F.jpg"
    assert file_url(Path("/x/y.jpg")) == "/gradio_api/file=/x/y.jpg"


def test_page_wires_every_event_to_the_page_logic(service):
    """app.build_demo: the reference box takes drops, pastes and webcam photos; an event's outputs are the
    components its Page method names; a failure reaches the status line."""
    import app
    from app_helpers import page_props

    demo = app.build_demo(app.Setup(service, [], []))
    props = page_props(demo)
    assert set(props["reference"]["sources"]) == {"upload", "clipboard", "webcam"}
    assert props["reference"]["interactive"] is True and props["upload"]["interactive"] is True
    assert page_props(app.build_demo(app.Setup(None, ["no model"], [])))["reference"]["interactive"] is False
    ids = {c["id"]: c["props"].get("elem_id") for c in demo.get_config_file()["components"]}
    targets = {}
    for fn in demo.fns.values():
        for block, trigger in fn.targets:
            targets[(ids.get(block), trigger)] = fn
    drop = targets[("reference", "upload")]
    assert [ids.get(o._id) for o in drop.outputs][: len(RESULT_OUTPUTS)] == [
        "sentence",
        "timing",
        "results",
        "relevance",
        "heatmaps",
        "switches",
        "moved",
        "status",
        None,
        None,
    ]
    out = drop.fn(str(service.gallery.paths[0]), "is red", "fti4cir", 3)
    by_id = {getattr(c, "elem_id", None): v for c, v in out.items()}
    assert "but is red" in by_id["sentence"] and len(by_id["results"]) == 3
    assert by_id["switches"]["__type__"] == "update" and by_id["switches"]["choices"]
    cleared = targets[("reference", "clear")].fn(None, "is red", "fti4cir", 3)
    assert [type(c).__name__ for c in cleared] == ["State"] and list(cleared.values()) == [None]  # forgotten
    failed = targets[("search", "click")].fn(None, "x", "fti4cir", 3)
    assert {getattr(c, "elem_id", None): v for c, v in failed.items()} == {"status": status_html(NO_REFERENCE)}
