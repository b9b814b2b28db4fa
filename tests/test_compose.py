import pytest
import torch
import torch.nn.functional as F

from fti4cir import PseudoTokens, compose, encode_with_pseudo_tokens, prompts
from fti4cir.official import official_compose, official_copy, official_replace_and_encode
from fti4cir.tokens import tokenize_prompts

TEXTS = ["is red", "has long sleeves and a floral print", "x", "is darker, shorter"]


@pytest.fixture(scope="module")
def model_with_varied_r(tiny_model):
    """The tiny model with epsilon chosen so that the kept count r differs across the test images."""
    tiny_model.inversion.config.epsilon = 0.0415
    yield tiny_model
    tiny_model.inversion.config.epsilon = 0.05


def test_compose_equals_official_per_sample_path(model_with_varied_r, images):
    model = model_with_varied_r
    with torch.no_grad():
        tokens = model.invert(images)
        assert len(set(tokens.num_kept.tolist())) > 1
        ours = compose(model, images, TEXTS)
        official = official_compose(model.backbone.clip, official_copy(model.inversion), images, TEXTS)
    assert (ours - F.normalize(official, dim=-1)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "template, mode, field",
    [
        (prompts.SUBJECT_WISE, 1, {"attribute": "a red collar"}),
        (prompts.ATTRIBUTE_WISE, 2, {"subject": "a dress"}),
        (prompts.PSEUDO_SENTENCE, 0, {}),
    ],
)
def test_injection_equals_official_token_replace_for_every_mode(model_with_varied_r, images, template, mode, field):
    model = model_with_varied_r
    with torch.no_grad():
        t = model.invert(images)
        counts = t.num_kept.tolist()
        pseudo = {0: torch.cat([t.subject[:, None], t.attributes], 1), 1: t.subject[:, None], 2: t.attributes}[mode]
        ours = encode_with_pseudo_tokens(model.backbone, template, pseudo, t.num_kept, [field] * 4)
        ids, _ = tokenize_prompts(template, [field] * 4, counts)
        ref = official_replace_and_encode(model.backbone.clip, ids, t.subject, t.attributes, counts, mode)
    assert (ours - ref).abs().max() <= 1e-5


def test_cached_tokens_and_images_give_the_same_query(tiny_model, images):
    with torch.no_grad():
        tokens = tiny_model.invert(images)
        assert torch.equal(compose(tiny_model, images, TEXTS), compose(tiny_model, tokens, TEXTS))


def test_text_variants_are_averaged_and_renormalised(tiny_model, images):
    pairs = [prompts.fashioniq_texts("is red", "has a bow")] * 4
    with torch.no_grad():
        both = compose(tiny_model, images, pairs)
        first = compose(tiny_model, images, [p[0] for p in pairs])
        second = compose(tiny_model, images, [p[1] for p in pairs])
    torch.testing.assert_close(both, F.normalize(first + second, dim=-1))


def test_methods(tiny_model, images):
    with torch.no_grad():
        image = F.normalize(tiny_model.backbone.encode_image(images), dim=-1)
        text = F.normalize(tiny_model.backbone.encode_text(TEXTS), dim=-1)
        torch.testing.assert_close(compose(tiny_model, images, TEXTS, method="image-only"), image)
        torch.testing.assert_close(compose(tiny_model, images, TEXTS, method="text-only"), text)
        torch.testing.assert_close(
            compose(tiny_model, images, TEXTS, method="image+text"), F.normalize(image + text, dim=-1)
        )
        t = tiny_model.invert(images)
        subject_only = encode_with_pseudo_tokens(
            tiny_model.backbone, "a photo of * that {text}", t.subject[:, None], None, [{"text": x} for x in TEXTS]
        )
        torch.testing.assert_close(
            compose(tiny_model, t, TEXTS, method="subject-only"), F.normalize(subject_only, dim=-1)
        )
    with pytest.raises(ValueError, match="method"):
        compose(tiny_model, images, TEXTS, method="nope")


def test_switching_tokens_off(tiny_model, images):
    with torch.no_grad():
        t = tiny_model.invert(images)
        all_on = torch.ones(4, t.attributes.shape[1], dtype=torch.bool)
        assert torch.equal(compose(tiny_model, t, TEXTS, keep_attributes=all_on), compose(tiny_model, t, TEXTS))
        off = all_on.clone()
        off[:, 0] = False  # drop each image's first kept attribute
        dropped = compose(tiny_model, t, TEXTS, keep_attributes=off)
        r = t.num_kept
        manual = PseudoTokens(
            t.subject, torch.cat([t.attributes[:, 1:], t.attributes[:, :1]], 1), r - 1, t.image_features
        )
        torch.testing.assert_close(dropped, compose(tiny_model, manual, TEXTS))
        no_subject = compose(tiny_model, t, TEXTS, keep_subject=torch.zeros(4, dtype=torch.bool))
        assert (no_subject - compose(tiny_model, t, TEXTS)).abs().max() > 1e-4


def test_compose_is_differentiable_in_the_inversion_network(tiny_model, images):
    tiny_model.inversion.zero_grad()
    compose(tiny_model, images, TEXTS).sum().backward()
    grads = [p.grad for p in tiny_model.inversion.subject_mapper.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in tiny_model.backbone.parameters())
    tiny_model.inversion.zero_grad()


def test_pil_references_of_any_mode(tiny_model):
    from PIL import Image

    refs = [
        Image.new("RGBA", (300, 120), (10, 200, 30, 128)),
        Image.new("L", (50, 50), 80),
        Image.new("P", (64, 32)),
        Image.new("CMYK", (40, 90)),
    ]
    with torch.no_grad():
        assert compose(tiny_model, refs, ["a", "b", "c", "d"]).shape == (4, 64)
