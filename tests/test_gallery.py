"""Galleries: build, load, search, explanations, incremental updates, identity checks, corruption, names, CLI."""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark_fixtures import benchmark_root, make_placeholder_images
from conftest import place_photos, run_subcommand, shared_data
from fti4cir.commands import index as index_command
from fti4cir.compose import compose
from fti4cir.digests import parameter_digest
from fti4cir.errors import UserError
from fti4cir.gallery import CURRENT, Gallery, Source, build_gallery, list_galleries, validate_name
from fti4cir.inputs import load_image
from fti4cir.model import CIRModel


def copy_photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    """`count` shared clothing photos copied into folder/<class>/<file>, in a fixed order."""
    return place_photos(sorted(shared_data("photos", "clothing", "test").rglob("*.jpg"))[start : start + count], folder)


def build(model, src, tmp_path, name="g", **kw):
    kw = {
        "galleries_dir": tmp_path / "galleries",
        "batch_size": 4,
        "num_workers": 0,
        "shard_size": 5,
        "progress": False,
        **kw,
    }
    return build_gallery(model, src if isinstance(src, Source) else str(src), name, **kw)


@pytest.fixture
def photos(tmp_path):
    src = tmp_path / "src"
    copy_photos(src, 6)
    (src / "broken.jpg").write_text("not an image")
    (src / "empty.png").write_bytes(b"")
    return src


def test_build_load_search_and_explanations(tiny_model, photos, tmp_path):
    report = build(tiny_model, photos, tmp_path)
    assert report.images == 6 and report.computed == 6
    assert sorted(p for p, _ in report.failures) == ["broken.jpg", "empty.png"]
    assert "2 unreadable image(s) skipped: " in report.summary()

    g = Gallery.load("g", tiny_model, tmp_path / "galleries")
    expected = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg") if p.name != "broken.jpg")
    assert g.names == expected and len(g) == 6
    assert all(p.is_absolute() and p.is_file() for p in g.paths)
    entries = g.manifest["entries"]
    assert [e["sha1"] for e in entries] == [hashlib.sha1(p.read_bytes()).hexdigest() for p in g.paths]
    assert [e["size"] for e in entries] == [p.stat().st_size for p in g.paths]
    identity = json.loads((g.directory / g.version / "identity.json").read_text())
    assert identity["backbone"] == "fti4cir-tiny" and identity == g.identity
    assert identity["inversion_digest"] == parameter_digest(tiny_model.inversion)

    assert g.features.shape == (6, 64) and torch.allclose(g.features.norm(dim=1), torch.ones(6), atol=1e-5)
    scores, idx = g.search(g.features[:3], 4)
    assert idx[:, 0].tolist() == [0, 1, 2] and scores.shape == (3, 4)
    assert torch.allclose(scores, torch.stack([g.features[idx[b]] @ g.features[b] for b in range(3)]), atol=1e-5)
    _, idx = g.search(g.features[:1], 3, exclude=[0])
    assert 0 not in idx[0].tolist() and idx.shape == (1, 3)

    # cached tokens and explanations equal a direct pass over the same file (features are stored as float16)
    with torch.no_grad():
        direct = tiny_model.invert(
            tiny_model.backbone.encode_visual(tiny_model.preprocess([load_image(p) for p in g.paths[:3]])),
            return_attention=True,
        )
    cached = g.tokens_of([0, 1, 2])
    torch.testing.assert_close(cached.subject, direct.subject, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(
        g.features[:3], torch.nn.functional.normalize(direct.image_features, dim=-1), atol=2e-3, rtol=2e-3
    )
    for i in range(3):
        ex = g.explanations(i)
        assert ex["attention"].shape == (24, 49) and ex["grid"] == (7, 7) and ex["epsilon"] == 0.05
        np.testing.assert_allclose(ex["relevance"], direct.selection.relevance[i].numpy(), atol=2e-3)
        assert ex["num_kept"] == int(cached.num_kept[i]) and list(ex["kept"]) == list(ex["indices"][: ex["num_kept"]])
        if ex["num_kept"] == int(direct.num_kept[i]):  # a threshold tie may flip under float16 rounding
            r = ex["num_kept"]
            assert list(ex["kept"]) == direct.selection.indices[i, :r].tolist()
            torch.testing.assert_close(cached.attributes[i, :r], direct.attributes[i, :r], atol=5e-3, rtol=5e-3)
        maps = torch.stack([a[i] for a in direct.selection.attention]).mean(dim=(0, 1))[:, 25:]
        np.testing.assert_allclose(ex["attention"], maps.numpy(), atol=2e-3)
    # a gallery reference composes like the uploaded image
    with torch.no_grad():
        from_gallery = compose(tiny_model, g.tokens[0], ["in red"])
        from_upload = compose(tiny_model, [load_image(g.paths[0])], ["in red"])
    assert torch.nn.functional.cosine_similarity(from_gallery, from_upload).item() > 0.999
    assert len(g.tokens) == 6 and g.tokens.attributes.shape == (6, 12, 64)


def test_incremental_update_adds_skips_and_removes(tiny_model, photos, tmp_path, monkeypatch):
    first = build(tiny_model, photos, tmp_path)
    old = Gallery.load("g", tiny_model, tmp_path / "galleries")
    gone = [photos / n for n in old.names[:2]]
    for p in gone:
        p.unlink()
    renamed_from, renamed_to = photos / old.names[2], photos / "renamed.jpg"
    renamed_from.rename(renamed_to)
    added = copy_photos(photos / "new", 3, start=100)

    encoded = []
    encode = tiny_model.backbone.encode_visual
    monkeypatch.setattr(tiny_model.backbone, "encode_visual", lambda x: encoded.append(len(x)) or encode(x))
    second = build(tiny_model, photos, tmp_path)
    assert sum(encoded) == 3  # only the new images; the renamed one is found by its content hash
    assert (second.computed, second.reused, second.removed, second.images) == (3, 4, 2, 7)
    assert second.version != first.version
    new = Gallery.load("g", tiny_model, tmp_path / "galleries")
    assert set(new.names) == (set(old.names) - {old.names[0], old.names[1], old.names[2]}) | {
        "renamed.jpg",
        *(p.relative_to(photos).as_posix() for p in added),
    }
    for name in set(old.names) & set(new.names):
        i, j = old.row(name), new.row(name)
        assert torch.equal(old.features[i], new.features[j])
        for key in ("subject", "attributes", "attention", "relevance"):
            assert np.array_equal(old.array(key)[i], new.array(key)[j])
    assert torch.equal(new.features[new.row("renamed.jpg")], old.features[2])
    assert [d.name for d in (tmp_path / "galleries" / "g").iterdir() if d.name.startswith(("v-", ".staging"))] == [
        second.version
    ]  # the replaced version and the staging area are gone

    encoded.clear()
    third = build(tiny_model, photos, tmp_path)
    assert third.up_to_date and third.version == second.version and sum(encoded) == 0


def test_a_gallery_of_another_model_is_refused(tiny_model, photos, tmp_path):
    from fti4cir import create_model

    build(tiny_model, photos, tmp_path)
    Gallery.load("g", tiny_model, tmp_path / "galleries")  # the same model loads
    clip_crop = CIRModel(tiny_model.backbone, tiny_model.inversion, preprocess="clip")
    with pytest.raises(UserError, match="preprocess targetpad.*preprocess clip"):
        Gallery.load("g", clip_crop, tmp_path / "galleries")
    other = CIRModel(tiny_model.backbone, create_model("fti4cir-tiny", None, device="cpu", seed=1).inversion)
    with pytest.raises(UserError, match="differs in: inversion_digest"):
        Gallery.load("g", other, tmp_path / "galleries")
    # rebuilding with the other model recomputes everything instead of reusing rows
    assert build(other, photos, tmp_path).computed == 6


CORRUPTIONS = {
    "features.npy": lambda p: _flip_byte(p, -7),
    "attributes.npy": lambda p: p.write_bytes(p.read_bytes()[:-64]),
    "index.faiss": lambda p: _flip_byte(p, -3),
    "attention.npy": lambda p: p.unlink(),
    "manifest.json": lambda p: p.write_text(p.read_text().replace('"size": ', '"size": 1', 1)),
    "identity.json": lambda p: p.write_text(p.read_text().replace("fti4cir-tiny", "ViT-L-14")),
}


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", sorted(CORRUPTIONS))
def test_corrupted_files_are_detected_and_rebuilt(tiny_model, photos, tmp_path, file):
    report = build(tiny_model, photos, tmp_path)
    CORRUPTIONS[file](tmp_path / "galleries" / "g" / report.version / file)
    with pytest.raises(UserError, match=rf"corrupted: {file}|incomplete: files of {report.version} are missing"):
        Gallery.load("g", None, tmp_path / "galleries")
    again = build(tiny_model, photos, tmp_path)  # the damaged version is not trusted: everything is recomputed
    assert again.computed == 6 and len(Gallery.load("g", tiny_model, tmp_path / "galleries")) == 6


def test_damaged_pointer_is_reported(tiny_model, photos, tmp_path):
    build(tiny_model, photos, tmp_path)
    (tmp_path / "galleries" / "g" / CURRENT).write_text("v-000001 0000")
    with pytest.raises(UserError, match="corrupted: manifest.json"):
        Gallery.load("g", None, tmp_path / "galleries")
    (tmp_path / "galleries" / "g" / CURRENT).write_text("../../etc x")
    with pytest.raises(UserError, match="corrupted: CURRENT"):
        Gallery.load("g", None, tmp_path / "galleries")


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "", "a\\b", "x" * 101, "/abs", "a..b"])
def test_gallery_names_are_validated(tiny_model, photos, tmp_path, name):
    with pytest.raises(UserError, match="Invalid gallery name"):
        validate_name(name)
    with pytest.raises(UserError, match="Invalid gallery name"):
        build(tiny_model, photos, tmp_path, name=name)
    with pytest.raises(UserError):
        Gallery.load(name, None, tmp_path / "galleries")
    assert not any(tmp_path.rglob("CURRENT"))


def test_list_galleries_and_load_by_folder(tiny_model, photos, tmp_path):
    build(tiny_model, photos, tmp_path, name="shop-1.v2")
    (tmp_path / "galleries" / "half-built").mkdir()  # no CURRENT: not published
    assert list_galleries(tmp_path / "galleries") == ["shop-1.v2"]
    by_folder = Gallery.load(str(tmp_path / "galleries" / "shop-1.v2"))
    assert len(by_folder) == 6 and by_folder.name == "shop-1.v2"


def test_a_second_concurrent_build_is_refused(tiny_model, photos, tmp_path):
    folder = tmp_path / "galleries" / "g"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="being built by another process"):
            build(tiny_model, photos, tmp_path)


def test_benchmark_split_source(tiny_model, tmp_path):
    from fti4cir.evaluation.datasets import load_benchmark

    root = benchmark_root(tmp_path, "cirr")
    bench = load_benchmark("cirr", root, "val")
    names = list(bench.images)[:6]
    make_placeholder_images(bench, names, size=32)
    source = index_command.resolve_source(f"benchmark:cirr:val:{root}")  # benchmarks are resolved by the command
    report = build(tiny_model, source, tmp_path, name="cirr-val")
    assert report.images == 6 and len(report.failures) == len(bench.images) - 6  # not downloaded: reported
    g = Gallery.load("cirr-val", tiny_model, tmp_path / "galleries")
    assert sorted(g.names) == sorted(names)  # benchmark image names, not file names
    assert all(g.paths[g.row(n)] == bench.images[n] for n in names)
    assert all("path" in e and not e["path"].startswith("/") for e in g.manifest["entries"])


def run_cli(argv: list[str]) -> int:
    return run_subcommand(index_command, ["index", *argv])


def test_cli_with_a_definition_file(tmp_path, capsys):
    src = tmp_path / "photos"
    copy_photos(src, 4)
    definitions = tmp_path / "defs"
    definitions.mkdir()
    (definitions / "demo.json").write_text(
        json.dumps({"source": "../photos", "backbone": "fti4cir-tiny", "pretrained": None, "weights": None})
    )
    assert (
        run_cli(["--definition", str(definitions / "demo.json"), "--device", "cpu", "--num-workers", "0", "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    assert "gallery 'demo' v-000001: 4 images (4 computed" in out
    g = Gallery.load("demo", None, definitions)  # built beside its definition
    assert g.identity["weights"] == "random-init:0" and g.root == src.resolve()
    with pytest.raises(UserError, match="either SOURCE or --definition"):
        run_cli([str(src), "--definition", str(definitions / "demo.json")])
    with pytest.raises(UserError, match="needs SOURCE and --name"):
        run_cli([str(src)])


def test_manifest_rows_cannot_point_outside_the_source(tiny_model, photos, tmp_path):
    report = build(tiny_model, photos, tmp_path)
    folder = tmp_path / "galleries" / "g"
    manifest = folder / report.version / "manifest.json"
    data = json.loads(manifest.read_text())
    data["entries"][0]["path"] = "../../../etc/passwd"
    manifest.write_text(json.dumps(data))  # a forged manifest, its checksum in CURRENT updated to match
    (folder / CURRENT).write_text(f"{report.version} {hashlib.sha256(manifest.read_bytes()).hexdigest()}\n")
    with pytest.raises(UserError, match="leaves the source"):
        Gallery.load("g", None, tmp_path / "galleries")


def test_a_gallery_records_its_model_and_gives_it_back(tiny_model, tmp_path, capsys):
    """The index command records the ModelSpec it built the model from; gallery_model_spec returns it, and the model
    it describes loads the gallery. The library takes resolved sources only (benchmarks are the command's job)."""
    from fti4cir import create_model
    from fti4cir.gallery import gallery_model_spec
    from fti4cir.spec import ModelSpec

    src = tmp_path / "photos"
    copy_photos(src, 3)
    assert (
        run_cli(
            [
                str(src),
                "--name",
                "g",
                "--galleries-dir",
                str(tmp_path / "galleries"),
                "--backbone",
                "fti4cir-tiny",
                "--pretrained",
                "none",
                "--seed",
                "3",
                "--device",
                "cpu",
                "--num-workers",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    expected = ModelSpec(backbone="fti4cir-tiny", pretrained=None, seed=3)
    assert Gallery.load("g", None, tmp_path / "galleries").manifest["model"] == expected.to_dict()
    spec = gallery_model_spec("g", tmp_path / "galleries")
    assert spec == expected
    assert len(Gallery.load("g", create_model(spec.replace(device="cpu")), tmp_path / "galleries")) == 3
    with pytest.raises(UserError, match="resolve it first"):
        build(tiny_model, "benchmark:cirr:val:/nowhere", tmp_path)
