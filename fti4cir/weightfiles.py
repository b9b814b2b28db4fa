"""Our weight files, for any of our networks (FTI4CIR inversion, M2C): `.safetensors` with the network's config in its
metadata and as `<stem>.json` beside it, written atomically; read back with every tensor name and shape checked
against the network before anything is allocated.

Below `fti4cir.convert` (official release files) and `fti4cir.weights` (FTI4CIR weights from a file, a release or
the Hub), which both use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_json_atomic
from .errors import UserError
from .inputs import quote

CONFIG_KEY = "fti4cir_config"
MAX_CONFIG_BYTES = 1 << 20  # a weights config is ~1 kB of JSON


def config_path(weights_path: str | os.PathLike) -> Path:
    return Path(weights_path).with_suffix(".json")


def save_weights(net: torch.nn.Module, path: str | os.PathLike, config_key: str = CONFIG_KEY) -> Path:
    """Write `path` (.safetensors, the config also in its metadata under `config_key`) and the config beside it as
    `<stem>.json`. `net.config.to_dict()` is the config (any of our networks)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"Weights are saved as .safetensors, got {path.name}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return write_weights(tensors, net.config.to_dict(), path, config_key)


def write_weights(tensors: dict[str, torch.Tensor], config: dict, path: Path, config_key: str = CONFIG_KEY) -> Path:
    """`path` (.safetensors of `tensors`, `config` in its metadata under `config_key`) and `<stem>.json` beside it."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={config_key: json.dumps(config)})
    write_json_atomic(config_path(path), config)
    return path


def read_config(path: Path, config_key: str = CONFIG_KEY, what: str = "FTI4CIR") -> dict:
    """The config dict of a weights file: `<stem>.json` beside it, else its safetensors metadata (not yet checked:
    the config class's `from_dict` checks the values)."""
    side = config_path(path)
    try:
        if side.exists():
            if side.stat().st_size > MAX_CONFIG_BYTES:
                raise UserError(f"{side.name} is larger than a weights config can be ({MAX_CONFIG_BYTES >> 10} kB)")
            config = json.loads(side.read_text(encoding="utf-8"))
        else:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if config_key not in meta:
                raise UserError(f"{path.name} has no {what} config (no {side.name} beside it, none in its metadata)")
            config = json.loads(meta[config_key])
    except (ValueError, TypeError, SafetensorError, OSError, RecursionError) as e:
        raise UserError(f"{what} weights config of {path.name} is unreadable: {str(e)[:200]}") from None
    if not isinstance(config, dict):
        raise UserError(f"{what} weights config of {path.name} is not a JSON object")
    return config


def expected_shapes(network_cls, config) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of `network_cls(config)`, built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        net = network_cls(config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a safetensors file from its header alone (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"Weights file {path.name} is corrupted or truncated ({str(e)[:200]})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"Weights file {path.name} is corrupted or truncated ({str(e)[:200]})") from None


def check_state_dict(expected: dict[str, tuple[int, ...]], got: dict, source: str) -> None:
    """Raise a UserError that names every missing, unexpected and mis-shaped tensor. `got`: name -> tensor or
    shape."""
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in got.items()}
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in got]
    problems += [f"unexpected {quote(k)} {s}" for k, s in got.items() if k not in expected]
    problems += [f"{k}: file has {got[k]}, model needs {s}" for k, s in expected.items() if k in got and got[k] != s]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise UserError(f"Weights {source} do not fit the network: {shown}")


def build_network(network_cls, config, path: Path) -> torch.nn.Module:
    """`network_cls(config)` with the tensors of `path`. Every name and shape is checked against the file's header
    before anything is allocated: a config that asks for a huge network fails here unless the file holds it."""
    check_state_dict(expected_shapes(network_cls, config), header_shapes(path), path.name)
    state = read_tensors(path)
    net = network_cls(config)
    net.load_state_dict(state)
    return net
