"""Explanation data: decoded words and sentence, relevance weights with kept/dropped, attention heatmaps."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from fti4cir.explain import AttributeEvidence, explain, heatmap_overlay, model_view, patch_attention, query_sentence
from fti4cir.inversion import PseudoTokens
from fti4cir.tokens import bpe

GRID = 7  # the tiny model's 7x7 patch grid


def word_embedding(backbone, word: str) -> torch.Tensor:
    return backbone.clip.token_embedding.weight[bpe(word)[0]].detach().clone()


def designed_tokens(backbone, subject: str, attributes: list[str], topk: int = 12) -> PseudoTokens:
    """Pseudo tokens that are exactly the embeddings of known words, so their decoded words are known."""
    attrs = torch.zeros(1, topk, backbone.token_dim)
    for i, word in enumerate(attributes):
        attrs[0, i] = word_embedding(backbone, word)
    return PseudoTokens(
        word_embedding(backbone, subject)[None],
        attrs,
        torch.tensor([len(attributes)]),
        torch.zeros(1, backbone.embed_dim),
    )


def one_hot_attention(num_k: int, hot: dict[int, int]) -> np.ndarray:
    """[num_k, g*g] small uniform attention with one strong patch for the given queries."""
    maps = np.full((num_k, GRID * GRID), 0.01, dtype=np.float32)
    for query, patch in hot.items():
        maps[query, patch] = 0.5
    return maps


def test_patch_attention_averages_layers_and_heads_over_patch_columns():
    num_k, patches, batch, heads = 3, 4, 2, 2
    torch.manual_seed(0)
    layers = [torch.rand(batch, heads, num_k, num_k + 1 + patches) for _ in range(3)]
    got = patch_attention(layers, num_k)
    assert got.shape == (batch, num_k, patches)
    for b in range(batch):
        for q in range(num_k):
            for p in range(patches):
                expected = sum(layer[b, h, q, num_k + 1 + p] for layer in layers for h in range(heads)) / 6
                assert got[b, q, p].item() == pytest.approx(expected.item(), rel=1e-6)


def test_evidence_from_a_real_inversion(tiny_model):
    torch.manual_seed(3)
    with torch.no_grad():
        tokens = tiny_model.invert(torch.randn(2, 3, 224, 224), return_attention=True)
    config = tiny_model.inversion.config
    for row in range(2):
        evidence = AttributeEvidence.from_selection(tokens.selection, row)
        r = int(tokens.num_kept[row])
        assert evidence.relevance.shape == (config.num_k,)
        assert evidence.relevance.sum() == pytest.approx(1.0, abs=1e-5)
        assert evidence.kept.tolist() == tokens.selection.indices[row, :r].tolist()
        assert evidence.attention.shape == (config.num_k, GRID * GRID)
        # kept queries are those over the threshold (at least one is always kept)
        over = np.flatnonzero(evidence.relevance > config.epsilon)
        if len(over):
            assert set(evidence.kept.tolist()) == set(over.tolist())
        else:
            assert r == 1 and evidence.kept[0] == int(np.argmax(evidence.relevance))


def test_heatmaps_require_attention(tiny_model):
    image = PIL.Image.new("RGB", (224, 224), (90, 90, 90))
    with torch.no_grad():
        tokens = tiny_model.invert(tiny_model.preprocess([image]), return_attention=False)
    evidence = AttributeEvidence.from_selection(tokens.selection)
    assert evidence.attention is None and len(evidence.kept) == int(tokens.num_kept[0])
    assert explain(tiny_model, tokens, evidence).heatmaps == []  # words and relevance need no maps
    with pytest.raises(ValueError, match="return_attention"):
        explain(tiny_model, tokens, evidence, image)


def test_explanation_words_sentence_and_switches(tiny_model):
    backbone = tiny_model.backbone
    tokens = designed_tokens(backbone, "dress", ["floral", "red", "sleeveless"])
    relevance = np.full(24, 0.01, dtype=np.float32)
    relevance[[3, 7, 20]] = [0.3, 0.2, 0.26]
    evidence = AttributeEvidence(relevance, np.array([3, 7, 20]), one_hot_attention(24, {}))
    explanation = explain(tiny_model, tokens, evidence)  # no image: no heatmaps

    assert explanation.subject.word == "dress"
    assert [a.word for a in explanation.attributes] == ["floral", "red", "sleeveless"]
    assert [a.query for a in explanation.attributes] == [3, 7, 20]
    assert explanation.subject.words[0].score == pytest.approx(1.0, abs=1e-5)
    for token in [explanation.subject, *explanation.attributes]:
        assert len(token.words) == 3
        scores = [w.score for w in token.words]
        assert scores == sorted(scores, reverse=True) and scores[1] < 0.999  # 2nd/3rd are other words
    assert explanation.epsilon == tiny_model.inversion.config.epsilon
    assert explanation.dropped.tolist() == [q for q in range(24) if q not in (3, 7, 20)]
    assert explanation.heatmaps == []

    text = "has a * and costs $5"
    assert (
        query_sentence(explanation, text)
        == "a photo of [dress] with [floral, red, sleeveless] but has a * and costs $5"
    )
    assert (
        query_sentence(explanation, text, keep_attributes=[True, False, True])
        == "a photo of [dress] with [floral, sleeveless] but has a * and costs $5"
    )
    assert (
        query_sentence(explanation, "is red", keep_subject=False)
        == "a photo of something with [floral, red, sleeveless] but is red"
    )
    assert query_sentence(explanation, "is red", keep_attributes=[False] * 3) == "a photo of [dress] with but is red"
    assert query_sentence(explanation, "is red", "subject-only") == "a photo of [dress] that is red"
    assert query_sentence(explanation, "is red", "text-only") == "is red"
    assert "is red" in query_sentence(explanation, "is red", "image+text")
    assert "[" not in query_sentence(explanation, "is red", "image-only")


def test_explain_checks_evidence_matches_tokens(tiny_model):
    tokens = designed_tokens(tiny_model.backbone, "dress", ["red"])
    evidence = AttributeEvidence(np.full(24, 1 / 24, np.float32), np.array([1, 2]), one_hot_attention(24, {}))
    with pytest.raises(ValueError, match="keeps 2"):
        explain(tiny_model, tokens, evidence)


def test_heatmaps_follow_each_kept_query(tiny_model):
    tokens = designed_tokens(tiny_model.backbone, "dress", ["floral", "red"])
    # query 3 looks at the top-left patch, query 7 at the bottom-right one; query 0 (not kept) at the centre
    attention = one_hot_attention(24, {3: 0, 7: GRID * GRID - 1, 0: 24})
    evidence = AttributeEvidence(np.full(24, 1 / 24, np.float32), np.array([3, 7]), attention)
    grey = PIL.Image.new("RGB", (224, 224), (128, 128, 128))
    explanation = explain(tiny_model, tokens, evidence, grey)

    assert len(explanation.heatmaps) == 2
    patch = 224 // GRID
    for heatmap, (row, col) in zip(explanation.heatmaps, [(0, 0), (GRID - 1, GRID - 1)]):
        assert heatmap.size == (224, 224) and heatmap.mode == "RGB"
        change = np.abs(np.asarray(heatmap, np.float32) - 128).sum(axis=-1)
        y, x = np.unravel_index(np.argmax(change), change.shape)
        assert (y // patch, x // patch) == (row, col)
        centre = change[3 * patch + patch // 2, 3 * patch + patch // 2]
        assert change.max() > centre + 50  # the hot patch stands out; the centre (query 0's) does not


def test_heatmap_overlay_keeps_the_picture_and_rejects_non_square_grids():
    image = PIL.Image.new("RGB", (64, 32), (0, 200, 0))
    flat = heatmap_overlay(image, np.zeros(16, np.float32))  # no signal: a uniform tint, picture still visible
    pixels = np.asarray(flat)
    assert flat.size == (64, 32)
    assert (pixels == pixels[0, 0]).all() and pixels[0, 0, 1] > 100
    with pytest.raises(ValueError, match="square"):
        heatmap_overlay(image, np.zeros(15, np.float32))


def test_model_view_is_the_square_the_model_sees(tiny_model):
    wide = PIL.Image.new("RGB", (400, 100), (255, 0, 0))  # more elongated than 1.25: targetpad pads with black
    view = model_view(tiny_model, wide)
    assert view.size == (224, 224)
    pixels = np.asarray(view).astype(int)
    # 400x100 is padded to 400x320 (ratio 1.25), resized to 280x224 and centre-cropped: black bands of about 77 rows
    # above and below a red band of about 70 rows
    assert np.abs(pixels[112, 112] - (255, 0, 0)).max() <= 2
    assert pixels[:70, 112].max() <= 2 and pixels[-70:, 112].max() <= 2
