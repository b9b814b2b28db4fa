"""The running app cleans up and serves safely: 200 new sessions with flat memory, uploads deleted after the cache
age, nosniff on every response, files as attachments, monitoring off. End to end on `python app.py --tiny`
(tests/app_server.py), driving the page's own events through gradio's queue protocol as a browser would."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app_server import build_tiny_gallery, running_app, upload_raw

GALLERY_SIZE = 8
SESSIONS = 200
MAX_SESSIONS = 40  # --max-sessions of the test server: the 200 new sessions overflow it five times
WARM_UP_SESSIONS = 50  # fill the session store (and the allocator's arenas) before measuring
CACHE_MAX_AGE_S = 3
# Allowed growth of the server's resident memory over 200 new sessions (after the warm-up), each picking a gallery
# image as its reference (decoding, heatmaps, chart, results: the heaviest first request of a session) and keeping
# its state. A session holds ~1.5 MB (most of it gradio's per-session copy of the page's outputs; measured over 30
# sessions without a bound), so gradio's default bound of 10,000 sessions would let 200 new ones add ~300 MB; with
# the session count bounded the memory stays flat once the store is full (the measured growth: pytest -s prints it).
MAX_GROWTH = 80 * 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app-reliability")
    galleries = build_tiny_gallery(tmp, GALLERY_SIZE)
    with running_app(
        tmp, galleries, extra_args=["--cache-max-age", str(CACHE_MAX_AGE_S), "--max-sessions", str(MAX_SESSIONS)]
    ) as app_server:
        app_server.tmp = tmp
        yield app_server
        assert "Traceback" not in app_server.log_text(), app_server.log_text()[-3000:]


def _get(url: str) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body)"""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _browser_select(server) -> int:
    """fn_index of the gallery browser's select event (what a click on a gallery image runs)."""
    config = json.loads(_get(f"{server.url}config")[2])
    browser = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "gallery")
    return next(i for i, d in enumerate(config["dependencies"]) if [browser, "select"] in d["targets"])


def _new_session_picks(server, fn_index: int, row: int) -> dict:
    """A new browser session (its own session hash) clicks gallery image `row`; the event's final message."""
    session = uuid.uuid4().hex
    body = {
        "data": ["", "fti4cir", 3],
        "event_data": {"index": row, "value": None, "selected": True},
        "fn_index": fn_index,
        "trigger_id": None,
        "session_hash": session,
    }
    request = urllib.request.Request(
        f"{server.url}gradio_api/queue/join",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60):
        pass
    with urllib.request.urlopen(f"{server.url}gradio_api/queue/data?session_hash={session}", timeout=120) as r:
        for line in r:
            if line.startswith(b"data: "):
                message = json.loads(line[6:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("no process_completed message")


def test_memory_stays_flat_over_200_new_sessions(server):
    fn_index = _browser_select(server)

    def run(count: int, offset: int) -> None:
        with ThreadPoolExecutor(2) as pool:
            for message in pool.map(
                lambda i: _new_session_picks(server, fn_index, i % GALLERY_SIZE), range(offset, offset + count)
            ):
                assert message["success"], message
                output = message["output"]["data"]
                assert "pseudo token" in json.dumps(output), output  # the page got its sentence and token table

    run(WARM_UP_SESSIONS, 0)
    before = server.rss_bytes()
    start = time.perf_counter()
    run(SESSIONS, WARM_UP_SESSIONS)
    growth = server.rss_bytes() - before
    print(
        f"\n{SESSIONS} new sessions in {time.perf_counter() - start:.0f} s: RSS {before / 2**20:.0f} MiB -> "
        f"{(before + growth) / 2**20:.0f} MiB ({growth / 2**20:+.1f} MiB, {growth / SESSIONS / 1024:+.0f} kB a "
        "session)"
    )
    assert growth < MAX_GROWTH


def test_uploads_are_deleted_after_the_cache_age(server, tmp_path):
    from PIL import Image

    photo = tmp_path / "new-photo.jpg"  # not a gallery image: gradio keeps those the page itself shows
    Image.new("RGB", (40, 30), (12, 200, 7)).save(photo)
    status, body = upload_raw(server.url, photo)
    assert status == 200
    uploaded = Path(json.loads(body)[0])
    assert uploaded.is_file()
    deadline = time.monotonic() + 10 * CACHE_MAX_AGE_S
    while uploaded.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not uploaded.exists(), "the upload outlived the cache age"
    assert _get(f"{server.url}gradio_api/file={uploaded}")[0] in (403, 404)


def test_every_response_says_nosniff_and_files_are_attachments(server, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_bytes(b"<html><script>alert(1)</script></html>")  # HTML named .jpg
    status, body = upload_raw(server.url, fake)
    assert status == 200
    uploaded = json.loads(body)[0]
    status, headers, content = _get(f"{server.url}gradio_api/file={uploaded}")
    assert status == 200 and content == fake.read_bytes()
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-disposition"].startswith("attachment")
    for path in ("", "config", "gradio_api/info", "gradio_api/file=/etc/passwd", "no/such/page"):
        status, headers, _ = _get(server.url + path)
        assert headers.get("x-content-type-options") == "nosniff", (path, status)


def test_monitoring_is_off(server):
    for path in ("monitoring", "monitoring/summary", "monitoring/some-key", "gradio_api/monitoring/summary"):
        status, _, body = _get(server.url + path)
        assert status in (403, 404), (path, status, body[:200])
