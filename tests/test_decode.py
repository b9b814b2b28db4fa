import torch

from fti4cir import decode, decoded_sentence
from fti4cir.tokens import bpe


def test_decode_returns_the_word_a_token_embedding_came_from(tiny_backbone):
    table = tiny_backbone.clip.token_embedding.weight
    ids = [bpe("dress")[0], bpe("red")[0]]
    words = decode(tiny_backbone, table[ids] * 3.0, k=3)  # scale does not matter: cosine
    assert [w[0].word for w in words] == ["dress", "red"]
    assert abs(words[0][0].score - 1.0) < 1e-5
    assert words[0][0].score >= words[0][1].score >= words[0][2].score


def test_decoded_sentence(tiny_backbone):
    table = tiny_backbone.clip.token_embedding.weight
    subject = table[bpe("dress")[0]]
    attributes = table[[bpe("floral")[0], bpe("red")[0]]]
    assert (
        decoded_sentence(tiny_backbone, subject, attributes, "is longer")
        == "a photo of [dress] with [floral, red] but is longer"
    )


def test_vocabulary_is_normalised_once_and_again_after_the_table_changes(tiny_backbone, monkeypatch):
    import importlib

    decode_module = importlib.import_module("fti4cir.decode")  # the package exports the function under that name

    calls = []
    real = decode_module.F.normalize
    monkeypatch.setattr(decode_module.F, "normalize", lambda x, *a, **kw: calls.append(x.shape) or real(x, *a, **kw))
    table = tiny_backbone.clip.token_embedding.weight
    dress, red = bpe("dress")[0], bpe("red")[0]
    decode(tiny_backbone, table[[dress]], k=1)
    decode(tiny_backbone, table[[dress]], k=1)
    assert calls.count(table.shape) <= 1  # the table at most once (earlier tests may have cached it already)
    saved = table[dress].detach().clone()
    try:
        with torch.no_grad():
            table[dress] = table[red]  # an in-place change of the table must not be served from the cache
        assert decode(tiny_backbone, table[[red]], k=2)[0][0].score > 0.999
        assert {w.word for w in decode(tiny_backbone, table[[red]], k=2)[0]} == {"dress", "red"}
    finally:
        with torch.no_grad():
            table[dress] = saved
