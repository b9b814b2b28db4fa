"""Stage 1: BLIP captioning with a tiny random BLIP, offline: CLI, resume, crash safety, bad images; list_images."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fti4cir.commands import captions as caption_commands
from fti4cir.errors import UserError
from fti4cir.imagefiles import list_images
from fti4cir.training import captions
from fti4cir.training.captions import (
    PROMPT,
    TINY_MODEL,
    caption_folder,
    caption_images,
    load_blip,
    make_tiny_blip,
    read_captions,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
IMAGENET_SAMPLE = SHARED / "photos" / "imagenet-sample"


def _run_cli(argv):
    parser = argparse.ArgumentParser()
    caption_commands.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def _write_images(folder: Path, names, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return folder


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_blip()


class CountingModel:
    """Wraps the model's generate() to count calls and captioned images."""

    def __init__(self, model):
        self.model, self.calls, self.images, self.outputs = model, 0, 0, []
        self._generate = model.generate

    def generate(self, **kwargs):
        self.calls += 1
        self.images += len(kwargs["pixel_values"])
        output = self._generate(**kwargs)
        self.outputs.append(output)
        return output

    def parameters(self):
        return self.model.parameters()


# ---- list_images --------------------------------------------------------------------------------------------------
def test_list_images_nested_and_flat(tmp_path):
    names = [
        "b/x.JPEG",
        "a/z.png",
        "a/y.Jpg",
        "top.webp",
        "a/deeper/w.jpeg",
        ".hidden.jpg",
        ".git/c.jpg",
        "a/notes.txt",
        "a/.DS_Store",
        "c.tiff",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/deeper/w.jpeg",
        "a/y.Jpg",
        "a/z.png",
        "b/x.JPEG",
        "c.tiff",
        "top.webp",
    ]
    assert all(p.is_file() and str(p).startswith(str(tmp_path)) for p in found)
    with pytest.raises(UserError, match="not a folder"):
        list_images(tmp_path / "top.webp")


# ---- models -------------------------------------------------------------------------------------------------------
def test_tiny_blip_is_deterministic_and_image_dependent(tiny, tmp_path):
    model, processor = tiny
    _write_images(tmp_path, [f"{i}.png" for i in range(4)])
    paths = list_images(tmp_path)
    first = [c.caption for b in caption_images(paths, model, processor, batch_size=4) for c in b.captioned]
    again = [c.caption for b in caption_images(paths, *make_tiny_blip(), batch_size=4) for c in b.captioned]
    assert first == again
    assert len(set(first)) > 1  # the captions depend on the image
    assert all(len(c.split()) >= 3 for c in first)


def test_prompt_is_removed_from_the_generated_text(tiny, tmp_path):
    model, processor = tiny
    counting = CountingModel(model)
    _write_images(tmp_path, ["a.png", "b.png"])
    batch = next(caption_images(list_images(tmp_path), counting, processor, batch_size=2))
    full = processor.tokenizer.batch_decode(counting.outputs[0], skip_special_tokens=True)
    for text, captioned in zip(full, batch.captioned):
        assert text.startswith(PROMPT.strip())
        assert text == f"{PROMPT}{captioned.caption}".strip()
        assert not captioned.caption.startswith(PROMPT.strip())


def test_load_blip_local_folder_roundtrip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    loaded, loaded_processor = load_blip(str(tmp_path / "blip"), "cpu")
    _write_images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    paths = list_images(tmp_path / "img")
    expected = [c.caption for b in caption_images(paths, model, processor) for c in b.captioned]
    assert [c.caption for b in caption_images(paths, loaded, loaded_processor) for c in b.captioned] == expected


def test_load_blip_offline_fails_fast_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(UserError) as info:
        load_blip("fti4cir-test/no-such-blip", "cpu")
    assert time.perf_counter() - started < 20
    message = str(info.value)
    assert "fti4cir-test/no-such-blip" in message and "local folder" in message and "--model /path/to" in message
    with pytest.raises(UserError, match="BLIP"):
        load_blip(str(tmp_path), "cpu")  # an existing folder without a model in it


# ---- the caption stage --------------------------------------------------------------------------------------------
def test_cli_on_shared_photos(tmp_path, capsys):
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"shared photos not found at {IMAGENET_SAMPLE}")
    out = tmp_path / "captions.jsonl"
    argv = [
        str(IMAGENET_SAMPLE),
        "--out",
        str(out),
        "--model",
        TINY_MODEL,
        "--batch-size",
        "4",
        "--limit",
        "6",
        "--device",
        "cpu",
    ]
    assert _run_cli(["caption", *argv]) == 0
    records = _lines(out)
    expected = [p.relative_to(IMAGENET_SAMPLE).as_posix() for p in list_images(IMAGENET_SAMPLE)[:6]]
    assert [r["image"] for r in records] == expected
    for record in records:
        assert record["sha1"] == hashlib.sha1((IMAGENET_SAMPLE / record["image"]).read_bytes()).hexdigest()
        assert record["caption"] and set(record["caption"].split()) <= set(captions._TINY_WORDS)
    assert "captioned 6 images, 0 already done, 0 bad images skipped, 6 in total" in capsys.readouterr().out
    # a rerun has nothing left to do and leaves the file alone
    before = out.read_bytes()
    assert _run_cli(["caption", *argv]) == 0
    assert out.read_bytes() == before
    assert "captioned 0 images, 6 already done" in capsys.readouterr().out


def test_resume_skips_done_images(tiny, tmp_path):
    model, processor = tiny
    images = _write_images(tmp_path / "img", ["a.png", "b.png", "c/d.png", "c/e.png", "f.png"])
    out = tmp_path / "captions.jsonl"
    counting = CountingModel(model)
    first = caption_folder(images, out, counting, processor, limit=3, batch_size=2, max_length=15)
    assert (first.captioned, first.already_done, counting.calls, counting.images) == (3, 0, 2, 3)
    counting = CountingModel(model)
    second = caption_folder(images, out, counting, processor, batch_size=2, max_length=15)
    assert (second.captioned, second.already_done, counting.calls, counting.images) == (2, 3, 1, 2)
    counting = CountingModel(model)
    third = caption_folder(images, out, counting, processor, batch_size=2)
    assert (third.captioned, third.already_done, counting.calls) == (0, 5, 0)
    assert [r["image"] for r in _lines(out)] == ["a.png", "b.png", "c/d.png", "c/e.png", "f.png"]


def test_torn_last_line_is_repaired(tiny, tmp_path, caplog, monkeypatch):
    model, processor = tiny
    images = _write_images(tmp_path / "img", ["a.png", "b.png", "c.png", "d.png"])
    out = tmp_path / "captions.jsonl"
    caption_folder(images, out, model, processor, limit=2)
    with open(out, "ab") as f:
        f.write(b'{"image": "c.png", "sha1": "0123", "capt')  # what a kill -9 in the middle of a write leaves
    records, torn = read_captions(out)
    assert torn and [r["image"] for r in records] == ["a.png", "b.png"]
    monkeypatch.setattr(logging.getLogger("fti4cir"), "propagate", True)  # as a command's logging set-up may leave it
    with caplog.at_level("WARNING", logger="fti4cir"):
        summary = caption_folder(images, out, model, processor)
    assert summary.repaired and (summary.already_done, summary.captioned) == (2, 2)
    assert "torn last line" in caplog.text
    assert [r["image"] for r in _lines(out)] == ["a.png", "b.png", "c.png", "d.png"]
    assert read_captions(out)[1] is False


def test_corrupt_middle_line_is_an_error(tiny, tmp_path):
    images = _write_images(tmp_path / "img", ["a.png"])
    out = tmp_path / "captions.jsonl"
    out.write_text(
        '{"image": "x.png", "sha1": "1", "caption": "c"}\nGARBAGE\n{"image": "y.png", "sha1": "2", "caption": "c"}\n'
    )
    with pytest.raises(UserError, match="line 2"):
        caption_folder(images, out, *tiny)


def test_bad_images_are_reported_and_skipped(tiny, tmp_path, capsys):
    model, processor = tiny
    images = _write_images(tmp_path / "img", ["a.png", "c.png", "e.png"])
    (images / "b.jpg").write_bytes(b"this is not an image")
    good_jpeg = images / "d_full.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good_jpeg)
    (images / "d.jpg").write_bytes(good_jpeg.read_bytes()[:200])  # truncated JPEG
    good_jpeg.unlink()
    out = tmp_path / "captions.jsonl"
    assert (
        _run_cli(
            [
                "caption",
                str(images),
                "--out",
                str(out),
                "--model",
                TINY_MODEL,
                "--batch-size",
                "8",
                "--device",
                "cpu",
                "--max-length",
                "15",
            ]
        )
        == 0
    )
    assert [r["image"] for r in _lines(out)] == ["a.png", "c.png", "e.png"]
    captured = capsys.readouterr()
    assert "captioned 3 images, 0 already done, 2 bad images skipped, 5 in total" in captured.out
    assert "skipping bad image b.jpg" in captured.err and "skipping bad image d.jpg" in captured.err
    counting = CountingModel(model)
    summary = caption_folder(images, out, counting, processor)  # bad images are retried, still no crash
    assert (summary.captioned, len(summary.bad), counting.calls) == (0, 2, 0)


def test_second_writer_is_refused(tmp_path):
    out = tmp_path / "captions.jsonl"
    with captions.CaptionWriter(out):
        with pytest.raises(UserError, match="another caption run"):
            captions.CaptionWriter(out)
    captions.CaptionWriter(out).close()  # free again


_CLI_SCRIPT = """
import argparse, sys
from fti4cir.commands import captions
parser = argparse.ArgumentParser()
captions.add_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_kill_9_mid_run_then_resume_loses_nothing(tiny, tmp_path):
    names = [f"{i:03d}.png" for i in range(60)]
    images = _write_images(tmp_path / "img", names, size=(24, 24))
    out = tmp_path / "captions.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CLI_SCRIPT,
            "caption",
            str(images),
            "--out",
            str(out),
            "--model",
            TINY_MODEL,
            "--batch-size",
            "1",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the captioning process ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done_before, _ = read_captions(out)
    assert 3 <= len(done_before) < len(names)

    model, processor = tiny
    summary = caption_folder(images, out, model, processor, batch_size=32, max_length=15)
    assert summary.already_done == len(done_before)
    assert summary.already_done + summary.captioned == len(names)
    records = _lines(out)
    assert sorted(r["image"] for r in records) == names  # every image exactly once
    for record in records:
        assert record["sha1"] == hashlib.sha1((images / record["image"]).read_bytes()).hexdigest()
