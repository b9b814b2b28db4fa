"""Deploying the app to a Hugging Face Space with `HfApi.upload_folder` (`fti4cir deploy-space REPO_ID`).

Binary files (photos, .npy, .faiss, .safetensors) stay plain files in this repository; the Hub stores them on its side
when they are uploaded. Only the allow-list goes up (the app, the package, the embedded demo model and gallery, the
demo photos, the runtime requirements, README, LICENSE): never .venv, runs/, cache/ or tests. `--dry-run` lists what
would go up with sizes and checks the README front matter (sdk gradio at the pinned version, app_file present,
python_version given) without any network.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

# what a Space needs, as upload_folder allow patterns (relative to the repository root)
ALLOW = [
    "app.py",
    "README.md",
    "LICENSE",
    "requirements.txt",
    "fti4cir/**",
    "galleries/clothing*",
    "galleries/clothing*/**",
    "weights/clothing-*",
    "data/clothing/test/**",
    "data/clothing/LICENSE",
]
IGNORE = ["**/__pycache__/**", "*.pyc", "**/.staging-*/**", "**/.lock", ".venv/**", "runs/**", "cache/**", "tests/**"]


@dataclass(frozen=True)
class SpaceFile:
    path: str  # relative, posix
    size: int


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def space_files(root: str | Path = ".") -> list[SpaceFile]:
    """The files the Space gets (the same patterns upload_folder receives), sorted by path."""
    root = Path(root)
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.is_symlink() and _matches(rel, ALLOW) and not _matches(rel, IGNORE):
            files.append(SpaceFile(rel, p.stat().st_size))
    return files


def front_matter(readme: Path) -> dict[str, str]:
    """The README's YAML front matter as flat `key: value` strings (what a Space reads from it)."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    if not match:
        raise UserError(f"{readme} has no front matter (--- ... --- at the top): a Space needs one")
    fields = {}
    for line in match.group(1).splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "#")):
            fields[key.strip()] = value.strip().strip("\"'")
    return fields


def pinned(requirements: Path, package: str) -> str | None:
    """The version `package==X` pins in a requirements file, or None."""
    for line in requirements.read_text(encoding="utf-8").splitlines() if requirements.is_file() else []:
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.strip().lower().replace("_", "-") == package:
            return version.strip()
    return None


def check_space(root: str | Path = ".") -> list[str]:
    """Problems that keep the Space from starting (empty = none): front matter, pins, app file."""
    root = Path(root)
    meta = front_matter(root / "README.md")
    problems = []
    if meta.get("sdk") != "gradio":
        problems.append(f"front matter sdk is {meta.get('sdk')!r}, not 'gradio'")
    gradio = pinned(root / "requirements.txt", "gradio")
    if gradio is None:
        problems.append("requirements.txt pins no gradio==X")
    elif meta.get("sdk_version") != gradio:
        problems.append(
            f"front matter sdk_version {meta.get('sdk_version')!r} differs from the pinned gradio {gradio!r}"
        )
    app_file = meta.get("app_file")
    if not app_file or not (root / app_file).is_file():
        problems.append(f"front matter app_file {app_file!r} is not a file of the repository")
    if not meta.get("python_version"):
        problems.append(
            "front matter has no python_version (a Space then uses Python 3.10, which the pinned numpy "
            "does not support)"
        )
    return problems


def human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError


def deploy(
    repo_id: str, root: str | Path = ".", *, token: str | None = None, dry_run: bool = False, out=log.info
) -> list[SpaceFile]:
    """Check, list (dry run) or upload the app's files to the Space `repo_id` (created when missing). `out` gets the
    listing and the summary lines (the command prints them on stdout)."""
    root = Path(root)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"Space id {repo_id[:100]!r} must look like user/space-name")
    files = space_files(root)
    problems = check_space(root)
    if dry_run:
        for f in files:
            out(f"{f.size:>12,d}  {f.path}")
        out(f"{len(files)} files, {human(sum(f.size for f in files))} would go to Space {repo_id}")
        out("front matter: ok" if not problems else "front matter problems:\n  " + "\n  ".join(problems))
    if problems:
        raise UserError("The Space would not start: " + "; ".join(problems))
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        repo_type="space",
        folder_path=str(root),
        allow_patterns=ALLOW,
        ignore_patterns=IGNORE,
        commit_message="fti4cir deploy-space",
    )
    out(
        f"uploaded {len(files)} files ({human(sum(f.size for f in files))}) to https://huggingface.co/spaces/{repo_id}"
        f" ({getattr(info, 'commit_url', info)})"
    )
    return files
