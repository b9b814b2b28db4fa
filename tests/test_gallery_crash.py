"""Crash safety of gallery builds (issue 7): SIGKILL the indexer at random points, resume, compare with a clean build,
while a reader thread keeps loading the gallery and must only ever see a complete, consistent version."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import place_photos, shared_data
from fti4cir.errors import UserError
from fti4cir.factory import create_model
from fti4cir.gallery import Gallery, build_gallery
from fti4cir.spec import ModelSpec

SEED = 20240707
SPEC = {"backbone": "fti4cir-tiny", "pretrained": None, "weights": None, "device": "cpu", "preprocess": "targetpad"}
BUILD_ARGS = [
    "--backbone",
    "fti4cir-tiny",
    "--pretrained",
    "none",
    "--device",
    "cpu",
    "--batch-size",
    "4",
    "--shard-size",
    "8",
    "--num-workers",
    "0",
    "--quiet",
]
# `fti4cir index` through its command module's add_parser alone, so the test does not depend on the CLI's registration
RUNNER = (
    "import argparse, sys, torch; from fti4cir.commands import index; torch.set_num_threads(1); "
    "p = argparse.ArgumentParser(); index.add_parser(p.add_subparsers()); a = p.parse_args({argv!r}); "
    "sys.exit(a.func(a))"
)


@pytest.fixture(scope="module")
def indexer():
    """Starts indexer processes quickly: forked from a server that imported fti4cir once (and never ran torch)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fti4cir.gallery", "fti4cir.commands.index", "fti4cir.features", "fti4cir.search"])
    warm = context.Process(target=int)  # start the server now, so that kill delays measure indexing, not imports
    warm.start()
    warm.join()

    def start(src: Path, galleries: Path):
        argv = ["index", str(src), "--name", "g", "--galleries-dir", str(galleries), *BUILD_ARGS]
        proc = context.Process(target=exec, args=(RUNNER.format(argv=argv), {}))
        proc.start()
        return proc

    return start


def staged_shards(galleries: Path) -> int:
    return len(list((galleries / "g").glob(".staging-*/shard-*.npz")))


def build_with_kills(start, src: Path, galleries: Path, kills: list[tuple[int, float]]) -> tuple[int, int]:
    """Run the indexer and SIGKILL it at each kill point, then let a final run finish. A kill point (shards, seconds)
    kills `seconds` after `shards` more shards than before are staged (shards=0: after the start, wherever the build
    is; shards>0: mid-computation). Returns (kills, kills that left finished work staged for the next run)."""
    killed = resumable = 0
    for shards, seconds in kills:
        proc = start(src, galleries)
        target = staged_shards(galleries) + shards
        while proc.exitcode is None and staged_shards(galleries) < target:
            time.sleep(0.005)
        proc.join(timeout=seconds)
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.join()
        assert proc.exitcode in (0, -signal.SIGKILL)
        resumable += proc.exitcode != 0 and staged_shards(galleries) > 0
    proc = start(src, galleries)
    proc.join(timeout=120)
    assert proc.exitcode == 0
    return killed, resumable


class Reader(threading.Thread):
    """Loads the gallery in a loop; every load must be complete and equal one of the allowed states."""

    def __init__(self, galleries: Path, hash_of: dict[str, str]):
        super().__init__(daemon=True)
        self.directory, self.hash_of = galleries / "g", hash_of
        self.allowed: list[frozenset[str]] = []
        self.stop, self.loads, self.errors, self.seen = threading.Event(), 0, [], set()

    def run(self):
        while not self.stop.is_set():
            if not (self.directory / "CURRENT").exists():
                time.sleep(0.01)
                continue
            try:
                self.check(Gallery.load(self.directory))
                self.loads += 1
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                self.errors.append(repr(e))
            time.sleep(0.02)  # leave the CPU to the builds

    def check(self, g: Gallery):
        names = frozenset(g.names)
        assert names in self.allowed, f"partial gallery visible: {len(names)} names"
        assert len(g.names) == len(names) == g.features.shape[0] == g.index.ntotal == len(g.tokens)
        assert all(self.hash_of[n] == h for n, h in zip(g.names, g.hashes))
        scores, _ = g.search(g.features[:5], 1)  # the index holds exactly these vectors
        assert torch.allclose(scores[:, 0], torch.ones(len(scores)), atol=1e-4)
        self.seen.add(names)


def test_killed_builds_resume_to_the_clean_gallery(tmp_path, indexer):
    rng = random.Random(SEED)
    photos = rng.sample(sorted(shared_data("photos", "clothing", "test").rglob("*.jpg")), 68)
    final, extra = photos[:60], photos[60:]
    hash_of = {f"{p.parent.name}/{p.name}": hashlib.sha1(p.read_bytes()).hexdigest() for p in photos}

    # the clean reference: one uninterrupted in-process build with the same model the CLI makes
    clean_src = tmp_path / "clean"
    place_photos(final, clean_src)
    started = time.perf_counter()
    build_gallery(
        create_model(ModelSpec.from_dict(SPEC)),
        str(clean_src),
        "g",
        galleries_dir=tmp_path / "clean-galleries",
        batch_size=4,
        shard_size=8,
        num_workers=0,
        progress=False,
    )
    clean_seconds = time.perf_counter() - started
    clean = Gallery.load(tmp_path / "clean-galleries" / "g")

    galleries, src = tmp_path / "galleries", tmp_path / "src"
    reader = Reader(galleries, hash_of)
    phase1 = photos[20:]  # 40 of the final images and 8 that will be deleted
    reader.allowed.append(frozenset(f"{p.parent.name}/{p.name}" for p in phase1))
    reader.start()
    try:
        place_photos(phase1, src)
        # 48 images = 6 shards: killed inside the 2nd, at a random time, inside the next-but-one
        kills = [(1, rng.uniform(0, 0.1)), (0, rng.uniform(0.05, 0.5) * clean_seconds), (1, rng.uniform(0, 0.1))]
        killed, resumable = build_with_kills(indexer, src, galleries, kills)
        assert Gallery.load(galleries / "g").names == sorted(reader.allowed[0])

        # phase 2: 20 images added and 8 deleted, killed again during the incremental update
        reader.allowed.append(frozenset(clean.names))
        for p in extra:
            (src / p.parent.name / p.name).unlink()
        place_photos(final[:20], src)
        kills = [(0, rng.uniform(0.05, 0.5) * clean_seconds), (1, rng.uniform(0, 0.1))]  # 20 new: 3 shards
        more = build_with_kills(indexer, src, galleries, kills)
        killed, resumable = killed + more[0], resumable + more[1]
        # let the reader load the finished gallery at least twice more before it stops (it sleeps between loads)
        settled, deadline = reader.loads, time.monotonic() + 60
        while reader.loads < settled + 2 and reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        reader.stop.set()
        reader.join(timeout=30)

    assert killed >= 3 and resumable >= 3, "the kills should land inside builds"
    assert reader.errors == [] and reader.loads > 0 and frozenset(clean.names) in reader.seen
    g = Gallery.load(galleries / "g")
    assert g.names == clean.names and len(set(g.names)) == 60  # 0 lost, 0 duplicated, same order
    assert g.hashes == clean.hashes
    assert [e["size"] for e in g.manifest["entries"]] == [e["size"] for e in clean.manifest["entries"]]
    torch.testing.assert_close(g.features, clean.features, atol=1e-5, rtol=1e-5)
    for key in ("subject", "attributes", "relevance", "attention"):
        np.testing.assert_allclose(
            g.array(key).astype(np.float32), clean.array(key).astype(np.float32), atol=1e-3, rtol=1e-3
        )
    assert np.array_equal(g.array("num_kept"), clean.array("num_kept"))
    assert g.index.ntotal == 60
    assert torch.equal(g.search(g.features, 5)[1], clean.search(clean.features, 5)[1])
    leftovers = sorted(d.name for d in (galleries / "g").iterdir() if d.is_dir())
    assert leftovers == [g.version]  # no staging area, no half-written or replaced versions


def build_killed_before_the_switch(monkeypatch, model, src, kw) -> Gallery:
    """A build of gallery "g" killed between writing its new version and publishing it (the write of CURRENT raises);
    returns the gallery as a reader then loads it."""
    import fti4cir.gallery.build as gallery

    def kill(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gallery, "write_text_atomic", kill)
    with pytest.raises(KeyboardInterrupt):
        build_gallery(model, str(src), "g", **kw)
    monkeypatch.undo()
    return Gallery.load(kw["galleries_dir"] / "g")


def gallery_of_4_then_2_more_photos(tmp_path):
    """A gallery built from 4 photos, then 2 more photos placed in its folder: the next build makes a new version.
    Returns (model, source folder, build_gallery's keyword arguments, the first build's report)."""
    photos = sorted(shared_data("photos", "clothing", "test").rglob("*.jpg"))[:6]
    src = tmp_path / "src"
    place_photos(photos[:4], src)
    model = create_model(ModelSpec.from_dict(SPEC))
    kw = {"galleries_dir": tmp_path / "galleries", "num_workers": 0, "progress": False}
    first = build_gallery(model, str(src), "g", **kw)
    place_photos(photos[4:], src)
    return model, src, kw, first


def test_a_reader_never_sees_a_version_being_replaced(tmp_path, monkeypatch):
    """Deterministic companion of the random kills: a build stopped right before the switch leaves the old version
    published and intact; the next build finishes the job."""
    model, src, kw, first = gallery_of_4_then_2_more_photos(tmp_path)

    g = build_killed_before_the_switch(monkeypatch, model, src, kw)
    assert g.version == first.version and len(g) == 4
    encoded = []
    encode = model.backbone.encode_visual
    monkeypatch.setattr(model.backbone, "encode_visual", lambda x: encoded.append(len(x)) or encode(x))
    second = build_gallery(model, str(src), "g", **kw)
    assert second.images == 6 and encoded == []  # the staged shard of the interrupted build is reused
    assert sorted(d.name for d in (tmp_path / "galleries" / "g").iterdir() if d.is_dir()) == [second.version]
    with pytest.raises(UserError, match="No gallery"):
        Gallery.load(tmp_path / "galleries" / "missing")


def test_a_build_killed_after_the_switch_leaves_nothing_behind(tmp_path, monkeypatch):
    """A kill after CURRENT names the new version but before the replaced one is removed: the gallery is already
    complete, so the next build finds it up to date, and it must still remove the replaced version (the random kills
    of the test above once landed there and left 'v-000001' beside the published 'v-000002')."""
    import fti4cir.gallery.build as gallery

    model, src, kw, first = gallery_of_4_then_2_more_photos(tmp_path)

    clear = gallery._clear_unpublished

    def clear_then_die_after_the_switch(gallery_dir, keep):
        if keep == first.version:  # the cleanup before writing the new version runs as usual
            return clear(gallery_dir, keep)
        raise KeyboardInterrupt  # stands for a kill right after the switch

    monkeypatch.setattr(gallery, "_clear_unpublished", clear_then_die_after_the_switch)
    with pytest.raises(KeyboardInterrupt):
        build_gallery(model, str(src), "g", **kw)
    monkeypatch.undo()
    folder = tmp_path / "galleries" / "g"
    published = Gallery.load(folder).version
    assert published != first.version and (folder / first.version).is_dir()  # the state the kill leaves

    again = build_gallery(model, str(src), "g", **kw)
    assert again.up_to_date and again.version == published
    assert sorted(d.name for d in folder.iterdir() if d.is_dir()) == [published]
    assert len(Gallery.load(folder)) == 6


def test_a_build_with_another_model_keeps_the_published_version_until_its_switch(tmp_path, monkeypatch):
    """A build that cannot reuse the published rows (another model) still leaves them published until it switches:
    killed before the switch, the old gallery stays complete and loadable."""
    _, src, kw, first = gallery_of_4_then_2_more_photos(tmp_path)
    other = create_model(ModelSpec.from_dict({**SPEC, "seed": 1}))

    g = build_killed_before_the_switch(monkeypatch, other, src, kw)
    assert g.version == first.version and len(g) == 4
