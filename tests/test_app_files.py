"""File access of the running app: it serves the gallery's images and the users' uploads, nothing else.

The gallery's source folder is made hostile: beside the indexed photos it holds a secret, a dotfile, notes, an image
added after indexing, symlinks to /etc, and the galleries folder itself (manifest, index, arrays). Every way to name
a file is tried: gradio's file routes (`../`, absolute paths, URL-encoded and NUL variants), the /search endpoint's
gallery image name and its file parameter (raw FileData with server paths, file:// and loopback URLs), and the
--gallery flag. Answers are 403/404 or an error, never the file's content.
"""

from __future__ import annotations

import http.client
import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from app_server import REPO, build_tiny_gallery, call_search_raw, client_for, running_app, upload_raw

GALLERY_SIZE = 6
SECRET = "SECRET-7f3a9c"  # written into every file that must not be served
# bytes that would show a refused file's content in an answer
LEAK_MARKERS = (SECRET, "root:x:0:0", "NUMPY", '"entries"', "FTI4CIR composed image retrieval demo", "v-000001")
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict[str, str]:
    """Builds the hostile gallery folder; returns the values the path templates below use."""
    tmp = tmp_path_factory.mktemp("app-files")
    build_tiny_gallery(tmp, GALLERY_SIZE)
    root = tmp / "photos"
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    galleries = root / "galleries"  # the galleries folder inside the served one: its files must stay private
    shutil.move(tmp / "galleries", galleries)
    (root / "secret.txt").write_text(SECRET)
    (root / ".env").write_text(f"TOKEN={SECRET}")
    (root / "notes").mkdir()
    (root / "notes" / "readme.md").write_text(SECRET)
    shutil.copy(root / names[0], root / "late.jpg")  # an image, but not one of the gallery's
    (root / "link.jpg").symlink_to("/etc/passwd")
    (root / "etc").symlink_to("/etc")
    version = (galleries / "demo" / "CURRENT").read_text().split()[0]
    return {
        "tmp": str(tmp),
        "root": str(root),
        "galleries": str(galleries),
        "version": version,
        "name": names[0],
        "uploads": str(tmp / "gradio-uploads"),
        "repo": str(REPO),
    }


@pytest.fixture(scope="module")
def server(layout):
    with running_app(Path(layout["tmp"]), Path(layout["galleries"])) as app_server:
        yield app_server


def get(server, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as given (no client-side normalisation of `..` or escapes)."""
    assert path.isascii() and " " not in path, path
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_no_leak(answer) -> None:
    text = answer.decode(errors="replace") if isinstance(answer, bytes) else json.dumps(answer)
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{marker!r} leaked: {text[:300]}"
    assert "Traceback" not in text


# ---- served --------------------------------------------------------------------------------------------------------
def test_gallery_images_are_served(server, layout):
    original = (Path(layout["root"]) / layout["name"]).read_bytes()
    for route in FILE_ROUTES:
        for path in ("{root}/{name}", "{root}/notes/../{name}", "{root}//{name}"):
            status, body = get(server, route + path.format(**layout))
            assert (status, body) == (200, original), (route, path, status)

    with urllib.request.urlopen(f"{server.url}config", timeout=10) as response:  # the page's own image links
        config = json.load(response)
    browser = next(c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "gallery")
    assert len(browser) == GALLERY_SIZE
    sources = {(Path(layout["root"]) / item["caption"]).read_bytes() for item in browser}
    for item in browser:
        url = item["image"]["url"]
        status, body = get(server, url[url.index("/gradio_api/") :])
        assert status == 200 and body in sources


def test_search_answers_carry_urls_the_server_serves(server, layout):
    """/search gives each result's name, score and URL; fetching the URL gives the gallery image's bytes (through
    gradio_client and through the plain HTTP API)."""
    root = Path(layout["root"])
    answers = [
        client_for(server).predict(None, layout["name"], "is red", "fti4cir", 4, api_name="/search"),
        call_search_raw(server.url, [None, layout["name"], "is red", "fti4cir", 4])[1][0],
    ]
    for answer in answers:
        assert [set(r) for r in answer["results"]] == [{"rank", "name", "score", "url"}] * 4, answer
        for result in answer["results"]:
            assert result["url"].startswith(f"{server.url}gradio_api/file="), result
            with urllib.request.urlopen(result["url"], timeout=30) as response:
                assert response.read() == (root / result["name"]).read_bytes()
    assert answers[0]["results"] == answers[1]["results"]


def test_uploads_are_served_and_searchable(server, layout):
    status, body = upload_raw(server.url, Path(layout["root"]) / layout["name"])
    assert status == 200
    uploaded = json.loads(body)[0]
    assert Path(uploaded).is_relative_to(layout["uploads"])
    assert get(server, "/gradio_api/file=" + uploaded) == (200, (Path(layout["root"]) / layout["name"]).read_bytes())
    event, data = call_search_raw(
        server.url, [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, "", "x", "fti4cir", 3]
    )
    assert event == "complete" and len(data[0]["results"]) == 3, data  # what the refused cases below are not


# ---- refused -------------------------------------------------------------------------------------------------------
REFUSED_PATHS = [
    "/etc/passwd",
    "//etc/passwd",
    "/./etc/passwd",
    "/proc/self/environ",
    "{root}/../../../../../../../../etc/passwd",
    "{root}/skirt/../../../../../../../../etc/passwd",
    "{root}/link.jpg",  # symlink to /etc/passwd
    "{root}/etc/passwd",  # through a symlinked folder
    "{root}/secret.txt",
    "{root}/.env",
    "{root}/notes/readme.md",
    "{root}/late.jpg",  # an image below the folder, but not in the gallery
    "{root}",
    "{root}/notes",
    "{galleries}/demo/CURRENT",
    "{galleries}/demo/{version}/manifest.json",
    "{galleries}/demo/{version}/index.faiss",
    "{galleries}/demo/{version}/features.npy",
    "{galleries}/demo/{version}/identity.json",
    "{root}/galleries/../secret.txt",
    "{uploads}/../photos/secret.txt",
    "{uploads}/../../../../../../../../etc/passwd",
    "app.py",
    "../../../../../../../../etc/passwd",
    "{repo}/app.py",
    "{repo}/fti4cir/gallery/store.py",
    # URL-encoded: the server decodes once; %252e stays a literal "%2e" name
    "%2Fetc%2Fpasswd",
    "{root}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "{root}%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "{root}/%252e%252e/%252e%252e/%252e%252e/etc/passwd",
    "{root}/secret%2Etxt",
    "{root}/%2Eenv",
    "{root}/..%5C..%5C..%5C..%5Cetc%5Cpasswd",
    "{root}/secret.txt%00.jpg",
    "{root}/{name}%00",
    "{galleries}%2Fdemo%2FCURRENT",
]


@pytest.mark.parametrize("route", FILE_ROUTES)
@pytest.mark.parametrize("template", REFUSED_PATHS)
def test_file_routes_refuse_everything_else(server, layout, route, template):
    status, body = get(server, route + template.format(**layout))
    assert status in (403, 404), (status, body[:200])
    assert_no_leak(body)


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "{root}/{name}",
        "./{name}",
        "skirt/../{name}",
        "{name}/",
        "{name}\0",
        "secret.txt",
        ".env",
        "late.jpg",
        "galleries/demo/CURRENT",
        "%2e%2e%2fetc%2fpasswd",
        "..\\..\\etc\\passwd",
        "~/.bashrc",
        "file:///etc/passwd",
    ],
)
def test_search_by_gallery_name_only_knows_gallery_names(server, layout, name):
    name = name.format(**layout)
    answer = client_for(server).predict(None, name, "x", "fti4cir", 3, api_name="/search")
    assert "is not in gallery" in answer.get("error", ""), answer
    assert_no_leak(answer)


def test_search_by_gallery_name_finds_the_gallery_image(server, layout):
    answer = client_for(server).predict(None, layout["name"], "x", "fti4cir", 3, api_name="/search")
    assert answer["reference"] == layout["name"] and len(answer["results"]) == 3


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "{root}/secret.txt",
        "{root}/{name}",
        "{galleries}/demo/CURRENT",
        "{uploads}/../photos/secret.txt",
        "../../../../../../../../etc/passwd",
        "file:///etc/passwd",
        "http://127.0.0.1:{port}/gradio_api/file={root}/{name}",
    ],
)  # server-side fetch of a loopback URL
def test_search_file_parameter_takes_only_uploads(server, layout, path):
    """A script may send any FileData; gradio accepts only files from its upload folder (and refuses to fetch
    URLs of private addresses), so the request fails without reading the file."""
    path = path.format(port=server.port, **layout)
    event, data = call_search_raw(
        server.url, [{"path": path, "meta": {"_type": "gradio.FileData"}}, "", "x", "fti4cir", 3]
    )
    assert event == "error" or "error" in data[0], (event, data)
    assert_no_leak(data)
    assert server.alive()


def test_reference_box_takes_only_uploads(server, layout):
    """The page's reference box (drop, paste, webcam) hands its event the file's path undecoded: gradio still accepts
    only files from its upload folder there, so a crafted event naming any other file fails without reading it."""
    import uuid

    with urllib.request.urlopen(f"{server.url}config", timeout=10) as response:
        config = json.load(response)
    box = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "reference")
    assert next(c["type"] for c in config["components"] if c["id"] == box) == "image"
    fn_index = next(i for i, d in enumerate(config["dependencies"]) if [box, "upload"] in d["targets"])

    def drop(path: str) -> tuple[dict, list]:
        session = uuid.uuid4().hex
        body = {
            "data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, "is red", "fti4cir", 3],
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
        with urllib.request.urlopen(f"{server.url}gradio_api/queue/data?session_hash={session}", timeout=60) as r:
            messages = [json.loads(line[6:]) for line in r if line.startswith(b"data: ")]
        return next(m for m in messages if m.get("msg") == "process_completed"), messages

    status, body = upload_raw(server.url, Path(layout["root"]) / layout["name"])
    assert status == 200
    final, _ = drop(json.loads(body)[0])  # an upload: searched
    assert final["success"] and "but is red" in json.dumps(final["output"]), final
    for path in ("/etc/passwd", "{root}/secret.txt", "{root}/{name}", "{galleries}/demo/CURRENT"):
        final, messages = drop(path.format(**layout))
        assert not final["success"], (path, final)
        assert_no_leak(json.dumps(messages))
    assert server.alive()


# ---- the --gallery flag --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "gallery", ["../x", "/etc", "..", "demo/../demo", "photos/../../x", "%2e%2e", "demo\0", ".hidden", "/etc/passwd"]
)
def test_gallery_flag_outside_the_galleries_dir_is_refused(layout, tiny_model, monkeypatch, gallery):
    """The banner's message (the page shows setup.problems; test_app_service checks the rendering)."""
    import app

    monkeypatch.chdir(layout["tmp"])  # relative names resolve the same way on every machine
    monkeypatch.setattr(app, "create_model_or_fti4cir", lambda spec: (tiny_model, None))  # no model to build
    setup = app.load_service(
        app.parse_args(["--tiny", "--device", "cpu", "--gallery", gallery, "--galleries-dir", layout["galleries"]])
    )
    assert setup.service is None and "Invalid gallery name" in setup.problems[0], setup.problems


def test_bad_gallery_flag_disables_search_in_the_running_app(layout, tmp_path):
    with running_app(tmp_path, Path(layout["galleries"]), gallery="/etc") as app_server:
        with urllib.request.urlopen(f"{app_server.url}config", timeout=10) as response:
            config = json.load(response)
        banner = next(c["props"] for c in config["components"] if c["props"].get("elem_id") == "banner")
        assert banner["visible"] and "Invalid gallery name '/etc'" in banner["value"]
        answer = client_for(app_server).predict(None, "passwd", "x", "fti4cir", 10, api_name="/search")
        assert answer["error"].startswith("Search is disabled: The gallery could not be loaded.")
        assert_no_leak(answer)
    assert "search disabled: The gallery could not be loaded. Invalid gallery name '/etc'" in app_server.log_text()
