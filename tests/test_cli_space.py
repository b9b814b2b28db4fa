"""fti4cir deploy-space: the allow-list, the front-matter checks, the dry run and the upload call (offline)."""

from pathlib import Path

import pytest

from fti4cir import space
from fti4cir.cli import main
from fti4cir.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FRONT = "---\ntitle: t\nsdk: gradio\nsdk_version: {sdk}\napp_file: app.py\n{python}license: mit\n---\n\n# t\n"


def make_repo(tmp: Path, python='python_version: "3.11"\n', sdk="6.31.0") -> Path:
    (tmp / "README.md").write_text(FRONT.format(sdk=sdk, python=python))
    (tmp / "requirements.txt").write_text("numpy==2.4.6\ngradio==6.31.0\n")
    for rel, size in {
        "app.py": 10,
        "LICENSE": 20,
        "fti4cir/cli.py": 30,
        "fti4cir/__pycache__/cli.cpython-311.pyc": 5,
        "galleries/clothing/CURRENT": 7,
        "galleries/clothing/v-000001/features.npy": 1000,
        "galleries/clothing/.lock": 0,
        "galleries/clothing/.staging-abc/shard.npz": 9,
        "galleries/other/CURRENT": 7,
        "weights/clothing-demo.safetensors": 2000,
        "weights/clothing-demo.json": 40,
        "weights/private.safetensors": 50,
        "data/clothing/test/dress/a.jpg": 300,
        "data/clothing/train/dress/b.jpg": 300,
        "data/clothing/LICENSE": 12,
        ".venv/bin/python": 1,
        "runs/x/log.jsonl": 1,
        "cache/f.bin": 1,
        "tests/test_x.py": 1,
    }.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(b"x" * size)
    return tmp


def test_allow_list_takes_the_app_files_only(tmp_path):
    files = {f.path: f.size for f in space.space_files(make_repo(tmp_path))}
    assert files == {
        "README.md": len((tmp_path / "README.md").read_bytes()),
        "requirements.txt": 28,
        "app.py": 10,
        "LICENSE": 20,
        "fti4cir/cli.py": 30,
        "galleries/clothing/CURRENT": 7,
        "galleries/clothing/v-000001/features.npy": 1000,
        "weights/clothing-demo.safetensors": 2000,
        "weights/clothing-demo.json": 40,
        "data/clothing/test/dress/a.jpg": 300,
        "data/clothing/LICENSE": 12,
    }


def test_dry_run_lists_sizes_and_total_and_uploads_nothing(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", None)  # any use would fail
    assert main(["deploy-space", "me/demo", "--dry-run", "--root", str(make_repo(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "       2,000  weights/clothing-demo.safetensors" in out
    assert "11 files, 3.6 kB would go to Space me/demo" in out and "front matter: ok" in out
    assert ".venv" not in out and "tests/" not in out and "runs/" not in out and "private" not in out


@pytest.mark.parametrize(
    "python, sdk, problem",
    [
        ("", "6.31.0", "no python_version"),
        ('python_version: "3.11"\n', "5.0.0", "sdk_version '5.0.0' differs from the pinned gradio '6.31.0'"),
    ],
)
def test_front_matter_problems_refuse_the_deploy(tmp_path, capsys, python, sdk, problem):
    root = make_repo(tmp_path, python=python, sdk=sdk)
    assert main(["deploy-space", "me/demo", "--dry-run", "--root", str(root)]) == 2
    captured = capsys.readouterr()
    assert problem in captured.out and "The Space would not start" in captured.err


def test_missing_app_file_and_bad_space_id(tmp_path):
    root = make_repo(tmp_path)
    (root / "app.py").unlink()
    assert any("app_file 'app.py' is not a file" in p for p in space.check_space(root))
    with pytest.raises(UserError, match="user/space-name"):
        space.deploy("no-slash", root, dry_run=True, out=lambda *_: None)


def test_upload_call_gets_the_allow_list(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return "commit-url"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    root = make_repo(tmp_path)
    lines = []
    files = space.deploy("me/demo", root, token="hf_x", out=lines.append)
    assert calls[0] == ("init", "hf_x")
    assert calls[1] == ("create_repo", "me/demo", {"repo_type": "space", "space_sdk": "gradio", "exist_ok": True})
    upload = calls[2][1]
    assert upload["repo_id"] == "me/demo" and upload["repo_type"] == "space" and upload["folder_path"] == str(root)
    # upload_folder filters with the same patterns (fnmatch) the dry run listed
    from huggingface_hub.utils import filter_repo_objects

    all_files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    chosen = list(
        filter_repo_objects(
            all_files, allow_patterns=upload["allow_patterns"], ignore_patterns=upload["ignore_patterns"]
        )
    )
    assert sorted(chosen) == sorted(f.path for f in files)
    assert "uploaded 11 files" in lines[-1]


def test_this_repository_is_deployable():
    assert space.check_space(ROOT) == []
    paths = [f.path for f in space.space_files(ROOT)]
    assert "app.py" in paths and "fti4cir/cli.py" in paths and "requirements.txt" in paths
    assert not any(p.startswith(("tests/", ".venv/", "runs/", "cache/")) or "__pycache__" in p for p in paths)
    if (ROOT / "galleries" / "clothing").is_dir():  # the embedded demo: its model, gallery and photos go up
        assert "galleries/clothing/CURRENT" in paths and "weights/clothing-fti4cir.safetensors" in paths
        assert any(p.startswith("data/clothing/test/") for p in paths)
