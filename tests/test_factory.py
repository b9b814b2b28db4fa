"""The one model factory: a ModelSpec (or its fields) -> a ready model, the same in every process."""

import pytest
import torch

from fti4cir import ModelSpec, UserError, create_model
from fti4cir.m2c import M2CModel, save_m2c_weights


def test_spec_and_fields_build_the_same_model():
    a = create_model(ModelSpec("fti4cir-tiny", None, device="cpu", seed=3))
    b = create_model("fti4cir-tiny", None, device="cpu", seed=3)
    for (name, x), (_, y) in zip(a.inversion.state_dict().items(), b.inversion.state_dict().items()):
        assert torch.equal(x, y), name
    c = create_model(ModelSpec("fti4cir-tiny", None, device="cpu", seed=3), seed=4)  # fields override the spec
    assert not torch.equal(next(a.inversion.parameters()), next(c.inversion.parameters()))


def test_spec_round_trips_and_refuses_unknown_settings(tmp_path):
    spec = ModelSpec("fti4cir-tiny", None, weights=tmp_path / "w.safetensors", preprocess="clip")
    assert spec.weights == str(tmp_path / "w.safetensors")  # paths are kept as text
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UserError, match="backbon"):
        ModelSpec.from_dict({**spec.to_dict(), "backbon": "x"})
    with pytest.raises(UserError, match="family"):
        ModelSpec(family="blip")


def test_tiny_default_tag_resolves_to_random_backbone():
    assert ModelSpec("fti4cir-tiny").resolved().pretrained is None


def test_m2c_weights_share_the_fti4cir_backbone(tmp_path):
    m2c = create_model("fti4cir-tiny", None, device="cpu", family="m2c", m2c_config={"vsi_layers": [1]})
    assert isinstance(m2c, M2CModel) and m2c.config.vsi_layers == (1,)
    path = save_m2c_weights(m2c.net, tmp_path / "m2c.safetensors")
    model = create_model("fti4cir-tiny", None, device="cpu", m2c_weights=path)
    assert model.m2c.backbone is model.backbone
    assert "m2c" not in dict(model.named_children())  # not a second copy of the backbone's parameters
