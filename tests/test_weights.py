import json

import pytest
import torch

from fti4cir import InversionConfig, InversionNetwork, load_weights, save_weights
from fti4cir.errors import UserError
from fti4cir.weights import config_path


def small_net(seed=0, **overrides):
    torch.manual_seed(seed)
    return InversionNetwork(
        InversionConfig(embed_dim=16, token_dim=24, patch_dim=20, num_k=8, topk=4, backbone="test", **overrides)
    ).eval()


def outputs(net):
    torch.manual_seed(5)
    with torch.no_grad():
        out = net(torch.randn(3, 16), torch.randn(3, 10, 20))
    return out.subject, out.attributes, out.num_kept


def test_round_trip(tmp_path):
    net = small_net(epsilon=0.07)
    path = save_weights(net, tmp_path / "w.safetensors")
    assert json.loads(config_path(path).read_text())["epsilon"] == 0.07
    loaded = load_weights(path)
    assert loaded.config == net.config
    for a, b in zip(outputs(net), outputs(loaded.eval())):
        assert torch.equal(a, b)
    config_path(path).unlink()  # the config is also inside the safetensors metadata
    assert load_weights(path).config == net.config
    assert not list(tmp_path.glob(".*.tmp"))


def test_shape_mismatch_is_named(tmp_path):
    path = save_weights(small_net(), tmp_path / "w.safetensors")
    config = json.loads(config_path(path).read_text())
    config["patch_dim"] = 22
    config_path(path).write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"attribute_queries: file has \(1, 8, 20\), model needs \(1, 8, 22\)"):
        load_weights(path)


def test_truncated_or_corrupted_file_is_detected(tmp_path):
    path = save_weights(small_net(), tmp_path / "w.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupted or truncated|unreadable"):
        load_weights(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError):
        load_weights(path)


def test_backbone_mismatch_is_refused(tmp_path, tiny_backbone):
    path = save_weights(small_net(), tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="pass the matching --backbone"):
        load_weights(path, expect_backbone=tiny_backbone)


def test_only_safetensors_are_written(tmp_path):
    with pytest.raises(UserError, match="safetensors"):
        save_weights(small_net(), tmp_path / "w.pt")


def test_missing_file_and_offline_hub_id_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(
        UserError, match="Could not get weights 'fti4cir.safetensors' of Hub repository 'someone/fti4cir-weights'"
    ):
        load_weights("someone/fti4cir-weights")
