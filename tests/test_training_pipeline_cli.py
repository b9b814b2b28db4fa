"""Issue 3 end to end: every training stage from the command line on shared photos, tiny backbone, tiny BLIP."""

import json

from conftest import place_photos, shared_data
from fti4cir.cli import main


def test_caption_split_features_train_from_the_cli(tmp_path):
    photos = tmp_path / "photos"
    place_photos(sorted(shared_data("photos", "clothing", "train").rglob("*.jpg"))[::40][:12], photos)
    model = ["--backbone", "fti4cir-tiny", "--pretrained", "none", "--device", "cpu"]
    assert main(["caption", str(photos), "--out", str(tmp_path / "captions.jsonl"), "--model", "tiny-random"]) == 0
    assert len((tmp_path / "captions.jsonl").read_text().splitlines()) == 12
    assert main(["split-captions", str(tmp_path / "captions.jsonl"), "--out", str(tmp_path / "pairs.jsonl")]) == 0
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 4 and all(p["subject"] and p["attribute"] for p in pairs)  # 9 with the seeded tiny BLIP
    cache = str(tmp_path / "cache")
    assert main(["features", str(photos), "--cache-dir", cache, *model]) == 0
    assert (
        main(
            [
                "train",
                "--images",
                str(photos),
                "--pairs",
                str(tmp_path / "pairs.jsonl"),
                "--out",
                str(tmp_path / "run"),
                "--cache-dir",
                cache,
                "--epochs",
                "1",
                "--batch-size",
                "4",
                *model,
            ]
        )
        == 0
    )
    assert (tmp_path / "run" / "fti4cir.safetensors").exists() and (tmp_path / "run" / "fti4cir.json").exists()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1
