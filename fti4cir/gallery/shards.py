"""Per-image gallery rows (visual features -> pseudo tokens + explanation data) and the staged shards a build writes
them to: each shard is written atomically and named by its images' content hashes, so a resumed or retried build
rewrites the same file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_path
from .store import ARRAYS

if TYPE_CHECKING:
    from ..backbone import VisualFeatures


def row_shapes(model) -> dict[str, tuple[int, ...]]:
    """Shape of one row of each per-row array (`ARRAYS`) for this model."""
    c, (gh, gw) = model.inversion.config, model.backbone.grid_size
    return {
        "features": (c.embed_dim,),
        "subject": (c.token_dim,),
        "attributes": (c.topk, c.token_dim),
        "num_kept": (),
        "relevance": (c.num_k,),
        "indices": (c.topk,),
        "attention": (c.num_k, gh * gw),
    }


def explain_meta(model) -> dict:
    """The explanation settings a gallery records (the manifest's "explain")."""
    c = model.inversion.config
    return {"num_k": c.num_k, "topk": c.topk, "epsilon": c.epsilon, "grid": list(model.backbone.grid_size)}


def shard_arrays(model, visual: VisualFeatures, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Pseudo tokens and explanation data of images from their visual features, in the gallery's row format."""
    import torch
    import torch.nn.functional as F

    from ..backbone import VisualFeatures
    from ..explain import patch_attention

    parts: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
    with torch.inference_mode():
        for start in range(0, visual.global_features.shape[0], batch_size):
            chunk = VisualFeatures(
                visual.global_features[start : start + batch_size].to(model.device),
                visual.patch_tokens[start : start + batch_size].to(model.device),
            )
            tokens = model.invert(chunk, return_attention=True)
            sel = tokens.selection
            rows = {
                "features": F.normalize(tokens.image_features.float(), dim=-1),
                "subject": tokens.subject,
                "attributes": tokens.attributes,
                "num_kept": tokens.num_kept,
                "relevance": sel.relevance,
                "indices": sel.indices,
                "attention": patch_attention(sel.attention, sel.relevance.shape[1]),
            }
            for k, v in rows.items():
                parts[k].append(v.detach().cpu().numpy().astype(ARRAYS[k]))
    return {k: np.concatenate(v) for k, v in parts.items()}


# ---- staging: shards of computed images ---------------------------------------------------------------------------
def _shard_name(hashes: list[str]) -> str:
    return "shard-" + hashlib.sha1("\n".join(hashes).encode()).hexdigest()[:20] + ".npz"


def write_shard(folder: Path, hashes: list[str], arrays: dict[str, np.ndarray]) -> Path:
    """Atomic and idempotent: the same images always give the same shard file."""
    path = folder / _shard_name(hashes)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, hashes=np.array(hashes), **arrays)
    return path


def staged_hashes(folder: Path) -> dict[str, Path]:
    """hash -> shard file, over the finished shards (an unreadable shard is dropped: it is recomputed)."""
    done = {}
    for shard in sorted(folder.glob("shard-*.npz")):
        try:
            with np.load(shard) as data:
                hashes = data["hashes"].tolist()
        except Exception:  # noqa: BLE001 - a damaged shard only costs its recomputation
            shard.unlink(missing_ok=True)
            continue
        done.update(dict.fromkeys(hashes, shard))
    return done
