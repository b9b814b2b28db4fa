"""Read the official FTI4CIR release file safely and convert it to our format.

The official code saves the whole module (`torch.save(img2text)`), a pickle that names the classes
`i2t_model.IMG2TEXT`, `i2t_model.Phi`, `MHTransformer.*` and torch.nn modules. Loading it with `torch.load` would import
those modules and run whatever the pickle says. Here a restricted unpickler rebuilds tensors through torch's rebuild
helpers, turns each allowed class reference into an inert placeholder that only records the state the pickle gives it
(never imported, never called), and refuses every other global.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import UserError
from .inversion import InversionConfig, InversionNetwork

# Official parameter name (regex) -> ours.
NAME_MAP = [
    (r"^phi_s\.layers\.(\d+)\.", r"subject_mapper.\1."),
    (r"^phi_a\.layers\.(\d+)\.", r"attribute_mapper.\1."),
    (r"^templates$", r"attribute_queries"),
    (r"^local_atte_fc\.0\.", r"attribute_head.0."),
    (r"^transformer\.layers\.(\d+)\.attn\.to_queries\.", r"attribute_encoder.\1.attn.q_proj."),
    (r"^transformer\.layers\.(\d+)\.attn\.to_keys_values\.", r"attribute_encoder.\1.attn.kv_proj."),
    (r"^transformer\.layers\.(\d+)\.attn\.project\.", r"attribute_encoder.\1.attn.out_proj."),
    (r"^transformer\.layers\.(\d+)\.mlp\.fc1\.", r"attribute_encoder.\1.mlp.0."),
    (r"^transformer\.layers\.(\d+)\.mlp\.fc2\.", r"attribute_encoder.\1.mlp.2."),
    (r"^transformer\.layers\.(\d+)\.(norm[12])\.", r"attribute_encoder.\1.\2."),
]
OFFICIAL_MODULES = ("i2t_model", "MHTransformer")
ALLOWED_FUNCTIONS = {("torch.nn.functional", "relu"), ("torch.nn.functional", "gelu")}
TENSOR_REBUILDERS = {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"}
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def official_to_ours(name: str) -> str | None:
    for pattern, replacement in NAME_MAP:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


class Inert:
    """Stand-in for a class named in the pickle: records constructor args and state, does nothing else."""

    def __init__(self, *args, **kwargs):
        self.__args__ = args

    def __setstate__(self, state):
        self.__state__ = state


class InertFunction:
    """Stand-in for a function referenced (not called) by the pickle, e.g. the activation `torch.nn.functional.relu`."""

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f"refusing to call {self.qualname} while unpickling")


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, bytes]):
        super().__init__(file)
        self.storages = storages
        self.inert_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        qualname = f"{module}.{name}"
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module in ("builtins", "__builtin__") and name == "set":  # protocol 2 uses the Python 2 name
            return set
        if module == "torch._utils" and name in TENSOR_REBUILDERS:
            return getattr(torch._utils, name)
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) in ALLOWED_FUNCTIONS:
            return InertFunction(qualname)
        if module in OFFICIAL_MODULES or module.startswith("torch.nn.modules."):
            if qualname not in self.inert_classes:
                self.inert_classes[qualname] = type(name, (Inert,), {"__module__": module, "qualname": qualname})
            return self.inert_classes[qualname]
        raise pickle.UnpicklingError(f"global '{qualname}' is not allowed in an FTI4CIR checkpoint")

    def persistent_load(self, saved_id):
        kind, dtype, key, _location, _numel = saved_id
        if kind != "storage" or not isinstance(dtype, torch.dtype) or key not in self.storages:
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
        data = bytearray(self.storages[key])
        untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def read_pickled_module(path: str | os.PathLike):
    """Safely unpickle a `torch.save` zip archive into inert placeholders and real tensors."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path.name} is not a torch zip checkpoint (corrupted, truncated, or the legacy format; "
                        f"re-save it with torch >= 1.6)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise UserError(f"{path.name} has no data.pkl: not a torch.save checkpoint")
            prefix = pkl[: -len("data.pkl")]
            storages = {n[len(prefix) + len("data/"):]: zf.read(n) for n in names
                        if n.startswith(prefix + "data/") and not n.endswith("/")}
            return RestrictedUnpickler(io.BytesIO(zf.read(pkl)), storages).load()
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{path.name} is corrupted or truncated: {e}") from e
    except pickle.UnpicklingError as e:
        raise UserError(f"Refusing to load {path.name}: {e}") from e


def _module_state(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """state_dict() of an inert module tree: parameters and persistent buffers, recursively."""
    state = getattr(obj, "__state__", None)
    if not isinstance(state, dict):
        return {}
    out = {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (state.get(kind) or {}).items():
            if tensor is not None and name not in non_persistent:
                out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        out.update(_module_state(child, f"{prefix}{name}."))
    return out


def official_config(root, state: dict[str, torch.Tensor], backbone=None) -> InversionConfig:
    """Dimensions from the tensors; hyper-parameters from the attributes the official module pickled."""
    attrs = root.__state__
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
    heads = 1
    transformer = attrs["_modules"]["transformer"]
    first = transformer.__state__["_modules"]["layers"].__state__["_modules"]["0"]
    heads = first.__state__["_modules"]["attn"].__state__.get("num_heads", heads)
    fc1 = state["transformer.layers.0.mlp.fc1.weight"]
    return InversionConfig(
        embed_dim=state["phi_s.layers.0.weight"].shape[1],
        token_dim=state["phi_s.layers.6.weight"].shape[0],
        patch_dim=state["templates"].shape[-1],
        num_k=int(attrs.get("num_k", state["templates"].shape[1])),
        topk=int(attrs.get("topk", 12)),
        epsilon=float(attrs.get("epsilon", 0.05)),
        tf_layers=len(layers),
        tf_heads=int(heads),
        mlp_ratio=fc1.shape[0] / fc1.shape[1],
        temperature=float(attrs.get("temperature", 0.2)),
        reg_weight=float(attrs.get("hy_regLoss", 1.4)),
        backbone=backbone.name if backbone is not None else "",
        pretrained=str(backbone.pretrained) if backbone is not None else "",
        extra={"converted_from": "official FTI4CIR release"},
    )


def read_official(path: str | os.PathLike, backbone=None) -> InversionNetwork:
    """An InversionNetwork with the weights of an official release file (a pickled `IMG2TEXT`)."""
    root = read_pickled_module(path)
    if not isinstance(root, Inert) or type(root).qualname != "i2t_model.IMG2TEXT":
        raise UserError(f"{Path(path).name} does not hold an official i2t_model.IMG2TEXT module")
    official = _module_state(root)
    try:
        config = official_config(root, official, backbone)
    except (KeyError, AttributeError, IndexError) as e:
        raise UserError(f"{Path(path).name}: official module structure not recognised (missing {e})") from e
    state, unknown = {}, []
    for name, tensor in official.items():
        ours = official_to_ours(name)
        (unknown.append(name) if ours is None else state.__setitem__(ours, tensor))
    if unknown:
        raise UserError(f"{Path(path).name}: unrecognised parameters {unknown[:5]}")
    net = InversionNetwork(config)
    from .weights import check_state_dict

    check_state_dict(net, state, Path(path).name)
    net.load_state_dict(state)
    return net


def convert_official(src: str | os.PathLike, dst: str | os.PathLike, backbone_name: str = "ViT-L-14",
                     pretrained: str = "openai") -> Path:
    """Convert an official release file to our .safetensors + .json (no backbone needs to be loaded)."""
    from .weights import save_weights

    net = read_official(src)
    net.config.backbone, net.config.pretrained = backbone_name, pretrained
    return save_weights(net, dst)
