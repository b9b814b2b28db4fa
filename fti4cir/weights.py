"""FTI4CIR inversion-network weights from wherever they are: our .safetensors (+ .json, `fti4cir.weightfiles`), an
official release file (read safely by `fti4cir.convert`), or a Hub id (`fti4cir.hub`)."""

from __future__ import annotations

import os
from pathlib import Path

from . import hub
from .convert import read_official
from .errors import UserError
from .inputs import quote
from .inversion import InversionConfig, InversionNetwork
from .weightfiles import build_network, config_path, read_config, save_weights

# This module's API: load_weights and its pair save_weights (with config_path; their home is fti4cir.weightfiles).
__all__ = ["OFFICIAL_SUFFIXES", "config_path", "load_safetensors_weights", "load_weights", "save_weights"]

OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin")


def _read_config(path: Path) -> InversionConfig:
    try:
        return InversionConfig.from_dict(read_config(path))
    except (ValueError, TypeError) as e:
        raise UserError(f"FTI4CIR weights config of {path.name} is invalid: {e}") from None


def load_safetensors_weights(path: str | os.PathLike) -> InversionNetwork:
    path = Path(path)
    return build_network(InversionNetwork, _read_config(path), path)


def _looks_like_hub_id(source: str) -> bool:
    """'org/repo' or 'org/repo/file'; a missing local-looking path ('./x', '/x', 'dir/x.safetensors') is not one."""
    parts = source.split("/")
    return (
        not source.startswith((".", "/"))
        and len(parts) >= 2
        and (len(parts) > 2 or Path(source).suffix not in OFFICIAL_SUFFIXES + (".safetensors",))
    )


def _hub_download(spec: str, revision: str | None = None) -> Path:
    """'org/repo' (file fti4cir.safetensors) or 'org/repo/path/in/repo.safetensors', optionally '@revision' (or
    `revision`); cache first, then the network (`fti4cir.hub`)."""
    spec, at = hub.split_revision(spec)
    if at is not None and revision is not None and at != revision:
        raise UserError(
            f"Weights {quote(spec, 200)} name revision {quote(at, 60)} and --weights-revision "
            f"{quote(revision, 60)}; give one"
        )
    revision = revision or at
    parts = spec.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or "fti4cir.safetensors"
    weights = hub.download(repo, filename, revision=revision, what="weights")
    if filename.endswith(".safetensors"):
        try:  # the config travels in the file's metadata too
            hub.download(repo, str(Path(filename).with_suffix(".json")), revision=revision, what="weights config")
        except UserError:
            pass
    return weights


def load_weights(source: str | os.PathLike, *, expect_backbone=None, revision: str | None = None) -> InversionNetwork:
    """Our .safetensors (+ .json), an official release .pth (read safely, see `fti4cir.convert`), or a hub id
    ('org/repo[/file][@revision]'; `revision`: a branch, tag or commit of the hub repository)."""
    path = Path(source)
    if not path.exists():
        if not _looks_like_hub_id(str(source).split("@")[0]):
            raise UserError(f"Weights file not found: {quote(str(source), 200)}")
        path = _hub_download(str(source), revision)
    if path.suffix in OFFICIAL_SUFFIXES:
        net = read_official(path, backbone=expect_backbone)
    else:
        net = load_safetensors_weights(path)
    if expect_backbone is not None:
        c, b = net.config, expect_backbone
        if (c.embed_dim, c.token_dim, c.patch_dim) != (b.embed_dim, b.token_dim, b.patch_dim):
            raise UserError(
                f"Weights {path.name} were made for backbone '{c.backbone}' (embed {c.embed_dim}, token "
                f"{c.token_dim}, patch {c.patch_dim}) but '{b.name}' is loaded (embed {b.embed_dim}, "
                f"token {b.token_dim}, patch {b.patch_dim}); pass the matching --backbone"
            )
    return net
