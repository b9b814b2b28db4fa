"""The M2C methods in the app: same gallery and backbone, queries through m2c_compose, banners for bad weights."""

from __future__ import annotations

import pytest
import torch

from app_helpers import api_search, brute_force, build_small_gallery, page_props
from conftest import random_m2c
from fti4cir.app_service import SearchService
from fti4cir.compose import METHODS
from fti4cir.errors import UserError
from fti4cir.inputs import load_image
from fti4cir.m2c import PROMPTS, M2CConfig, M2CModel, M2CNetwork, m2c_compose, save_m2c_weights


@pytest.fixture(scope="module")
def service(tiny_model, demo_galleries):
    from fti4cir.gallery import Gallery

    m2c_model = M2CModel(tiny_model.backbone, random_m2c(tiny_model.backbone, 2), tiny_model.preprocess_kind)
    return SearchService(tiny_model, Gallery.load("demo", model=tiny_model, galleries_dir=demo_galleries), m2c_model)


def m2c_query(service, image, text, method):
    with torch.no_grad():
        return m2c_compose(
            service.m2c_model, [image], [text], prompt=PROMPTS["default"], use_adapters=method == "m2c+compose"
        )


@pytest.mark.parametrize("method", ["m2c", "m2c+compose"])
def test_upload_search_ranks_by_the_m2c_query(service, method):
    path = service.gallery.paths[4]
    result = service.search(str(path), "is red and longer", method, k=6)
    query = m2c_query(service, load_image(path), "is red and longer", method)
    assert [h.index for h in result.hits] == brute_force(service, query)[:6]
    assert result.hits[0].score == pytest.approx(
        float(service.gallery.features[result.hits[0].index] @ query[0]), abs=1e-4
    )
    assert result.sentence.startswith("a photo of [") and result.sentence.endswith("] that is red and longer")


def test_gallery_reference_gets_its_visual_features_once_and_is_left_out(service, monkeypatch):
    reference = service.reference(7)
    assert reference.visual is None  # FTI4CIR needs only the cached tokens
    result = service.search(reference, "has long sleeves", "m2c+compose", k=11)
    assert reference.visual is not None and 7 not in [h.index for h in result.hits]
    query = m2c_query(service, load_image(service.gallery.paths[7]), "has long sleeves", "m2c+compose")
    assert [h.index for h in result.hits] == brute_force(service, query, exclude=7)[:11]
    passes = []
    original = service.model.backbone.encode_visual
    monkeypatch.setattr(service.model.backbone, "encode_visual", lambda x: passes.append(1) or original(x))
    service.search(reference, "is blue", "m2c", k=3)
    assert passes == []  # the features are kept with the reference


def test_methods_adapters_and_switches(service, tiny_model):
    assert service.methods == (*METHODS, "m2c", "m2c+compose")
    with_adapters = service.search(2, "is shorter", "m2c+compose", k=11)
    without = service.search(2, "is shorter", "m2c", k=11)
    assert [h.score for h in with_adapters.hits] != [h.score for h in without.hits]
    # the token switches act on FTI4CIR's tokens only
    switched = service.search(
        2, "is shorter", "m2c", k=11, keep_attributes=[False] * service.reference(2).num_kept, keep_subject=False
    )
    assert [h.index for h in switched.hits] == [h.index for h in without.hits]

    stage1 = SearchService(
        tiny_model,
        service.gallery,
        M2CModel(tiny_model.backbone, random_m2c(tiny_model.backbone, 1), tiny_model.preprocess_kind),
    )
    assert stage1.methods == (*METHODS, "m2c")
    with pytest.raises(UserError, match="Unknown method 'm2c\\+compose'"):
        stage1.search(2, "x", "m2c+compose")
    plain = SearchService(tiny_model, service.gallery)
    with pytest.raises(UserError, match="Unknown method 'm2c'"):
        plain.search(2, "x", "m2c")


def test_app_offers_the_m2c_methods_and_the_api_answers(service):
    import app

    demo = app.build_demo(app.Setup(service, [], []))
    assert [c[0] for c in page_props(demo)["method"]["choices"]] == list(service.methods)
    answer = api_search(demo)(None, service.gallery.names[1], "is red", "m2c+compose", 4)
    expected = service.search(1, "is red", "m2c+compose", 4)
    assert answer["method"] == "m2c+compose" and answer["sentence"] == expected.sentence
    assert [r["name"] for r in answer["results"]] == [h.name for h in expected.hits]


def test_app_loads_m2c_weights_or_says_why_not(tiny_model, demo_galleries, tmp_path):
    import app

    weights = save_m2c_weights(random_m2c(tiny_model.backbone, 2), tmp_path / "m2c.safetensors")
    args = app.parse_args(
        ["--tiny", "--galleries-dir", str(demo_galleries), "--device", "cpu", "--m2c-weights", str(weights)]
    )
    setup = app.load_service(args)
    assert setup.service.methods[-2:] == ("m2c", "m2c+compose")
    assert setup.service.m2c_model.preprocess_kind == setup.service.model.preprocess_kind  # as the gallery

    args.m2c_weights = str(tmp_path / "absent.safetensors")
    setup = app.load_service(args)
    assert setup.service is not None and setup.service.methods == METHODS  # FTI4CIR still works
    assert any("M2C methods are off" in n and "not found" in n for n in setup.notes)

    other = M2CNetwork(
        M2CConfig(embed_dim=8, token_dim=16, text_layers=2, grid=(2, 2), vsi_layers=(1,), vsi_heads=2, vsi_dim=8)
    )
    args.m2c_weights = str(save_m2c_weights(other, tmp_path / "other.safetensors"))
    setup = app.load_service(args)
    assert setup.service is not None and any("were made for backbone" in n for n in setup.notes)


def test_gallery_files_gone_gives_an_m2c_message_and_fti4cir_still_works(tiny_model, tmp_path):
    from fti4cir.gallery import Gallery

    galleries = build_small_gallery(tiny_model, tmp_path, 3)
    gallery = Gallery.load("demo", model=tiny_model, galleries_dir=galleries)
    service = SearchService(
        tiny_model,
        gallery,
        M2CModel(tiny_model.backbone, random_m2c(tiny_model.backbone, 1), tiny_model.preprocess_kind),
    )
    gallery.paths[0].unlink()
    assert service.search(service.reference(0, display=False), "is red", "fti4cir", k=2).hits
    with pytest.raises(UserError, match="The M2C methods read the gallery image itself"):
        service.search(service.reference(0, display=False), "is red", "m2c", k=2)


def test_page_sentence_says_which_tokens_the_table_shows(service):
    import app

    m2c_html = app.sentence_html(service.search(1, "is red", "m2c", k=3))
    assert "M2C reads the image as one pseudo token" in m2c_html
    assert "M2C" not in app.sentence_html(service.search(1, "is red", "fti4cir", k=3))
