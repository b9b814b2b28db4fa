"""The app as a Hugging Face Space runs it, offline.

A clean copy of exactly the files `fti4cir deploy-space` uploads (fti4cir/space.py), alone in its folder (nothing
beside it: no ../shared, no checkout), started the way a Space starts it (`python app.py`, PORT and
GRADIO_SERVER_NAME=0.0.0.0, no flags): it serves the embedded demo model and gallery and answers a query over HTTP with
image URLs it serves. With the Space variable FTI4CIR_MODEL=fti4cir-official and no network, the preset fails fast with
the usual message and the app falls back to the embedded demo, with a banner that says so.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from app_server import REPO, call_search_raw, running_space
from fti4cir.space import space_files
from fti4cir.ui import EXAMPLES

FALLBACK = "could not be loaded, so this page serves the embedded demo model"
OFFLINE_MESSAGE = (
    "The official FTI4CIR weights (iLearn-Lab/SIGIR24-FTI4CIR on the Hugging Face Hub) are not in the cache"
)


def config_of(url: str) -> dict:
    with urllib.request.urlopen(f"{url}config", timeout=30) as response:
        return json.load(response)


def banner_of(config: dict) -> dict:
    return next(c["props"] for c in config["components"] if c["props"].get("elem_id") == "banner")


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    """The Space's files copied into <tmp>/space/app, the only thing in <tmp>/space."""
    folder = tmp_path_factory.mktemp("space") / "app"
    files = space_files(REPO)
    for f in files:
        (folder / f.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f.path, folder / f.path)
    assert list(folder.parent.iterdir()) == [folder] and not (folder.parent / "shared").exists()
    assert (folder / "app.py").is_file() and (folder / "galleries" / "clothing.json").is_file()
    assert not (folder / "tests").exists() and not (folder / ".venv").exists()
    return folder


@pytest.mark.parametrize("preset", [False, True], ids=["no-variables", "FTI4CIR_MODEL-offline"])
def test_the_space_comes_up_and_answers_a_query(space, tmp_path, preset):
    """No variables: the embedded demo, no banner about random weights. FTI4CIR_MODEL=fti4cir-official with no
    network and an empty Hub cache: the same demo, with the fallback banner."""
    name, text = EXAMPLES[0]
    variables = {"FTI4CIR_MODEL": "fti4cir-official", "HF_HOME": str(tmp_path / "empty-hf-home")} if preset else {}
    with running_space(space, tmp_path, **variables) as server:
        log = server.log_text()
        assert f"0.0.0.0:{server.port}" in log, log[-2000:]  # listening on every interface, on $PORT
        banner = banner_of(config_of(server.url))
        assert not banner["visible"] or "random" not in banner["value"].lower(), banner
        if preset:
            assert banner["visible"] and FALLBACK in banner["value"] and OFFLINE_MESSAGE in banner["value"], banner
            assert "serving the embedded demo instead" in log
        else:
            assert not banner["visible"] or FALLBACK not in banner["value"]
        event, data = call_search_raw(server.url, [None, name, text, "fti4cir", 5])
        assert event == "complete" and "error" not in data[0], data
        answer = data[0]
        assert answer["reference"] == name and len(answer["results"]) == 5
        first = answer["results"][0]
        assert f"file={space}/data/clothing/test/" in first["url"]  # the copy's own files, not the checkout's
        with urllib.request.urlopen(first["url"], timeout=30) as response:
            assert response.read() == (space / "data" / "clothing" / "test" / first["name"]).read_bytes()
        assert server.alive()
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


def test_official_preset_offline_falls_back_to_the_embedded_demo(monkeypatch, tmp_path):
    """In-process (the Space's start without the server): FTI4CIR_MODEL=fti4cir-official, an empty Hub cache and
    HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants as hf_constants

    import app
    from app_helpers import api_search, page_props

    for var in (
        "FTI4CIR_GALLERY",
        "FTI4CIR_WEIGHTS",
        "FTI4CIR_BACKBONE",
        "FTI4CIR_PRETRAINED",
        "FTI4CIR_M2C_WEIGHTS",
        "FTI4CIR_TINY",
        "FTI4CIR_GALLERIES_DIR",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FTI4CIR_MODEL", "fti4cir-official")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    args = app.parse_args(["--galleries-dir", str(REPO / "galleries"), "--device", "cpu"])
    assert args.model == "fti4cir-official" and args.weights is None  # the preset, not the gallery's model

    start = time.perf_counter()
    setup = app.load_service(args)
    assert time.perf_counter() - start < 60  # no waiting on a network that is not there
    assert setup.service is not None and not setup.problems, setup.problems
    assert setup.service.model.backbone.name == "fti4cir-clothing" and setup.service.gallery.name == "clothing"
    assert FALLBACK in setup.notes[0] and "fti4cir-official" in setup.notes[0]
    assert OFFLINE_MESSAGE in setup.notes[0]

    demo = app.build_demo(setup)
    banner = page_props(demo)["banner"]
    assert banner["visible"] and FALLBACK in banner["value"] and OFFLINE_MESSAGE in banner["value"]
    name, text = EXAMPLES[0]
    answer = api_search(demo)(None, name, text, "fti4cir", 5)
    assert answer["reference"] == name and len(answer["results"]) == 5, answer


def test_official_preset_without_an_embedded_demo_says_why(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    setup = app.load_service(
        app.parse_args(["--model", "fti4cir-official", "--galleries-dir", str(tmp_path), "--device", "cpu"])
    )
    assert setup.service is None and "could not be loaded** (preset fti4cir-official)" in setup.problems[0]
    assert OFFLINE_MESSAGE in setup.problems[0]
