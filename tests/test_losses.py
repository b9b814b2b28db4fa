"""The training losses against a literal re-statement of the official code (77-token text, per-sample loops)."""

import math

import pytest
import torch

from fti4cir.official import (
    official_contrastive,
    official_copy,
    official_get_loss,
    official_orthogonal,
    official_regularisation,
)
from fti4cir.training.losses import (
    caption_features,
    fti4cir_loss,
    nt_xent,
    orthogonality_loss,
    pseudo_sentence_features,
    triwise_regularisation,
)

SUBJECTS = ["a dog", "two red cars", "a woman 's hat", "the old wooden bridge"]
ATTRIBUTES = [
    "on a sunny beach",
    "parked in front of a house with a very long driveway",
    "made of straw",
    "over a river at dusk",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model ops are all overhead: a second intra-op thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_model):
    """The tiny model with epsilon chosen so that the kept count r differs across the test images."""
    tiny_model.inversion.config.epsilon = 0.0415
    yield tiny_model
    tiny_model.inversion.config.epsilon = 0.05


# ---- NT-Xent ----------------------------------------------------------------------------------------------------
def test_nt_xent_hand_checked_cases():
    e = torch.eye(4)
    # perfect pairs: each row sees its positive (cos 1) and two orthogonal negatives
    assert float(nt_xent(e[:2], e[:2], 0.2)) == pytest.approx(math.log(1 + 2 * math.exp(-5)), abs=1e-6)
    # positives orthogonal like all negatives: log(3) for every row
    assert float(nt_xent(e[:2], e[2:], 0.2)) == pytest.approx(math.log(3), abs=1e-6)
    # one pair: the positive is the only other vector, loss 0 whatever the vectors
    assert float(nt_xent(torch.randn(1, 8), torch.randn(1, 8), 0.2)) == pytest.approx(0.0, abs=1e-6)
    # image-image negatives count: a duplicated image makes the loss larger than with distinct images
    dup = torch.stack([e[0], e[0]])
    assert float(nt_xent(dup, e[:2], 0.2)) > float(nt_xent(e[:2], e[:2], 0.2)) + 0.5


def test_nt_xent_equals_official_and_ignores_scale():
    torch.manual_seed(0)
    v1, v2 = torch.randn(16, 32), torch.randn(16, 32)
    for t in (0.2, 0.07, 1.0):
        assert float(nt_xent(v1, v2, t)) == pytest.approx(float(official_contrastive(v1, v2, t)), rel=1e-5)
    assert float(nt_xent(3 * v1, 0.5 * v2, 0.2)) == pytest.approx(float(nt_xent(v1, v2, 0.2)), rel=1e-6)


# ---- orthogonality ----------------------------------------------------------------------------------------------
def test_orthogonality_hand_checked_and_official():
    assert float(orthogonality_loss(torch.eye(3).unsqueeze(0))) == pytest.approx(0.0, abs=1e-7)
    same = torch.ones(1, 2, 5)  # cos matrix all ones: off-diagonals (2 of 4 entries) are 1 off
    assert float(orthogonality_loss(same)) == pytest.approx(0.5, abs=1e-6)
    torch.manual_seed(0)
    feats = torch.randn(6, 12, 64)
    assert float(orthogonality_loss(feats)) == pytest.approx(float(official_orthogonal(feats)), rel=1e-5)


# ---- regularisation and the total, on the tiny model ------------------------------------------------------------
def test_regularisation_equals_official(model, images):
    bb = model.backbone
    with torch.no_grad():
        tokens = model.invert(bb.encode_visual(images))
        counts = tokens.num_kept.tolist()
        assert len(set(counts)) > 1
        whole = pseudo_sentence_features(bb, tokens)
        ours = triwise_regularisation(bb, tokens, SUBJECTS, ATTRIBUTES, whole_features=whole)
        official = official_regularisation(
            bb.clip, SUBJECTS, ATTRIBUTES, whole, tokens.subject, tokens.attributes, counts
        )
        cached_target = triwise_regularisation(
            bb, tokens, SUBJECTS, ATTRIBUTES, target_features=caption_features(bb, SUBJECTS, ATTRIBUTES)
        )
    assert abs(float(ours) - float(official)) <= 1e-5
    assert float(cached_target) == pytest.approx(float(ours), abs=1e-6)


def test_subject_weight_scales_only_the_subject_wise_sentence(model, images):
    """Weight 1 is the official sum; weight w adds (w - 1) x the subject-wise term and leaves the others alone."""
    bb = model.backbone
    with torch.no_grad():
        tokens = model.invert(bb.encode_visual(images))
        reg = {
            w: float(triwise_regularisation(bb, tokens, SUBJECTS, ATTRIBUTES, subject_weight=w))
            for w in (0.0, 1.0, 3.5)
        }
        subject_wise = reg[1.0] - reg[0.0]
    assert subject_wise > 0.01  # a random network's subject sentence is far from the caption
    assert reg[3.5] == pytest.approx(reg[0.0] + 3.5 * subject_wise, rel=1e-5)
    assert model.inversion.config.subject_weight == 1.0  # the official default
    model.inversion.config.subject_weight = 3.5
    try:
        with torch.no_grad():
            terms = fti4cir_loss(model, bb.encode_visual(images), SUBJECTS, ATTRIBUTES)
    finally:
        model.inversion.config.subject_weight = 1.0
    assert float(terms.regularisation) == pytest.approx(reg[3.5], rel=1e-5)


def test_total_loss_equals_official_get_loss(model, images):
    bb = model.backbone
    official_net = official_copy(model.inversion)
    with torch.no_grad():
        terms = fti4cir_loss(model, bb.encode_visual(images), SUBJECTS, ATTRIBUTES)
        total, (contrastive, orthogonal, reg) = official_get_loss(bb.clip, official_net, images, SUBJECTS, ATTRIBUTES)
    assert abs(float(terms.contrastive) - float(contrastive)) <= 1e-5
    assert abs(float(terms.orthogonal) - float(orthogonal)) <= 1e-5
    assert abs(float(terms.regularisation) - float(reg)) <= 1e-5
    assert abs(float(terms.total) - float(total)) <= 1e-5
    expected = terms.contrastive + terms.orthogonal + 1.4 * terms.regularisation
    assert float(terms.total) == pytest.approx(float(expected), rel=1e-6)


def test_gradients_reach_only_the_inversion_network(model, images):
    bb = model.backbone
    visual = bb.encode_visual(images)
    model.inversion.zero_grad(set_to_none=True)
    fti4cir_loss(model, visual, SUBJECTS, ATTRIBUTES).total.backward()
    grads = {name: p.grad for name, p in model.inversion.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert float(grads["subject_mapper.0.weight"].abs().sum()) > 0
    assert float(grads["attribute_queries"].abs().sum()) > 0
    assert all(p.grad is None for p in bb.parameters())
    model.inversion.zero_grad(set_to_none=True)
