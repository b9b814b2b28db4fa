"""Copying the demo photos: split/class layout kept, downscaled, EXIF orientation applied, RGB JPEG, licence copied,
nothing outside the split folders copied; and the committed copy in data/clothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_subcommand
from fti4cir.commands import demo as commands
from fti4cir.demo.photos import copy_photos, counts, source_photos
from fti4cir.errors import UserError

DATA = Path(__file__).resolve().parents[1] / "data" / "clothing"


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "train" / "dress").mkdir(parents=True)
    (src / "test" / "hat").mkdir(parents=True)
    (src / "imagenet-sample" / "n01").mkdir(parents=True)
    wide = Image.new("RGB", (600, 300), (200, 30, 30))
    wide.paste((30, 30, 200), (0, 0, 100, 300))  # a blue band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    wide.save(src / "train" / "dress" / "a.jpg", exif=exif.tobytes())
    Image.new("L", (100, 50), 128).save(src / "test" / "hat" / "b.jpg")
    Image.new("RGB", (20, 20)).save(src / "imagenet-sample" / "n01" / "x.jpg")
    (src / "test" / "hat" / "notes.txt").write_text("not a photo")
    (src / "LICENSE").write_text("CC0")
    return src


def test_copy_downscales_orients_and_keeps_the_layout(tmp_path):
    src, dest = _source(tmp_path), tmp_path / "dest"
    photos = copy_photos(src, dest, progress=False)
    assert [p.rel for p in photos] == ["train/dress/a.jpg", "test/hat/b.jpg"]
    assert counts(photos) == {"train": {"dress": 1}, "test": {"hat": 1}}
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "LICENSE",
        "test/hat/b.jpg",
        "train/dress/a.jpg",
    ]
    with Image.open(dest / "train" / "dress" / "a.jpg") as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (112, 224)  # rotated upright, longer side 224
        assert image.getexif().get(0x0112) in (None, 1)  # no orientation left to apply twice
        top = image.getpixel((56, 10))
        assert top[2] > 150 and top[0] < 80  # the blue band is now at the top
    with Image.open(dest / "test" / "hat" / "b.jpg") as image:
        assert image.mode == "RGB" and image.size == (100, 50)  # never enlarged
    assert (dest / "LICENSE").read_text() == "CC0"


def test_rerun_keeps_existing_copies_unless_overwrite(tmp_path):
    src, dest = _source(tmp_path), tmp_path / "dest"
    copy_photos(src, dest, progress=False)
    target = dest / "test" / "hat" / "b.jpg"
    target.write_bytes(b"kept")
    copy_photos(src, dest, progress=False)
    assert target.read_bytes() == b"kept"
    copy_photos(src, dest, progress=False, overwrite=True)
    assert target.read_bytes() != b"kept"


def test_demo_photos_needs_a_source_folder_with_photos(tmp_path):
    with pytest.raises(SystemExit):
        run_subcommand(commands, ["demo-photos"])  # the source is required: no default outside the repository
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        run_subcommand(commands, ["demo-photos", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError):
        source_photos(tmp_path / "missing")
    assert run_subcommand(commands, ["demo-photos", str(_source(tmp_path)), "--out", str(tmp_path / "o")]) == 0


def test_the_committed_photos_match_the_labels_and_the_readme():
    labels = json.loads((DATA / "labels.json").read_text())
    photos = source_photos(DATA)
    assert sorted(p.rel for p in photos) == sorted(p["path"] for p in labels["photos"])
    table = counts(photos)
    assert sum(map(sum, (t.values() for t in table.values()))) == 3781 and len(table["test"]) == 10
    readme = (DATA / "README.md").read_text()
    for classes in table.values():
        assert f"| {sum(classes.values())}" in readme
    assert "CC0" in (DATA / "LICENSE").read_text()[:200] and not (DATA.parent / "imagenet-sample").exists()
    for photo in photos[::500]:
        with Image.open(DATA / photo.rel) as image:
            assert image.mode == "RGB" and max(image.size) <= 224
