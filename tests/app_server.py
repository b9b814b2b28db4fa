"""Runs the real app (`python app.py --tiny ...`) as a subprocess for end-to-end tests.

    galleries = build_tiny_gallery(tmp_path, 20)                      # tmp/photos (the gallery root), tmp/galleries
    with running_app(tmp_path, galleries) as server:                  # a free loopback port, waits until it serves
        server.url, server.pid, server.rss_bytes(), server.log_text()
    # stopped here, whatever happened (SIGTERM, then SIGKILL after a grace period)
    with running_space(copy_of_the_space, tmp_path) as server: ...   # `python app.py` as a Space starts it

Clients: `client_for(server)` (a gradio_client.Client), `call_search_raw(url, data)` (the /search endpoint through
gradio's plain HTTP API, for inputs gradio_client cannot send), `upload_raw(url, path)` (gradio's upload route).
Used by test_app_browser.py, test_app_load.py, test_app_files.py, test_app_space.py and test_reliability_app.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from app_helpers import build_small_gallery

REPO = Path(__file__).resolve().parents[1]
GALLERY = "demo"  # the name build_small_gallery gives
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0
# gradio_client opens a new httpx client for every request; with a fresh default SSL context each time (loading
# the CA bundle, ~90 ms of CPU per query) the test process, not the app, was the bottleneck of the load test. One
# shared context (never used on plain-http loopback) removes that cost.
SSL_CONTEXT = ssl.create_default_context()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_gallery(tmp: Path, count: int) -> Path:
    """`count` clothing photos copied to tmp/photos and indexed with the app's tiny model into tmp/galleries.
    The model is built the way `app.py --tiny` builds it, so the app accepts the gallery."""
    import app
    from fti4cir.factory import create_model

    args = app.parse_args(["--tiny", "--device", "cpu"])
    return build_small_gallery(create_model(app.model_spec(args)), tmp, count, name=GALLERY)


@dataclass
class AppServer:
    url: str  # http://127.0.0.1:<port>/
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """Resident memory of the server process from /proc/<pid>/status: VmRSS now, VmHWM its peak so far."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} for process {self.pid}")


def client_for(server: AppServer):
    from gradio_client import Client

    return Client(server.url, verbose=False, ssl_verify=SSL_CONTEXT)


def upload_raw(url: str, path: Path) -> tuple[int, str]:
    """POST one file to gradio's upload route as a browser would; (status, body)."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    body = head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"{url}gradio_api/upload",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def call_search_raw(url: str, data: list, timeout: float = 60.0) -> tuple[str, object]:
    """The /search endpoint through gradio's plain HTTP API, without gradio_client: what any script can send (raw
    FileData dicts, texts with escaped lone surrogates). Returns the final server-sent event and its data:
    ("complete", [answer]) or ("error", {...})."""
    request = urllib.request.Request(
        f"{url}gradio_api/call/search",
        data=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/search/{event_id}", timeout=timeout) as response:
        stream = response.read().decode()
    events = [block.split("\n") for block in stream.strip().split("\n\n")]
    event, data_line = events[-1][0], events[-1][1]
    assert event.startswith("event: ") and data_line.startswith("data: "), stream
    return event[len("event: ") :], json.loads(data_line[len("data: ") :])


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the app did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_app(
    tmp: Path,
    galleries: Path | None,
    *,
    gallery: str | None = GALLERY,
    extra_args: Sequence[str] = (),
    cwd: Path = REPO,
    tiny: bool = True,
) -> Iterator[AppServer]:
    """`python app.py --tiny` (tiny=False: the embedded demo model) on a free loopback port, with its own gradio
    upload dir (tmp/gradio-uploads) and log (tmp/app-<port>.log); the process is always stopped on exit.
    gallery=None omits --gallery, galleries=None --galleries-dir."""
    port = free_port()
    command = [
        sys.executable,
        str(REPO / "app.py"),
        *(["--tiny"] if tiny else []),
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if gallery is not None:
        command += ["--gallery", gallery]
    if galleries is not None:
        command += ["--galleries-dir", str(galleries)]
    env = clean_environment(tmp)
    env["PYTHONPATH"] = str(REPO)
    with serving([*command, *extra_args], cwd, env, tmp / f"app-{port}.log", port) as server:
        yield server


@contextlib.contextmanager
def running_space(folder: Path, tmp: Path, **variables: str) -> Iterator[AppServer]:
    """`python app.py` with no arguments in `folder` (a copy of the Space's files), as a Hugging Face Space starts
    it: PORT=<a free port>, GRADIO_SERVER_NAME=0.0.0.0, the Space's variables (`variables`, e.g.
    FTI4CIR_MODEL="fti4cir-official"), no PYTHONPATH (the copy's own package is imported); offline. Its log and
    gradio's upload dir go to `tmp`, outside the copy."""
    port = free_port()
    env = clean_environment(tmp)
    env.pop("PYTHONPATH", None)
    env.update(PORT=str(port), GRADIO_SERVER_NAME="0.0.0.0", **variables)
    with serving([sys.executable, "app.py"], folder, env, tmp / f"space-{port}.log", port) as server:
        yield server


def clean_environment(tmp: Path) -> dict[str, str]:
    """This process's environment without the app's own variables, offline, gradio's uploads under tmp."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT") and not k.startswith("FTI4CIR_")
    }
    env.update(
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(tmp / "gradio-uploads"),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@contextlib.contextmanager
def serving(command: list[str], cwd: Path, env: dict[str, str], log: Path, port: int) -> Iterator[AppServer]:
    """Runs the app's command until it answers on http://127.0.0.1:<port>/; always stopped on exit."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, process, log)
        yield AppServer(url, port, process, log)
    finally:
        stop(process)
