import open_clip
import pytest
import torch

from fti4cir import prompts
from fti4cir.tokens import PLACEHOLDER_ID, tokenize_prompts


def test_template_tokenization_equals_clip_tokenize_of_the_joint_sentence():
    texts = ["is red and has short sleeves", "Is shinier, with a floral pattern!", "emoji 👗 ok"]
    counts = [3, 0, 12]
    ids, mask = tokenized = tokenize_prompts(prompts.DEFAULT, [{"text": t} for t in texts], counts)
    assert tokenized.truncated.tolist() == [False] * 3
    joint = [f"a photo of * with {'* ' * r}but {t}" for t, r in zip(texts, counts)]  # the official string
    torch.testing.assert_close(ids, open_clip.tokenize(joint))
    assert mask.sum(1).tolist() == [r + 1 for r in counts]
    assert (ids[mask] == PLACEHOLDER_ID).all()


def test_user_typed_star_is_not_a_placeholder():
    ids, mask = tokenize_prompts(prompts.DEFAULT, [{"text": "* with a * print"}], [2])
    assert int((ids == PLACEHOLDER_ID).sum()) == 5  # 3 from the template + 2 typed by the user
    assert int(mask.sum()) == 3
    last_placeholder = int(mask[0].nonzero().max())
    user_stars = (ids[0] == PLACEHOLDER_ID).nonzero().flatten()
    assert all(int(p) > last_placeholder for p in user_stars[3:])


def test_braces_in_user_text_are_literal():
    ids, _ = tokenize_prompts(prompts.DEFAULT, [{"text": "{text} {attrs} {0}"}], [1])
    expected = open_clip.tokenize(["a photo of * with * but {text} {attrs} {0}"])
    torch.testing.assert_close(ids, expected)


def test_long_text_is_truncated_keeping_eot_and_placeholders():
    long_text = "very " * 200
    ids, mask = tokenized = tokenize_prompts(prompts.DEFAULT, [{"text": long_text}, {"text": "x"}], [12, 12])
    assert tokenized.truncated.tolist() == [True, False]  # said per row, no warning
    ids, mask = ids[:1], mask[:1]
    assert ids.shape == (1, 77) and int(ids[0, -1]) == 49407
    assert int(mask.sum()) == 13
    # the same as clip.tokenize(truncate=True) of the official sentence
    torch.testing.assert_close(ids, open_clip.tokenize([f"a photo of * with {'* ' * 12}but {long_text}"]))


def test_long_field_before_placeholders_is_cut_not_the_placeholders():
    ids, mask = tokenized = tokenize_prompts(prompts.ATTRIBUTE_WISE, [{"subject": "dress " * 100}], [5])
    assert tokenized.truncated.tolist() == [True]
    assert int(mask.sum()) == 5 and int(ids[0, -1]) == 49407
    assert mask[0, -6:-1].all()  # the placeholders sit right before the EOT token


def test_placeholders_that_cannot_fit_raise():
    with pytest.raises(ValueError, match="placeholders"):
        tokenize_prompts(prompts.DEFAULT, [{"text": "x"}], [80])


def test_fashioniq_texts_follow_the_official_rule():
    forward, backward = prompts.fashioniq_texts(" is Longer. ", "has RED dots?")
    assert forward == "Is longer and has RED dots"
    assert backward == "has RED dots and is Longer"
