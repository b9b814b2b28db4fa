"""The garment colour labeller: synthetic garments of every colour on plain backgrounds, and the committed human
check of real photos (data/clothing/colour_check.csv) against the committed labels and against the labeller in the
code; a second person's reading of part of them (data/clothing/colour_check_second_reading.csv) measures how often
two persons agree."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fti4cir.demo.colour_check import agreement, live_answers, persons_agreement, read_second, stored_answers
from fti4cir.demo.colours import MIN_CONFIDENCE, MIN_GARMENT_FRACTION, garment_colour, srgb_to_lab
from fti4cir.demo.labels import LABELS_VERSION
from fti4cir.demo.world import COLOURS

DATA = Path(__file__).resolve().parents[1] / "data" / "clothing"

GARMENTS = {
    "black": (22, 22, 25),
    "white": (245, 245, 242),
    "grey": (128, 128, 130),
    "red": (200, 30, 35),
    "orange": (240, 130, 30),
    "yellow": (240, 215, 45),
    "green": (40, 145, 65),
    "blue": (35, 65, 180),
    "purple": (115, 50, 150),
    "pink": (240, 150, 185),
    "brown": (115, 70, 40),
}
# measured on the committed check (see data/clothing/README.md); the tests fail if a labeller change lowers them.
# The labels stored in labels.json (labeller version 4), on the 120 photos of the first check (sets check + dev):
# 92/120 over all, 68/77 over the labelled ones.
AGREEMENT_ALL, AGREEMENT_LABELLED = 0.76, 0.88
# the labeller in the code (version 4), per set: (all, labelled, coverage). check + dev + tune were used to set its
# rules; fresh was read before and never used for that (its numbers are the honest estimate for unseen photos).
LIVE_AGREEMENT = {("check", "dev"): (0.76, 0.88, 0.64), ("tune",): (0.60, 0.73, 0.57), ("fresh",): (0.60, 0.73, 0.65)}
LIGHT, MID, DARK = (238, 238, 236), (165, 165, 168), (55, 55, 58)


def garment_photo(colour_rgb, background_rgb, seed=0, size=(120, 160)):
    """A T-shaped 'garment' with shading and sensor noise on a slightly uneven background."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    body = (abs(xx - w / 2) < w * 0.22) & (yy > h * 0.25) & (yy < h * 0.85)
    sleeves = (abs(xx - w / 2) < w * 0.38) & (yy > h * 0.25) & (yy < h * 0.45)
    mask = body | sleeves
    shade = 1.0 + 0.12 * (xx / w - 0.5) - 0.08 * (yy / h - 0.5)  # folds and light fall-off
    pixels = np.where(
        mask[..., None],
        np.array(colour_rgb) * shade[..., None],
        np.array(background_rgb) * (1.0 + 0.04 * (yy / h - 0.5))[..., None],
    )
    pixels = pixels + rng.normal(0, 3.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def backgrounds_for(colour):
    if colour == "white":
        return [MID, DARK]
    if colour == "grey":
        return [LIGHT, DARK]
    if colour == "black":
        return [LIGHT, MID]
    return [LIGHT, MID]


@pytest.mark.parametrize("colour", COLOURS)
def test_a_solid_garment_is_named_by_its_colour_on_plain_backgrounds(colour):
    for i, background in enumerate(backgrounds_for(colour)):
        label = garment_colour(garment_photo(GARMENTS[colour], background, seed=i))
        assert label.colour == colour, (colour, background, label.scores)
        assert label.confidence > 0.8 and label.reliable
        assert 0.2 < label.garment_fraction < 0.6  # the garment, not the background, was measured
        assert abs(sum(label.scores.values()) - 1) < 1e-3


def test_the_background_colour_does_not_leak_into_the_label():
    # a blue garment on a red blanket and a red garment on a blue one
    assert garment_colour(garment_photo(GARMENTS["blue"], (190, 40, 40))).colour == "blue"
    assert garment_colour(garment_photo(GARMENTS["red"], (40, 60, 170))).colour == "red"


def test_modes_and_orientation_are_handled():
    photo = garment_photo(GARMENTS["green"], LIGHT)
    assert garment_colour(photo.convert("RGBA")).colour == "green"
    assert garment_colour(photo.convert("P")).colour == "green"
    assert garment_colour(photo.rotate(90, expand=True)).colour == "green"


def test_a_blank_picture_is_not_reliable():
    label = garment_colour(Image.new("RGB", (100, 100), (200, 200, 200)))
    assert label.garment_fraction < 0.01 and not label.reliable


def test_lab_conversion_matches_reference_values():
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 255]], dtype=float))
    expected = np.array([[100, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]])
    assert np.allclose(lab, expected, atol=0.05)


def _check_rows():
    with open(DATA / "colour_check.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_colour_check_records_a_person_reading_of_at_least_60_photos_over_every_class():
    rows = _check_rows()
    assert len(rows) >= 60 and len({r["path"] for r in rows}) == len(rows)
    assert {r["set"] for r in rows} == {"check", "dev", "tune", "fresh"}
    assert sum(r["set"] == "fresh" for r in rows) >= 60
    assert {r["path"].split("/")[1] for r in rows} == {p.name for p in (DATA / "test").iterdir() if p.is_dir()}
    assert {r["human"] for r in rows} <= set(COLOURS) and len({r["human"] for r in rows}) >= 8
    for r in rows:
        assert (DATA / r["path"]).is_file()
        assert r["agree"] == str(int(r["labeller"] == r["human"]))
        assert r["ambiguous"] in ("0", "1")


def test_colour_check_agrees_with_the_committed_labels():
    labels = {p["path"]: p for p in json.loads((DATA / "labels.json").read_text())["photos"]}
    rows = _check_rows()
    for r in rows:  # the csv's labeller column is what labels.json holds, not an older labeller's answer
        assert labels[r["path"]]["colour_guess"] == r["labeller"]
        assert (labels[r["path"]]["colour"] is not None) == (r["labelled"] == "1")
    rows = [r for r in rows if r["set"] in ("check", "dev")]
    agreement = np.mean([r["labeller"] == r["human"] for r in rows])
    labelled = [r["labeller"] == r["human"] for r in rows if labels[r["path"]]["colour"] is not None]
    assert len(labelled) >= 0.6 * len(rows)
    assert agreement >= AGREEMENT_ALL and np.mean(labelled) >= AGREEMENT_LABELLED, (agreement, np.mean(labelled))


def test_the_labeller_in_the_code_agrees_with_the_person_reading_on_every_set():
    rows = _check_rows()
    answers = live_answers(rows, DATA)
    for sets, (min_all, min_labelled, min_coverage) in LIVE_AGREEMENT.items():
        s = agreement([r for r in rows if r["set"] in sets], answers)
        measured = (s["agree"] / s["n"], s["labelled_agree"] / s["labelled"], s["labelled"] / s["n"])
        floors = (min_all, min_labelled, min_coverage)
        assert all(m >= floor - 1e-9 for m, floor in zip(measured, floors)), (sets, measured, floors)


def test_the_labels_rerun_the_labeller_on_a_few_committed_photos():
    stored = json.loads((DATA / "labels.json").read_text())
    if stored["generator"]["version"] != LABELS_VERSION:
        pytest.skip(
            f"labels.json was written by labeller version {stored['generator']['version']}, the code is "
            f"version {LABELS_VERSION}: `fti4cir demo-labels` (and the demo rebuild after it) is pending"
        )
    for record in stored["photos"][::400]:
        with Image.open(DATA / record["path"]) as image:
            label = garment_colour(image)
        assert label.colour == record["colour_guess"]
        assert record["colour"] == (label.colour if label.reliable else None)
        assert label.reliable == (label.confidence >= MIN_CONFIDENCE and label.garment_fraction >= MIN_GARMENT_FRACTION)


def test_a_second_person_read_at_least_60_of_the_check_photos_blind():
    rows = _check_rows()
    order = [r["path"] for r in rows]
    with open(DATA / "colour_check_second_reading.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        second = list(reader)
    assert reader.fieldnames == ["path", "human", "ambiguous", "notes"]
    paths = [r["path"] for r in second]
    read = set(paths)
    assert len(paths) >= 60 and len(read) == len(paths)
    assert paths == [p for p in order if p in read]  # the csv's order
    assert {r["human"] for r in second} <= set(COLOURS)
    assert all(r["ambiguous"] in ("0", "1") for r in second)


def test_two_persons_agree_as_stated_and_the_labels_agree_with_them_where_they_agree():
    rows = _check_rows()
    second = read_second(DATA / "colour_check_second_reading.csv")
    labels = json.loads((DATA / "labels.json").read_text())
    answers = stored_answers(labels)
    s = persons_agreement(rows, second, answers)
    assert s["n"] == len(second)
    direct = np.mean([r["human"] == second[r["path"]]["human"] for r in rows if r["path"] in second])
    assert s["agree"] / s["n"] == pytest.approx(direct)
    # measured 130/152 (check 63/72, fresh 67/80); neither reading ambiguous 75/76
    assert s["agree"] / s["n"] >= 0.83, (s["agree"], s["n"])
    for sets in (("check",), ("fresh",)):
        t = persons_agreement([r for r in rows if r["set"] in sets], second, answers)
        assert t["n"] >= 60 and t["agree"] / t["n"] >= 0.80, (sets, t["agree"], t["n"])
    assert s["clear_agree"] / s["clear"] >= 0.95, (s["clear_agree"], s["clear"])
    # labels.json (version 4), on the labelled photos where the two persons agree: measured 74/87
    assert s["both"] >= 60 and s["both_agree"] / s["both"] >= 0.85, (s["both_agree"], s["both"])
