"""The Hugging Face Hub: one public home for the Hub access the backbone, weights and presets share.

Hub access is cache first (no network, no hang), then the network when huggingface_hub's own settings allow it:
`HF_HUB_OFFLINE`, `HF_ENDPOINT` (a mirror) and the proxies of its HTTP session are honoured. Hub file specs may carry a
revision: `org/repo@rev` or `org/repo/file.safetensors@rev` (a branch, tag or commit).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import UserError

REACH_TIMEOUT_S = 3.0


@contextlib.contextmanager
def offline():
    """Make huggingface_hub answer from its cache only (no network), restoring its setting afterwards."""
    import huggingface_hub.constants as hf_constants

    old = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old


def reachable() -> bool:
    """Whether the Hub (huggingface_hub's configured endpoint, HF_ENDPOINT) answers: False at once when
    huggingface_hub is set offline (HF_HUB_OFFLINE, also when set in the environment after it was imported), else one
    short request through its own HTTP session (proxies, certificates, headers as it uses them)."""
    import huggingface_hub.constants as hf_constants
    from huggingface_hub.utils import get_session

    if hf_constants.HF_HUB_OFFLINE or _truthy(os.environ.get("HF_HUB_OFFLINE")):  # also when set after import
        return False
    try:
        get_session().head(hf_constants.ENDPOINT, timeout=REACH_TIMEOUT_S)
        return True
    except Exception:  # noqa: BLE001 - any connection failure means "not reachable"
        return False


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "on", "yes", "true")


def split_revision(spec: str) -> tuple[str, str | None]:
    """'org/repo/file@rev' -> ('org/repo/file', 'rev'); without '@' the revision is None."""
    base, sep, revision = str(spec).rpartition("@")
    if not sep:
        return str(spec), None
    if not base or not revision or "/" not in base:
        raise UserError(f"Hub spec {spec[:200]!r} must look like org/repo[/file]@revision")
    return base, revision


def download(repo: str, filename: str, *, revision: str | None = None, what: str = "file") -> Path:
    """A file of a Hub model repository: from the cache, else downloaded (once) when the Hub is reachable. A
    UserError says what was tried."""
    from huggingface_hub import hf_hub_download

    errors = []
    try:
        with offline():
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir()))
    except Exception as e:  # noqa: BLE001 - any cache miss becomes the same actionable message
        errors.append(f"cache: {type(e).__name__}")
    if reachable():
        try:
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir()))
        except Exception as e:  # noqa: BLE001
            errors.append(f"download: {str(e)[:200]}")
    else:
        errors.append(f"download: the Hub ({endpoint()}) is unreachable or HF_HUB_OFFLINE is set")
    at = f"@{revision}" if revision else ""
    raise UserError(
        f"Could not get {what} {filename[:100]!r} of Hub repository {repo[:100]!r}{at} "
        f"({'; '.join(errors)}). Download it elsewhere and pass the local path."
    )


def list_files(repo: str, *, revision: str | None = None) -> list[str]:
    """The files of a Hub model repository: asked from the Hub, else what the local cache holds of it."""
    from huggingface_hub import HfApi, scan_cache_dir

    if reachable():
        try:
            return list(HfApi().list_repo_files(repo, revision=revision))
        except Exception:  # noqa: BLE001 - fall back to the cache below
            pass
    try:
        cache = scan_cache_dir(cache_dir())
    except Exception:  # noqa: BLE001 - no cache folder yet
        return []
    files = set()
    for info in cache.repos:
        if info.repo_id == repo and info.repo_type == "model":
            for rev in info.revisions:
                if revision is None or revision in rev.refs or rev.commit_hash == revision:
                    files.update(f.file_path.relative_to(rev.snapshot_path).as_posix() for f in rev.files)
    return sorted(files)


def endpoint() -> str:
    import huggingface_hub.constants as hf_constants

    return hf_constants.ENDPOINT


def cache_dir() -> Path:
    """huggingface_hub's model cache folder (HF_HOME / HF_HUB_CACHE)."""
    import huggingface_hub.constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE)
