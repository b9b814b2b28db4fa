"""Training checkpoints shared by the FTI4CIR trainer and both M2C stages: RNG states, and the network + optimizer
tensors of a step written atomically beside a JSON commit record.

A checkpoint is two files: `checkpoint-<step>.safetensors` (network state and optimizer tensors, written first) and
the commit record (JSON, written atomically by the caller) that names it and holds everything else (optimizer
hyper-parameters and scalars, RNG states, the caller's own bookkeeping). A kill at any moment leaves the previous
commit and its tensors intact; restoring puts back exactly the state of that commit.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from ..errors import UserError


# ---- RNG state --------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _from_b64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_from_b64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---- tensors + commit record ------------------------------------------------------------------------------------
def write_state_tensors(run_dir: Path, step: int, net: torch.nn.Module, optimizer) -> tuple[str, dict]:
    """Write the network state and the optimizer's tensors of `step` atomically; returns the file's name and the
    optimizer's remaining state (hyper-parameters and per-parameter scalars) for the commit record."""
    tensors = {f"net/{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for index, param_state in opt["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    name = f"checkpoint-{step:09d}.safetensors"
    with atomic_path(run_dir / name) as tmp:
        save_file(tensors, str(tmp))
    return name, {"param_groups": opt["param_groups"], "scalars": scalars}


def remove_stale_tensors(run_dir: Path, keep: str) -> None:
    """After a commit: delete the tensors files of older checkpoints."""
    for old in run_dir.glob("checkpoint-*.safetensors"):
        if old.name != keep:
            old.unlink(missing_ok=True)


def restore_state_tensors(run_dir: Path, record: dict, net: torch.nn.Module, optimizer) -> None:
    """Load the network and optimizer state a commit record names (`tensors`, `optimizer`); sets no RNG state."""
    tensors = load_file(str(run_dir / record["tensors"]))
    net.load_state_dict({k[len("net/") :]: v for k, v in tensors.items() if k.startswith("net/")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in record["optimizer"]["scalars"].items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": record["optimizer"]["param_groups"]})


def changed_settings(saved: dict, current: dict, resumable) -> list[str]:
    """ "key: checkpoint X, now Y" for every setting of a resumed run that differs from its checkpoint's, except those
    in `resumable` (the ones a resumed run may change)."""
    return [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in current.items()
        if k not in resumable and saved.get(k) != v
    ]


def read_record(path: str | os.PathLike) -> dict | None:
    """A commit record, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is unreadable ({e}); delete it to start over") from e
