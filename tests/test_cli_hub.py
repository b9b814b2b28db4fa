"""Hub access through huggingface_hub's own settings, revisions, hf-hub: backbones and the fti4cir-official preset,
all offline: a Hub cache laid out by the test."""

import hashlib
import os
import time
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch

from fti4cir import hub, presets
from fti4cir.errors import UserError
from test_convert import make_official_release

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLOSED = "http://127.0.0.1:9"  # nothing listens there: connections are refused at once


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp, the Hub endpoint closed."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "ENDPOINT", CLOSED)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    return cache


def cache_file(cache: Path, repo: str, filename: str, data: bytes) -> Path:
    """Lay out one file as huggingface_hub stores it: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return link


def test_reachability_follows_huggingface_hub_settings(hub_cache, monkeypatch):
    assert not hub.reachable()  # the configured endpoint refuses
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    assert not hub.reachable()
    assert time.perf_counter() - start < 0.1  # no request at all


def test_split_revision():
    assert hub.split_revision("org/repo/f.safetensors@v1") == ("org/repo/f.safetensors", "v1")
    assert hub.split_revision("org/repo") == ("org/repo", None)
    with pytest.raises(UserError, match="org/repo"):
        hub.split_revision("org/repo@")


def test_official_preset_converts_once_from_the_cache_and_reuses_it(hub_cache, tmp_path):
    release = tmp_path / "model_best.pth"
    make_official_release(release)
    cache_file(hub_cache, presets.OFFICIAL_REPO, "README.md", b"---\nlicense: apache-2.0\n---\n")
    cache_file(hub_cache, presets.OFFICIAL_REPO, "checkpoints/model_3.pth", b"not read")
    cache_file(hub_cache, presets.OFFICIAL_REPO, "checkpoints/model_best.pth", release.read_bytes())

    out = presets.official_weights()
    assert out.is_file() and out.with_suffix(".json").is_file() and str(out).startswith(str(hub_cache))
    from fti4cir.weights import load_weights

    net = load_weights(out)
    assert net.config.backbone == "ViT-L-14" and net.config.pretrained == "openai"
    from fti4cir.convert import read_official

    expected = read_official(release).state_dict()  # the converter's reading of the same file
    assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items()) and len(expected) > 0
    mtime = out.stat().st_mtime_ns
    assert presets.official_weights() == out and out.stat().st_mtime_ns == mtime  # reused, not converted again


def test_official_preset_without_network_fails_fast_and_clearly(hub_cache):
    start = time.perf_counter()
    with pytest.raises(UserError, match="official FTI4CIR weights .*not in the cache.*unreachable"):
        presets.official_weights()
    assert time.perf_counter() - start < 5


def test_pick_checkpoint():
    assert presets.pick_checkpoint(["README.md", "a/model_10.pth", "a/model_80.pth"]) == "a/model_80.pth"
    assert presets.pick_checkpoint(["model_80.pth", "model_best.pth"]) == "model_best.pth"
    with pytest.raises(UserError, match="No checkpoint"):
        presets.pick_checkpoint(["README.md"])


def test_preset_flags(hub_cache):
    with pytest.raises(UserError, match="leave out --weights"):
        presets.resolve_model("fti4cir-official", "ViT-L-14", "openai", "w.safetensors")
    with pytest.raises(UserError, match="leave out --backbone"):
        presets.resolve_model("fti4cir-official", "ViT-B-32", "openai", None)
    assert presets.resolve_model(None, "fti4cir-tiny", None, None) == ("fti4cir-tiny", None, None)


def test_hub_weights_with_revision_from_the_cache(hub_cache, tmp_path):
    from fti4cir.inversion import InversionConfig, InversionNetwork
    from fti4cir.weights import load_weights, save_weights

    cfg = InversionConfig(embed_dim=16, token_dim=24, patch_dim=20, num_k=8, topk=4)
    net = InversionNetwork(cfg)
    local = save_weights(net, tmp_path / "w.safetensors")
    cache_file(hub_cache, "org/weights", "fti4cir.safetensors", local.read_bytes())
    loaded = load_weights(f"org/weights@{COMMIT}")
    assert loaded.config.to_dict() == cfg.to_dict()
    with pytest.raises(
        UserError, match="Could not get weights 'fti4cir.safetensors' of Hub repository 'org/weights'@v9"
    ):
        load_weights("org/weights", revision="v9")
    with pytest.raises(UserError, match="--weights-revision"):
        load_weights(f"org/weights@{COMMIT}", revision="v9")


def test_hf_hub_backbone_offline_message(hub_cache):
    from fti4cir.backbone import BackboneUnavailable, load_backbone

    with pytest.raises(
        BackboneUnavailable, match="hf-hub:org/fashion-clip is not available offline.*hub repo 'org/fashion-clip'"
    ):
        load_backbone("hf-hub:org/fashion-clip", "hf-hub", "cpu")
    with pytest.raises(UserError, match="hf-hub:org/repo"):
        load_backbone("hf-hub:bad", "hf-hub", "cpu")


def test_offline_set_in_the_environment_after_import_is_honoured(hub_cache, monkeypatch):
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://10.255.255.1")  # would wait for the timeout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert not hub.reachable() and time.perf_counter() - start < 0.1
