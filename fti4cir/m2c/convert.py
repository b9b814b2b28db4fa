"""An official M2C checkpoint (LiJiaBei-7/TSCIR, src/main.py) read safely, renamed onto ours (`fti4cir convert-m2c`).

The official checkpoint is a `torch.save` of a dict: `epoch`, `name`, `args` (the argparse Namespace of the run),
`state_dict` (the frozen CLIP, not needed: the backbone comes from open_clip), `state_dict_img2text` (Phi, the patch
projection and the VSI modules, as `IM2TEXT`), `state_dict_lora` (stage II: the composing adapters, as `LoRA`) and
`optimizer`; keys carry DistributedDataParallel's `module.` prefix. It is unpickled by a restricted unpickler that
rebuilds tensors, plain containers and the Namespace only: every other global is refused before anything of it is
imported or run (the same policy as `fti4cir.convert` for the FTI4CIR release, with the Namespace allowed and no
module classes). Reading needs memory for the whole file (CLIP's tensors included: ~1 GB for ViT-L/14 in fp16).
The 188 tensors of a stage-II checkpoint (176 + 12) map one to one onto ours, shapes unchanged.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from ..convert import STORAGE_DTYPES, TENSOR_REBUILDERS
from ..errors import UserError
from .model import DEFAULT_ADAPTER_LAYERS, DEFAULT_VSI_LAYERS, M2CConfig, M2CNetwork, save_m2c_weights

# Our parameter names -> the official ones (IM2TEXT without `module.`; the adapters as in LoRA).
_MLP = {"query_in": "hid_1", "patch_in": "hid_2", "position_in": "hid_3", "out": "rehid"}
_CROSS = {"attention": "multihead_attn", "ffn.0": "linear1", "ffn.3": "linear2", "norm": "norm2"}
_OURS_TO_OFFICIAL = [
    (r"^mapper\.hidden\.([03])\.", lambda m: f"layers.layers.{int(m[1]) // 3}.0."),
    (r"^mapper\.out\.", lambda m: "fc_out."),
    (r"^patch_proj\.", lambda m: "fc_out_hidden."),
    (r"^vsi\.(\d+)\.conv\.", lambda m: f"adapters.{m[1]}.conv."),
    (
        r"^vsi\.(\d+)\.(query_in|patch_in|position_in|out)\.([03])\.",
        lambda m: f"adapters.{m[1]}.{_MLP[m[2]]}.layers.{int(m[3]) // 3}.0.",
    ),
    (
        r"^vsi\.(\d+)\.layers\.(\d+)\.(attention|ffn\.0|ffn\.3|norm)\.",
        lambda m: f"adapters.{m[1]}.ca.layers.{m[2]}.{_CROSS[m[3]]}.",
    ),
    (r"^adapters\.(\d+)\.down$", lambda m: f"lora_layers.{m[1]}.A"),
    (r"^adapters\.(\d+)\.up$", lambda m: f"lora_layers.{m[1]}.B"),
]


def official_name(ours: str) -> str:
    """The official name of one of our M2CNetwork state keys (adapters: the name inside `LoRA`)."""
    for pattern, replace in _OURS_TO_OFFICIAL:
        m = re.match(pattern, ours)
        if m:
            return replace(m) + ours[m.end() :]
    raise KeyError(f"no official name for {ours}")


class CheckpointUnpickler(pickle.Unpickler):
    """Tensors, plain containers and the run's argparse Namespace; every other global is refused (nothing of it
    is imported or called). Storages are read from the archive when the pickle refers to them."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace  # rebuilt by NEWOBJ + BUILD: an attribute bag, nothing runs
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in TENSOR_REBUILDERS:
            return getattr(torch._utils, name)
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in an M2C checkpoint")

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise pickle.UnpicklingError("a persistent id that is not a tensor storage")
        _, dtype, key, _location, numel = saved_id
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError("a malformed tensor storage reference")
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}{key}"))
            if len(data) != numel * dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"storage {key} has {len(data)} bytes, its tensor needs {numel * dtype.itemsize}"
                )
            untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.storages[key]


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Safely unpickle a `torch.save` zip archive holding tensors, containers and an argparse Namespace."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Official M2C checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path.name} is not a torch zip checkpoint (corrupted, truncated, or the legacy format; "
            f"re-save it with torch >= 1.6)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise UserError(f"{path.name} has no data.pkl: not a torch.save checkpoint")
            result = CheckpointUnpickler(io.BytesIO(zf.read(pkl)), zf, pkl[: -len("data.pkl")] + "data/").load()
    except pickle.UnpicklingError as e:
        raise UserError(f"Refusing to load {path.name}: {e}") from None
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise UserError(f"{path.name} is corrupted or malformed ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(result, dict) or "state_dict_img2text" not in result:
        raise UserError(f"{path.name} is not an official M2C checkpoint (no state_dict_img2text)")
    return result


def _strip_module(state) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("an official state dict must map names to tensors")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def _backbone_dims(backbone: str) -> tuple[int, int, int, tuple[int, int]]:
    """(embed dim, text width, text blocks, patch grid) of an open_clip config, without building the model."""
    import open_clip

    from .. import backbone as _registers_tiny_config  # noqa: F401

    config = open_clip.get_model_config(backbone)
    if config is None:
        raise UserError(f"Unknown backbone {backbone!r} (an open_clip model name, e.g. ViT-L-14)")
    vision, text = config["vision_cfg"], config["text_cfg"]
    size, patch = vision["image_size"], vision["patch_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return config["embed_dim"], text["width"], text["layers"], (size[0] // patch, size[1] // patch)


def official_network(
    checkpoint: dict, backbone: str = "ViT-L-14", pretrained: str = "openai", source: str = "checkpoint"
) -> M2CNetwork:
    """Our M2CNetwork holding the tensors of an official checkpoint dict (`read_checkpoint`)."""
    args = checkpoint.get("args")
    if args is not None and not isinstance(args, argparse.Namespace):
        raise UserError(f"{source}: `args` is not an argparse Namespace")
    img2text = _strip_module(checkpoint["state_dict_img2text"])
    lora = _strip_module(checkpoint["state_dict_lora"]) if checkpoint.get("state_dict_lora") else {}
    embed_dim, width, depth, grid = _backbone_dims(backbone)
    try:
        first = img2text["layers.layers.0.0.weight"]
        vsi_dim = (
            img2text["adapters.0.hid_1.layers.0.0.weight"].shape[0]
            if "adapters.0.hid_1.layers.0.0.weight" in img2text
            else 128
        )
        config = M2CConfig(
            embed_dim=first.shape[1],
            token_dim=img2text["fc_out.weight"].shape[0],
            text_layers=depth,
            grid=grid,
            middle_dim=first.shape[0],
            vsi_dim=vsi_dim,
            vsi_layers=tuple(getattr(args, "va_layers", DEFAULT_VSI_LAYERS)),
            adapter_layers=tuple(getattr(args, "ca_layers", DEFAULT_ADAPTER_LAYERS)) if lora else (),
            adapter_rank=lora["lora_layers.0.A"].shape[1] if lora else 128,
            backbone=backbone,
            pretrained=str(pretrained),
            extra={
                "converted_from": "official M2C checkpoint (LiJiaBei-7/TSCIR)",
                "epoch": checkpoint.get("epoch") if isinstance(checkpoint.get("epoch"), int) else None,
            },
        )
    except KeyError as e:
        raise UserError(f"{source}: official M2C structure not recognised (missing {e})") from e
    if (config.embed_dim, config.token_dim) != (embed_dim, width):
        raise UserError(
            f"{source} was trained for embed dim {config.embed_dim} / text width {config.token_dim}, "
            f"not for {backbone} ({embed_dim} / {width}); pass the matching --backbone"
        )
    net = M2CNetwork(config)
    official = {**img2text, **lora}
    expected = {official_name(k): k for k in net.state_dict()}
    missing = sorted(set(expected) - set(official))
    unexpected = sorted(set(official) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source}: tensors do not match the official M2C layout for {len(config.vsi_layers)} VSI "
            f"and {len(config.adapter_layers)} adapter layers (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]})"
        )
    state = net.state_dict()
    for name, ours in expected.items():
        if official[name].shape != state[ours].shape:
            raise UserError(
                f"{source}: {name} has shape {tuple(official[name].shape)}, expected {tuple(state[ours].shape)}"
            )
    net.load_state_dict({ours: official[name].to(state[ours].dtype) for name, ours in expected.items()})
    return net.eval()


def convert_official_m2c(
    src: str | os.PathLike, dst: str | os.PathLike, backbone: str = "ViT-L-14", pretrained: str = "openai"
) -> Path:
    """Official M2C checkpoint (.pt) -> our .safetensors + .json; returns the weights path."""
    if not str(dst).endswith(".safetensors"):
        raise UserError(f"the output must be a .safetensors file, got {dst}")
    return save_m2c_weights(official_network(read_checkpoint(src), backbone, pretrained, Path(src).name), dst)
