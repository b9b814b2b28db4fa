"""Captions of the demo photos: varied, agreeing in number, single-photo, and split by spaCy into garment + rest."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import open_clip
import pytest

from fti4cir.demo.captions import FTI4CIR_FORMS, caption, write_captions
from fti4cir.demo.world import CLASS_WORDS, COLOURS, PLURAL_WORDS
from fti4cir.errors import UserError
from fti4cir.training.caption_split import load_spacy, split_captions
from fti4cir.training.captions import read_captions

DATA = Path(__file__).resolve().parents[1] / "data" / "clothing"


def test_every_class_word_and_colour_is_one_clip_token():
    tokenizer = open_clip.get_tokenizer("fti4cir-tiny")
    for word in [*CLASS_WORDS.values(), *COLOURS]:
        ids = tokenizer([word])[0]
        assert int((ids != 0).sum()) == 3, word  # start, the word, end


def test_captions_are_varied_and_deterministic():
    made = [caption("dress", "red", random.Random(seed)) for seed in range(200)]
    assert len(set(made)) >= 15
    assert all("dress" in c and "red" in c for c in made)
    assert made == [caption("dress", "red", random.Random(seed)) for seed in range(200)]
    phrasings = " | ".join(made)
    for phrase in ("in red", "is red", "instead of", "coloured red", "a red dress"):
        assert phrase in phrasings


def test_fti4cir_forms_name_only_what_the_photo_shows():
    others = set(CLASS_WORDS.values()) - {"dress"}
    for seed in range(300):
        words = caption("dress", "red", random.Random(seed), forms="fti4cir").replace(",", "").split()
        assert not (set(words) & (set(COLOURS) - {"red"})) and not (set(words) & others)
        assert "instead" not in words
    for seed in range(100):
        assert not set(caption("dress", None, random.Random(seed)).split()) & others


def test_plural_garments_agree_in_number():
    made = {caption("pants", "blue", random.Random(seed)) for seed in range(300)}
    assert not any(c.startswith("a pants") or " pants is " in c or "pants that is " in c for c in made)
    assert any("these pants are blue" == c or "pants that are blue" == c for c in made)
    assert {"pants", "shoes", "shorts"} == PLURAL_WORDS


def test_photos_without_a_colour_get_no_colour_word():
    for seed in range(50):
        text = caption("skirt", None, random.Random(seed))
        assert "skirt" in text and not any(c in text.split() for c in COLOURS)


def test_unknown_colour_or_form_set_is_a_user_error():
    with pytest.raises(UserError):
        caption("dress", "magenta", random.Random(0))
    with pytest.raises(UserError):
        caption("dress", "red", random.Random(0), forms="nope")


@pytest.fixture(scope="module")
def nlp():
    return load_spacy()


def test_fti4cir_forms_split_into_the_garment_and_the_rest(nlp):
    rng = random.Random(3)
    texts, expected = [], []
    for form in FTI4CIR_FORMS:
        for word in CLASS_WORDS.values():
            colour = rng.choice(COLOURS)
            text = caption(word, colour, random.Random(f"{form}{word}"), forms="fti4cir")
            texts.append(text)
            expected.append((word, colour))
    result = split_captions(texts, nlp)
    # only the three-word plural forms ("pants in red") are dropped, as too short
    assert result.dropped["too_short"] == sum(len(t.split()) < 4 for t in texts)
    assert result.total_dropped == result.dropped["too_short"]
    assert len(result.pairs) >= 0.9 * len(texts)
    for index, subject, attribute in result.pairs:
        word, colour = expected[index]
        assert subject.split()[-1] == word and len(subject.split()) <= 2, (texts[index], subject)
        assert colour in attribute.split(), (texts[index], attribute)


def test_write_captions_writes_the_caption_stage_format(tmp_path, nlp):
    labels = json.loads((DATA / "labels.json").read_text())
    labels = {**labels, "photos": [p for p in labels["photos"] if p["split"] == "validation"][:40]}
    out = tmp_path / "captions.jsonl"
    records = write_captions(labels, "validation", out, seed=1, photos_root=DATA, progress=False)
    read, torn = read_captions(out)
    assert read == records and not torn and len(records) == 40
    for record, photo in zip(records, labels["photos"]):
        path = DATA / "validation" / record["image"]
        assert record["image"] == photo["path"].removeprefix("validation/")
        assert record["sha1"] == hashlib.sha1(path.read_bytes()).hexdigest()
        assert photo["word"] in record["caption"]
        if photo["colour"] is not None:
            assert photo["colour"] in record["caption"]
    again = write_captions(labels, "validation", tmp_path / "again.jsonl", seed=1, photos_root=DATA, progress=False)
    assert again == records
    assert (
        write_captions(labels, "validation", tmp_path / "other.jsonl", seed=2, photos_root=DATA, progress=False)
        != records
    )
    with pytest.raises(UserError):
        write_captions(labels, "test", tmp_path / "none.jsonl", photos_root=DATA, progress=False)
