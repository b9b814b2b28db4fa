"""The method registry (`fti4cir.methods`) and truncation reported by the query path instead of a warning."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import PIL.Image
import pytest
import torch

from conftest import random_m2c
from fti4cir import create_model, methods, prompts
from fti4cir.compose import METHODS, compose, compose_query
from fti4cir.errors import UserError
from fti4cir.m2c import (
    PROMPTS,
    M2CModel,
    available_methods,
    m2c_compose,
    save_m2c_weights,
)

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(["striped"] * 90)  # ~90 tokens: more than CLIP's 77-token context


@pytest.fixture(scope="module")
def images():
    return [PIL.Image.new("RGB", (32, 24), colour) for colour in ("red", "navy", "olive")]


def test_every_method_is_declared_once_with_what_it_needs():
    assert METHODS == ("fti4cir", "subject-only", "image-only", "text-only", "image+text")
    assert methods.names() == (*METHODS, "m2c", "m2c+compose")  # fti4cir.m2c imported: its methods registered
    assert methods.names("m2c") == ("m2c", "m2c+compose")
    fti4cir, m2c = methods.get("fti4cir"), methods.get("m2c+compose")
    assert (fti4cir.template, fti4cir.family, fti4cir.pseudo_tokens, fti4cir.patch_tokens) == (
        prompts.DEFAULT,
        "fti4cir",
        True,
        False,
    )
    assert (m2c.template, m2c.family, m2c.pseudo_tokens, m2c.patch_tokens) == (PROMPTS["default"], "m2c", False, True)
    assert methods.get("image-only").text is False and methods.get("text-only").template is None
    assert (
        m2c.template_for("fashioniq") == PROMPTS["fashioniq"]
        and fti4cir.template_for("cirr", "x * {text}") == "x * {text}"
    )
    with pytest.raises(ValueError, match="method must be one of"):
        methods.get("nope")
    with pytest.raises(ValueError, match="already declared"):
        methods.register(methods.Method("fti4cir", methods.get("text-only").compose, lambda *a: ""))


def test_the_core_does_not_import_m2c():
    code = (
        "import sys, fti4cir.explain, fti4cir.methods\n"
        "from fti4cir.compose import METHODS\n"
        "assert 'fti4cir.m2c' not in sys.modules, 'core imported m2c'\n"
        "assert fti4cir.methods.names() == METHODS\n"
        "import fti4cir.m2c\n"
        "print(fti4cir.methods.names('m2c'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "('m2c', 'm2c+compose')"


def test_runnable_methods_follow_the_models(tiny_model):
    stage1, stage2 = (M2CModel(tiny_model.backbone, random_m2c(tiny_model.backbone, s)) for s in (1, 2))
    assert methods.runnable({"fti4cir": tiny_model}) == METHODS
    assert methods.runnable({"fti4cir": tiny_model, "m2c": stage1}) == (*METHODS, "m2c")
    assert methods.runnable({"fti4cir": tiny_model, "m2c": stage2}) == (*METHODS, "m2c", "m2c+compose")
    assert available_methods(stage2.config) == ("m2c", "m2c+compose")


def test_compose_says_which_texts_were_cut_without_warning(tiny_model, images):
    texts = [("is red", "is dark"), (LONG, "x"), ("is blue", LONG)]  # a variant that is cut marks its reference
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        for method in METHODS:
            composed = compose_query(tiny_model, images, texts, method=method)
            expected = [False, False, False] if method == "image-only" else [False, True, True]
            assert composed.truncated.tolist() == expected, method
            torch.testing.assert_close(composed.features, compose(tiny_model, images, texts, method=method))


def test_m2c_methods_run_through_compose(tiny_model, images, tmp_path):
    m2c_model = M2CModel(tiny_model.backbone, random_m2c(tiny_model.backbone, 2))
    with torch.no_grad():
        for method, adapters in (("m2c", False), ("m2c+compose", True)):
            expected = m2c_compose(m2c_model, images, ["is red", LONG, "x"], use_adapters=adapters)
            composed = compose_query(m2c_model, images, ["is red", LONG, "x"], method=method)
            torch.testing.assert_close(composed.features, expected)
            assert composed.truncated.tolist() == [False, True, False]
        # an FTI4CIR model built with M2C weights runs them too (on its `.m2c`); without, a user error
        weights = save_m2c_weights(m2c_model.net, tmp_path / "m2c.safetensors")
        model = create_model("fti4cir-tiny", None, device="cpu", seed=0, m2c_weights=weights)
        torch.testing.assert_close(
            compose(model, images, ["is red"] * 3, method="m2c+compose"),
            m2c_compose(model.m2c, images, ["is red"] * 3, use_adapters=True),
        )
        with pytest.raises(UserError, match="M2C weights"):
            compose(tiny_model, images, ["is red"] * 3, method="m2c")
