"""Hostile release files and configs: structure checked while unpickling, values checked before allocating."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from fti4cir.convert import MAX_PICKLE_BYTES, read_official
from fti4cir.errors import UserError
from fti4cir.inversion import InversionConfig, InversionNetwork
from fti4cir.m2c.model import M2CConfig
from fti4cir.weights import config_path, load_weights, save_weights
from test_convert import make_official_release

GOOD = dict(embed_dim=8, token_dim=8, patch_dim=8, num_k=4, topk=2, tf_layers=1, tf_heads=2)


def _release_with(tmp_path, pkl: bytes, extra: dict | None = None):
    """An archive laid out like torch.save's, with the given data.pkl (and extra members)."""
    path = tmp_path / "release.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
    return path


ROOT = b"\x80\x02ci2t_model\nIMG2TEXT\nq\x00)\x81q\x01"  # an IMG2TEXT placeholder, memo 1
HOSTILE_PICKLES = {
    # the module's own _modules holds the module: a cycle (was a RecursionError)
    "cycle": (ROOT + b"}(X\x08\x00\x00\x00_modules}(X\x01\x00\x00\x00ah\x01uub.", "appears twice"),
    # a set with a list member (was a TypeError)
    "unhashable set member": (b"\x80\x02c__builtin__\nset\n]]a\x85R.", "set member of type list"),
    # a list where the state dict belongs
    "list as state": (ROOT + b"]b.", "not a dict of names"),
    # BUILD on an OrderedDict: setattr of arbitrary attributes
    "state on a dict": (b"\x80\x02ccollections\nOrderedDict\n)R}(X\x01\x00\x00\x00xK\x01ub.", "only of modules"),
    # an opcode torch.save never writes (INST: protocol 0 instance creation)
    "INST opcode": (b"(i__builtin__\nobject\n.", "opcode INST"),
    "deep nesting": (b"\x80\x02" + b"(" * 200 + b".", "nest deeper"),
    "foreign global": (b"\x80\x02cbuiltins\neval\n.", "'builtins.eval' is not allowed"),
}


@pytest.mark.parametrize("name", HOSTILE_PICKLES)
def test_malformed_structures_are_refused_with_short_messages(tmp_path, name):
    pkl, expected = HOSTILE_PICKLES[name]
    with pytest.raises(UserError, match=expected) as error:
        read_official(_release_with(tmp_path, pkl))
    assert len(str(error.value)) < 300


class ParameterWithAttributes:
    """Pickles as a parameter whose rebuild sets attributes on it (torch's parameter-with-state path)."""

    def __reduce__(self):
        from collections import OrderedDict

        return torch._utils._rebuild_parameter_with_state, (torch.zeros(2), False, OrderedDict(), {"__class__": 1})


def test_attributes_set_on_parameters_are_refused(tmp_path):
    path = tmp_path / "param.pth"
    torch.save({"p": ParameterWithAttributes()}, path)
    with pytest.raises(UserError, match="a parameter with attributes set on it"):
        read_official(path)


def _storage_pickle(numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """A pickle of one tensor over storage "0" of `numel` floats."""

    def ints(values):
        return b"(" + b"".join(b"J" + v.to_bytes(4, "little", signed=True) for v in values) + b"t"

    return (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ"
        + numel.to_bytes(4, "little")
        + b"tQK\x00"
        + ints(size)
        + ints(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR."
    )


def test_storage_members_are_read_only_when_referred_to_and_within_the_budget(tmp_path, monkeypatch):
    # a compressed member that declares 1 GiB: refused from the zip directory, before a byte is inflated
    bomb = _release_with(tmp_path, _storage_pickle(2**28, (2**28,), (1,)), {"archive/data/0": b"\0" * 2**20})
    with pytest.raises(UserError, match="has 1048576 bytes, its tensor needs 1073741824"):
        read_official(bomb)
    honest = _release_with(tmp_path, _storage_pickle(2**20, (2**20,), (1,)), {"archive/data/0": b"\0" * 2**22})
    with pytest.raises(UserError, match="more than 1 MB"):
        read_official(honest, max_bytes=2**20)
    # unreferenced members are never read
    unreferenced = _release_with(
        tmp_path, _storage_pickle(4, (2, 2), (2, 1)), {"archive/data/0": b"\0" * 16, "archive/data/1": b"\0" * 2**20}
    )
    read = []
    original = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        read.append(getattr(name, "filename", name))
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with pytest.raises(UserError, match="does not hold an official i2t_model.IMG2TEXT"):
        read_official(unreferenced)
    assert read == ["archive/data.pkl", "archive/data/0"]


@pytest.mark.parametrize(
    "size, stride, expected",
    [
        ((2, 2), (3, 1), "runs past the end"),
        ((2**20, 2**20), (0, 0), "more elements than its storage"),
    ],
)
def test_tensors_must_lie_inside_their_storage(tmp_path, size, stride, expected):
    path = _release_with(tmp_path, _storage_pickle(4, size, stride), {"archive/data/0": b"\0" * 16})
    with pytest.raises(UserError, match=expected):
        read_official(path)


def test_release_reader_messages(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_official(tmp_path / "missing.pth")
    big = tmp_path / "big.pth"
    with zipfile.ZipFile(big, "w") as zf:
        zf.writestr("archive/data.pkl", b"\0" * (MAX_PICKLE_BYTES + 1), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(UserError, match="data.pkl is larger"):
        read_official(big)


def test_official_settings_are_validated(tmp_path):
    src = tmp_path / "model.pth"
    net = make_official_release(src)
    net.epsilon, net.topk = float("nan"), -3
    from test_convert import official_module_names

    with official_module_names():
        torch.save(net, src)
    with pytest.raises(UserError, match="settings are invalid.*topk must be in 1..4096"):
        read_official(src)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"tf_heads": 0}, "tf_heads must be in 1..4096"),
        ({"embed_dim": -8}, "embed_dim must be in 1..16384"),
        ({"patch_dim": "8"}, "patch_dim must be a whole number, not str '8'"),
        ({"epsilon": float("nan")}, "epsilon must be finite"),
        ({"topk": 9}, "topk <= num_k"),
        ({"tf_heads": 3}, "divisible by tf_heads"),
        ({"extra": {"x": "y" * 100_000}}, "extra is larger than 64 kB"),
        ({"version": True}, "version must be a whole number"),
    ],
)
def test_fti4cir_config_values_are_checked(tmp_path, change, expected):
    with pytest.raises(ValueError, match=expected):
        InversionConfig.from_dict({**InversionConfig(**GOOD).to_dict(), **change})
    path = save_weights(InversionNetwork(InversionConfig(**GOOD)), tmp_path / "w.safetensors")
    config_path(path).write_text(json.dumps({**InversionConfig(**GOOD).to_dict(), **change}))
    with pytest.raises(UserError, match="invalid"):
        load_weights(path)


def test_sizes_are_checked_against_the_header_before_allocating(tmp_path, monkeypatch):
    path = save_weights(InversionNetwork(InversionConfig(**GOOD)), tmp_path / "w.safetensors")
    config_path(path).write_text(
        json.dumps({**InversionConfig(**GOOD).to_dict(), "embed_dim": 4096, "token_dim": 4096})
    )
    allocated = []
    original = InversionNetwork.__init__

    def spy(self, config):
        allocated.append(torch.empty(0).device.type)  # the default device when the network is built
        original(self, config)

    monkeypatch.setattr(InversionNetwork, "__init__", spy)
    with pytest.raises(UserError, match=r"subject_mapper.0.weight: file has \(32, 8\), model needs \(16384, 4096\)"):
        load_weights(path)
    assert allocated == ["meta"]  # built once, on the meta device only


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"vsi_heads": 0}, "vsi_heads must be in 1..4096"),
        ({"grid": [7]}, "grid must have 2 items"),
        ({"dropout": float("inf")}, "dropout must be finite"),
        ({"vsi_dim": 10, "vsi_heads": 4}, "divisible"),
        ({"text_layers": "12"}, "text_layers must be a whole number"),
    ],
)
def test_m2c_config_values_are_checked(change, expected):
    good = M2CConfig(
        embed_dim=8, token_dim=8, text_layers=2, grid=(2, 2), vsi_dim=8, vsi_heads=2, vsi_layers=(1,)
    ).to_dict()
    with pytest.raises(ValueError, match=expected):
        M2CConfig.from_dict({**good, **change})
