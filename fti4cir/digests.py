"""Content digests: sha256 of files and of a module's weights, the keys that make caches and galleries comparable."""

from __future__ import annotations

import hashlib
import os


def parameter_digest(module) -> str:
    """sha256 over a module's state (names, dtypes, shapes, values): equal digests = identical weights."""
    import torch

    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        value = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{value.dtype}|{tuple(value.shape)}\n".encode())
        h.update(value.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's content, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
