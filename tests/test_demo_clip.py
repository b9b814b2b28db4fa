"""The demo CLIP: the conv-stem tower behind the Backbone interface, its trainer (targets, resume, saved file) and
the zero-shot report. Runs on a few committed demo photos (data/clothing), no ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fti4cir.demo.clip_train import (
    DEMO_MODEL,
    ClipTrainConfig,
    create_clip,
    label_aware_targets,
    random_crops,
    train_clip,
)
from fti4cir.demo.rebuild import subset_photos
from fti4cir.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def few_photos(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos")
    subset_photos(REPO / "data" / "clothing", out, per_class=3)
    return out


def test_conv_stem_tower_gives_global_feature_and_grid_in_one_pass():
    from fti4cir.backbone import load_backbone
    from fti4cir.towers import ConvStem

    torch.manual_seed(0)
    backbone = load_backbone(DEMO_MODEL, None, "cpu")
    assert isinstance(backbone.clip.visual.conv1, ConvStem)
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    visual = backbone.encode_visual(images)
    assert backbone.grid_size == (8, 8) and backbone.patch_dim == 192
    assert visual.patch_tokens.shape == (2, 1 + 8 * 8, 192)
    assert torch.allclose(visual.global_features, backbone.encode_image(images), atol=1e-5)


def test_stem_stride_must_match_the_patch_size(tmp_path, monkeypatch):
    import fti4cir.towers as towers

    (tmp_path / f"{DEMO_MODEL}.json").write_text(json.dumps({"channels": [8, 8], "blocks": 0}))  # stride 4, patch 8
    monkeypatch.setattr(towers, "STEM_CONFIG_DIR", tmp_path)
    with pytest.raises(UserError, match="stride 4"):
        create_clip(DEMO_MODEL)
    (tmp_path / f"{DEMO_MODEL}.json").write_text(json.dumps({"channels": [-1], "blocks": 0}))
    with pytest.raises(UserError, match="positive integers"):
        create_clip(DEMO_MODEL)


def test_label_aware_targets_mark_every_true_caption():
    classes = torch.tensor([0, 0, 1, 0])
    colours = torch.tensor([2, 3, 2, -1])
    named = torch.tensor([2, -1, 2, -1])  # caption 1 and 3 name no colour
    targets = label_aware_targets(classes, colours, named)
    assert targets.diagonal().eq(1).all()
    assert targets[0].tolist() == [1, 1, 0, 1]  # a red dress is "a dress" too, not "a red shirt"
    assert targets[1].tolist() == [0, 1, 0, 1]  # a blue dress is not "a red dress"
    assert targets[3].tolist() == [0, 1, 0, 1]  # no colour label: only colourless dress captions
    assert targets[:, 2].tolist() == [0, 0, 1, 0]


def test_random_crops_are_per_image_and_seeded():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16).repeat(4, 1, 1, 1)
    torch.manual_seed(1)
    a = random_crops(images, 8, 0.3)
    torch.manual_seed(1)
    b = random_crops(images, 8, 0.3)
    assert a.shape == (8, 3, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a[0], a[2])  # the same image, cropped differently


def _state(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _kill_after_first_checkpoint(config: ClipTrainConfig) -> None:
    """Run the training in a subprocess and kill -9 it as soon as its first epoch checkpoint is committed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        f"from fti4cir.demo.clip_train import ClipTrainConfig, train_clip; "
        f"train_clip(ClipTrainConfig(**{config.to_dict()!r}), progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    record = Path(config.out) / "checkpoint.json"
    deadline = time.monotonic() + 120
    while not record.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(record.read_text())["epoch"] == 1, "the run should have been killed inside epoch 2"


def test_training_resumes_bit_for_bit_after_kill_and_saves_a_loadable_fp16_clip(few_photos, tmp_path):
    from fti4cir.backbone import load_backbone

    torch.set_num_threads(1)  # as the killed subprocess: the same kernels give the same bits
    settings = dict(photos=str(few_photos), batch_size=6, epochs=3, load_size=72)
    straight = train_clip(ClipTrainConfig(out=str(tmp_path / "a"), **settings), progress=False)
    _kill_after_first_checkpoint(ClipTrainConfig(out=str(tmp_path / "b"), **settings))
    resumed = train_clip(ClipTrainConfig(out=str(tmp_path / "b"), **settings), progress=False)
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads(straight.with_suffix(".json").read_text())
    assert len(meta["history"]) == 3 and all(v.dtype == torch.float16 for v in a.values() if v.is_floating_point())
    table = a["token_embedding.weight"]
    used = table.abs().sum(1) > 0
    assert int(used.sum()) == meta["tokens_used"] and 20 < meta["tokens_used"] < 500  # unseen tokens are zero rows
    backbone = load_backbone(DEMO_MODEL, str(straight), "cpu")
    assert torch.equal(backbone.clip.token_embedding.weight.half(), table)
    with pytest.raises(UserError, match="settings differ"):
        train_clip(ClipTrainConfig(out=str(tmp_path / "a"), **{**settings, "lr": 0.5}), progress=False)


def test_zero_shot_report_counts_every_photo(few_photos):
    from fti4cir.demo.labels import read_labels
    from fti4cir.demo.zero_shot import zero_shot
    from fti4cir.factory import create_model

    labels = read_labels(few_photos / "labels.json")
    model = create_model(DEMO_MODEL, None, device="cpu")
    report = zero_shot(model, few_photos, labels, "test", progress=False)
    assert report.photos == 30 and report.class_confusion.sum() == 30
    assert (
        report.colour_confusion.sum()
        == report.coloured_photos
        == sum(1 for p in labels["photos"] if p["split"] == "test" and p["colour"])
    )
    assert report.class_accuracy == report.class_confusion.trace() / 30
    low, high = report.class_interval
    assert low <= report.class_accuracy <= high and high - low > 0.15  # 30 photos say little
    assert report.to_dict()["class_interval"] == [low, high]
    assert "Class confusion" in report.markdown() and f"95% interval {low:.1%}-{high:.1%}" in report.markdown()
