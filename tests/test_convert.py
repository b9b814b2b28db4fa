"""The official release converter: structure-faithful files are converted exactly; foreign code never runs."""

import io
import pickle
import subprocess
import sys
import zipfile
from contextlib import contextmanager

import pytest
import torch

from fti4cir import official
from fti4cir.convert import read_official
from fti4cir.errors import UserError
from fti4cir.weights import load_weights

OFFICIAL_CLASSES = {
    "i2t_model": ["Phi"],
    "MHTransformer": ["MlpTransformer", "MultiHeadAttention", "TransformerLayer", "Transformer"],
}


@contextmanager
def official_module_names():
    """Place our re-statement's classes under the official module names, as the real release pickles them."""
    import types

    saved = {}
    modules = {name: types.ModuleType(name) for name in OFFICIAL_CLASSES}
    renamed = [(official.OfficialIMG2TEXT, "i2t_model", "IMG2TEXT")]
    renamed += [(getattr(official, c), m, c) for m, cs in OFFICIAL_CLASSES.items() for c in cs]
    for cls, module, name in renamed:
        saved[cls] = (cls.__module__, cls.__qualname__, cls.__name__)
        cls.__module__, cls.__qualname__, cls.__name__ = module, name, name
        setattr(modules[module], name, cls)
    sys.modules.update(modules)
    try:
        yield
    finally:
        for cls, (module, qualname, name) in saved.items():
            cls.__module__, cls.__qualname__, cls.__name__ = module, qualname, name
        for name in modules:
            sys.modules.pop(name)


def make_official_release(path, seed=0):
    torch.manual_seed(seed)
    net = official.OfficialIMG2TEXT(
        embed_dim=16,
        token_dim=24,
        patch_dim=20,
        num_k=8,
        topk=4,
        epsilon=0.1,
        tf_layer=2,
        tf_head=2,
        hy_regLoss=1.4,
        temperature=0.2,
    ).eval()
    net.criterion_target = torch.as_tensor([1])  # a plain tensor attribute, as the official module has
    with official_module_names():
        torch.save(net, path)
    return net


def test_release_file_has_the_official_structure(tmp_path):
    path = tmp_path / "model_9.pth"
    make_official_release(path)
    with zipfile.ZipFile(path) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    for name in (b"i2t_model", b"IMG2TEXT", b"MHTransformer", b"torch.nn.modules.linear"):
        assert name in pkl


def test_convert_round_trip_gives_identical_outputs(tmp_path):
    src = tmp_path / "model_9.pth"
    reference = make_official_release(src)
    net = read_official(src).eval()
    c = net.config
    assert (c.embed_dim, c.token_dim, c.patch_dim, c.num_k, c.topk, c.epsilon, c.tf_layers, c.tf_heads) == (
        16,
        24,
        20,
        8,
        4,
        0.1,
        2,
        2,
    )
    torch.manual_seed(1)
    g, p = torch.randn(5, 16), torch.randn(5, 9, 20)
    with torch.no_grad():
        feats, counts = reference.select(g, p)
        sel = net.select_attributes(g, p)
        torch.testing.assert_close(sel.features, feats)
        assert sel.num_kept.tolist() == counts
        torch.testing.assert_close(net(g, p).subject, reference.phi_s(g))

    from fti4cir.cli import main

    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(src), str(out), "--backbone", "fti4cir-tiny"]) == 0
    loaded = load_weights(out)
    assert loaded.config.backbone == "fti4cir-tiny"
    for a, b in zip(loaded.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def test_pickle_that_runs_a_command_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"payload": RunsACommand(marker)}, evil)
    with pytest.raises(UserError, match="not allowed"):
        read_official(evil)
    assert not marker.exists()

    # also hidden inside an otherwise official-looking module
    system_call = tmp_path / "evil2.pth"
    net = make_official_release(tmp_path / "ok.pth")
    net.extra = RunsACommand(marker)
    with official_module_names():
        torch.save(net, system_call)
    with pytest.raises(UserError, match=r"(subprocess|commands)\.call' is not allowed"):  # protocol 2 name
        load_weights(system_call)
    assert not marker.exists()


def test_os_system_global_is_refused(tmp_path):
    payload = io.BytesIO()
    pickle.Pickler(payload, protocol=2).dump(None)
    raw = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    path = tmp_path / "os.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", raw)
    with pytest.raises(UserError, match="'os.system' is not allowed"):
        read_official(path)


def test_truncated_and_foreign_files(tmp_path):
    src = tmp_path / "model.pth"
    make_official_release(src)
    data = src.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="corrupted|truncated|not a torch zip"):
        read_official(tmp_path / "cut.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "dict.pth")
    with pytest.raises(UserError, match="i2t_model.IMG2TEXT"):
        read_official(tmp_path / "dict.pth")
