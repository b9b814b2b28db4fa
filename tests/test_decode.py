
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
    assert decoded_sentence(tiny_backbone, subject, attributes, "is longer") == \
        "a photo of [dress] with [floral, red] but is longer"
