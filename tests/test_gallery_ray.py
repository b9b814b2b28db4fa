"""`fti4cir index --ray`: a local Ray instance with 2 workers builds the same gallery as one process (issue 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import place_photos, shared_data
from fti4cir.factory import create_model
from fti4cir.gallery import Gallery, build_gallery
from fti4cir.spec import ModelSpec

ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray)")
from fti4cir.gallery.ray import RayCompute, runtime_env  # noqa: E402

SPEC = {"backbone": "fti4cir-tiny", "pretrained": None, "weights": None, "device": "cpu", "preprocess": "targetpad"}


def test_ray_build_equals_the_single_process_build(tmp_path):
    src = tmp_path / "src"
    place_photos(sorted(shared_data("photos", "clothing", "test").rglob("*.jpg"))[::9][:40], src)
    (src / "broken.jpg").write_text("not an image")
    model = create_model(ModelSpec.from_dict(SPEC))
    kw = {"batch_size": 8, "shard_size": 8, "progress": False}
    local = build_gallery(model, str(src), "g", galleries_dir=tmp_path / "local", num_workers=0, **kw)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    try:
        compute = RayCompute(model_spec=SPEC, num_workers=2, batch_size=8)
        distributed = build_gallery(model, str(src), "g", galleries_dir=tmp_path / "ray", ray=compute, **kw)
    finally:
        ray.shutdown()

    assert distributed.images == local.images == 40 and [p for p, _ in distributed.failures] == ["broken.jpg"]
    a, b = Gallery.load(tmp_path / "local" / "g", model), Gallery.load(tmp_path / "ray" / "g", model)
    assert a.names == b.names and a.hashes == b.hashes
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)
    for key in ("subject", "attributes", "relevance", "attention"):
        np.testing.assert_allclose(a.array(key).astype(np.float32), b.array(key).astype(np.float32), atol=1e-3)
    assert np.array_equal(a.array("num_kept"), b.array("num_kept"))
    assert torch.equal(a.search(a.features, 5)[1], b.search(b.features, 5)[1])
