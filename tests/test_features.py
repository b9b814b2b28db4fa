import os
import shutil

import numpy as np
import pytest
import torch

from conftest import shared_data
from fti4cir.features import FeatureStore, extract_features


@pytest.fixture
def photos(tmp_path):
    src = sorted(shared_data("photos", "clothing", "test", "dress").glob("*.jpg"))[:5]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in src:
        shutil.copy(p, folder / p.name)
    shutil.copy(src[0], folder / "copy_of_first.jpg")  # same content, other name
    (folder / "broken.jpg").write_bytes(b"not an image")
    return sorted(folder.iterdir())


def test_extract_caches_by_content_and_skips_bad_files(tiny_model, photos, tmp_path, monkeypatch):
    store = FeatureStore.for_model(tmp_path / "cache", tiny_model, with_patches=True)
    first = extract_features(tiny_model, photos, store, batch_size=2, num_workers=0, progress=False)
    names = [p.name for p in photos]
    assert first.computed == 5 and len(store) == 5
    assert first.rows[names.index("broken.jpg")] == -1
    assert [p.name for p, _ in first.failures] == ["broken.jpg"]
    assert first.rows[names.index("copy_of_first.jpg")] >= 0
    # features equal a direct pass over the same preprocessing (fp16 storage)
    readable = [p for p in photos if p.name != "broken.jpg"]
    from fti4cir.inputs import load_image

    direct = tiny_model.backbone.encode_visual(tiny_model.preprocess([load_image(p) for p in readable]))
    cached = store.get(first.rows[first.rows >= 0])
    torch.testing.assert_close(cached.global_features, direct.global_features, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached.patch_tokens, direct.patch_tokens, atol=2e-2, rtol=2e-3)

    # a rerun (new store object, as in a new process) runs no visual pass
    calls = []
    monkeypatch.setattr(tiny_model.backbone, "encode_visual", lambda x: calls.append(x) or None)
    again = extract_features(
        tiny_model, photos, FeatureStore.for_model(tmp_path / "cache", tiny_model, with_patches=True), progress=False
    )
    assert calls == [] and again.computed == 0 and np.array_equal(again.rows, first.rows)


def test_torn_tail_from_a_killed_writer_is_cut(tiny_model, photos, tmp_path):
    store = FeatureStore.for_model(tmp_path / "cache", tiny_model, with_patches=False)
    result = extract_features(tiny_model, photos[:2], store, num_workers=0, progress=False)
    # simulate a kill in the middle of the next append: half a data row and half a hash line
    with open(store.dir / "global.f16", "ab") as f:
        f.write(b"\x00" * 37)
    with open(store.dir / "hashes.txt", "a") as f:
        f.write("abc123")
    reopened = FeatureStore.for_model(tmp_path / "cache", tiny_model, with_patches=False)
    assert len(reopened) == 2
    more = extract_features(tiny_model, photos, reopened, num_workers=0, progress=False)
    assert len(reopened) == 5 and more.computed == 3
    size = os.path.getsize(reopened.dir / "global.f16")
    assert size == 5 * 2 * tiny_model.backbone.embed_dim
    torch.testing.assert_close(reopened.global_features(result.rows), store.global_features(result.rows))


def test_store_refuses_another_model(tiny_model, tmp_path):
    store = FeatureStore.for_model(tmp_path, tiny_model, with_patches=False)
    from fti4cir.errors import UserError

    (store.dir / "meta.json").write_text((store.dir / "meta.json").read_text().replace("fti4cir-tiny", "other"))
    with pytest.raises(UserError, match="another model"):
        FeatureStore.for_model(tmp_path, tiny_model, with_patches=False)


def test_worker_processes_give_the_same_rows(tiny_model, photos, tmp_path):
    a = FeatureStore.for_model(tmp_path / "a", tiny_model, with_patches=False)
    b = FeatureStore.for_model(tmp_path / "b", tiny_model, with_patches=False)
    ra = extract_features(tiny_model, photos, a, batch_size=2, num_workers=0, progress=False)
    rb = extract_features(tiny_model, photos, b, batch_size=2, num_workers=2, progress=False)
    ok = ra.rows >= 0
    torch.testing.assert_close(a.global_features(ra.rows[ok]), b.global_features(rb.rows[ok]))
