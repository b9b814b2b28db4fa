"""Read the official FTI4CIR release file safely and convert it to our format.

The official code saves the whole module (`torch.save(img2text)`), a pickle that names the classes
`i2t_model.IMG2TEXT`, `i2t_model.Phi`, `MHTransformer.*` and torch.nn modules. Loading it with `torch.load` would import
those modules and run whatever the pickle says. Here a restricted unpickler checks every step of the pickle:

- globals: torch's tensor rebuild helpers, storage types, `OrderedDict`, `set` and two activation functions are
  allowed; each allowed class reference becomes an inert placeholder (never imported, never called); every other
  global is refused;
- opcodes: only those a `torch.save` of a module uses (no INST/OBJ, no extension registry, no out-of-band buffers);
- structure: objects are created only by an allowed call with arguments of the expected types (tensors: a storage,
  whole-number sizes and strides inside the storage, no backward hooks, no attributes set on parameters);
  state is set (BUILD) only on placeholders, once, from a dict with string keys; dict keys and set members are
  strings or numbers; MARK nesting is bounded; the module tree is walked without recursion and a cycle is refused;
- sizes: the pickle itself at most `MAX_PICKLE_BYTES`; a storage member is read from the archive only when the pickle
  refers to it, after its declared size has been checked against the element count the pickle gives and against
  a budget for all storages together (`max_bytes`, `MAX_RELEASE_BYTES` by default).

Every failure is a UserError with a short message.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import UserError
from .inputs import quote
from .inversion import InversionConfig, InversionNetwork
from .weightfiles import check_state_dict, expected_shapes, save_weights

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
TENSOR_REBUILDERS = ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
MAX_PICKLE_BYTES = 16 * 2**20  # the official data.pkl is ~20 kB: it holds structure, the tensors are members
MAX_RELEASE_BYTES = 2**30  # all storages together; the ViT-L/14 release holds ~220 MB of float32
MAX_MARK_DEPTH = 64  # nesting of tuples/lists/dicts built with MARK (a module pickle nests < 10)
MAX_MODULE_DEPTH = 32  # module tree depth (official: IMG2TEXT > transformer > layers > 0 > attn)
MAX_TENSOR_DIMS = 8
_KEY_TYPES = (str, int, float, bool, type(None))  # what may key a dict or be a set member
_ALLOWED_OPCODES = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT "
    "BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 EMPTY_TUPLE TUPLE "
    "TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS "
    "FROZENSET GLOBAL STACK_GLOBAL REDUCE NEWOBJ BUILD PERSID BINPERSID PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET "
    "LONG_BINGET".split()
)


class ReleaseFileError(pickle.UnpicklingError):
    """The pickle is well-formed but not what a release file may contain."""


def official_to_ours(name: str) -> str | None:
    for pattern, replacement in NAME_MAP:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


class Inert:
    """Stand-in for a class named in the pickle: records its pickled state (a dict with string keys), nothing else.

    The unpickler creates it without arguments (NEWOBJ) and sets the state once (BUILD); it never calls it."""

    qualname = ""

    def __init__(self):
        self.__state__ = None


class InertFunction:
    """Stand-in for a function referenced (not called) by the pickle, e.g. the activation `torch.nn.functional.relu`."""

    def __init__(self, qualname: str):
        self.qualname = qualname


class _Storage:
    """A storage the pickle referred to: its elements as a flat tensor (read from the archive on first reference)."""

    def __init__(self, data: torch.Tensor):
        self.data = data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opcode_table() -> dict:
    """pickle's pure-Python dispatch table restricted to _ALLOWED_OPCODES; the others raise ReleaseFileError."""
    table = {}
    names = {op.code.encode("latin-1")[0]: op.name for op in __import__("pickletools").opcodes}
    for code, handler in pickle._Unpickler.dispatch.items():
        table[code] = handler if names.get(code) in _ALLOWED_OPCODES else _refused_opcode(names.get(code, "?"))
    return table


def _refused_opcode(name: str):
    def refuse(self):
        raise ReleaseFileError(f"pickle opcode {name} is not used by torch.save and is refused")

    return refuse


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be checked one by one
    dispatch = _opcode_table()

    def __init__(self, file, read_storage):
        """`read_storage(key, dtype, numel) -> torch.Tensor`: the storage member `key` (called once per key)."""
        super().__init__(file)
        self.read_storage = read_storage
        self.storages: dict[str, _Storage] = {}
        self.inert_classes: dict[str, type] = {}
        self.calls = {OrderedDict: self._ordered_dict, set: self._set, frozenset: self._set}
        self.calls.update({getattr(torch._utils, name): getattr(self, name) for name in TENSOR_REBUILDERS})

    # ---- globals ----------------------------------------------------------------------------------------------
    def find_class(self, module: str, name: str):
        qualname = f"{module}.{name}"
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):  # protocol 2: Python 2 names
            return {"set": set, "frozenset": frozenset}[name]
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
        raise ReleaseFileError(f"global {quote(qualname, 80)} is not allowed in an FTI4CIR checkpoint")

    # ---- opcodes that create or change objects -----------------------------------------------------------------
    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        try:
            call = self.calls.get(func)
        except TypeError:  # an unhashable "function"
            call = None
        if call is None:
            raise ReleaseFileError(f"calling {_kind(func)} is not allowed in an FTI4CIR checkpoint")
        if not isinstance(args, tuple):
            raise ReleaseFileError("call arguments must be a tuple")
        self.stack[-1] = call(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, Inert)) or args != ():
            raise ReleaseFileError(f"creating {_kind(cls)} is not allowed in an FTI4CIR checkpoint")
        self.append(cls())

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, Inert):
            raise ReleaseFileError(f"setting the state of {_kind(target)} is not allowed (only of modules)")
        if target.__state__ is not None:
            raise ReleaseFileError(f"the state of {type(target).qualname} is set twice")
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ReleaseFileError(f"the state of {type(target).qualname} is {_kind(state)}, not a dict of names")
        target.__state__ = state

    dispatch[pickle.BUILD[0]] = load_build

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._set_items(self.stack[-1], [key, value])

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        self._set_items(self.stack[-1], items)

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items = self.pop_mark()
        target = {}
        self._set_items(target, items)
        self.append(target)

    dispatch[pickle.DICT[0]] = load_dict

    def _set_items(self, target, items: list) -> None:
        if not isinstance(target, dict):
            raise ReleaseFileError(f"setting items of {_kind(target)} is not allowed")
        for key in items[::2]:
            _check_key(key)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_append(self):
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self._extend(self.stack[-1], items)

    dispatch[pickle.APPENDS[0]] = load_appends

    def _extend(self, target, items: list) -> None:
        if type(target) is not list:
            raise ReleaseFileError(f"appending to {_kind(target)} is not allowed")
        target.extend(items)

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise ReleaseFileError(f"adding set members to {_kind(target)} is not allowed")
        target.update(self._set(items))

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        self.append(frozenset(self._set(self.pop_mark())))

    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_mark(self):
        if len(self.metastack) >= MAX_MARK_DEPTH:
            raise ReleaseFileError(f"structures nest deeper than {MAX_MARK_DEPTH} levels")
        super().load_mark()

    dispatch[pickle.MARK[0]] = load_mark

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise ReleaseFileError("a persistent id that is not a tensor storage")
        _, dtype, key, _location, numel = saved_id
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise ReleaseFileError("a malformed tensor storage reference")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(self.read_storage(key, dtype, numel))
        elif storage.data.dtype != dtype or storage.data.numel() != numel:
            raise ReleaseFileError(f"storage {quote(key)} is referred to with two different types or sizes")
        return storage

    # ---- the allowed calls ------------------------------------------------------------------------------------
    @staticmethod
    def _ordered_dict(*args):
        if args:
            raise ReleaseFileError("OrderedDict is built empty in a checkpoint (its items follow)")
        return OrderedDict()

    @staticmethod
    def _set(items=(), *rest):
        if rest or not isinstance(items, (list, tuple)):
            raise ReleaseFileError("a set is built from one list of members")
        for item in items:
            _check_key(item)
        return set(items)

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad, hooks, metadata=None):
        if not isinstance(storage, _Storage):
            raise ReleaseFileError(f"a tensor's storage is {_kind(storage)}")
        if not (
            isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride) <= MAX_TENSOR_DIMS
            and all(_is_int(v) and v >= 0 for v in size + stride)
            and _is_int(offset)
            and offset >= 0
        ):
            raise ReleaseFileError("a tensor with a malformed size, stride or offset")
        if not isinstance(requires_grad, bool) or not _empty(hooks) or not _empty(metadata):
            raise ReleaseFileError("a tensor with backward hooks or extra metadata")
        numel = storage.data.numel()
        if math.prod(size) > numel:  # e.g. stride 0: a huge view of one element, a bomb once copied
            raise ReleaseFileError(f"a tensor of size {list(size)[:8]} has more elements than its storage ({numel})")
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if math.prod(size) else 0
        if extent > numel:
            raise ReleaseFileError(f"a tensor of size {list(size)} runs past the end of its storage ({numel})")
        return torch.as_strided(storage.data, size, stride, offset)

    @staticmethod
    def _rebuild_parameter(data, requires_grad, hooks):
        if not isinstance(data, torch.Tensor) or not isinstance(requires_grad, bool) or not _empty(hooks):
            raise ReleaseFileError("a parameter that is not a plain tensor")
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, hooks, state):
        if not (_empty(state) or (isinstance(state, tuple) and all(_empty(s) for s in state))):
            raise ReleaseFileError("a parameter with attributes set on it")
        return self._rebuild_parameter(data, requires_grad, hooks)


def _empty(value) -> bool:
    """None or an empty dict: hooks, tensor metadata and parameter state a checkpoint may carry."""
    return value is None or (isinstance(value, dict) and not value)


def _check_key(key) -> None:
    if not isinstance(key, _KEY_TYPES):
        raise ReleaseFileError(f"a dict key or set member of type {type(key).__name__}")


def _kind(obj) -> str:
    """A short name for what the pickle tried to use (never its repr, which may be huge)."""
    if isinstance(obj, InertFunction):
        return obj.qualname
    if isinstance(obj, type):
        return getattr(obj, "qualname", "") or obj.__qualname__
    if isinstance(obj, Inert):
        return f"a {type(obj).qualname}"
    return f"a {type(obj).__name__}"


def _storage_reader(zf: zipfile.ZipFile, prefix: str, name: str, max_bytes: int):
    """read_storage for RestrictedUnpickler: one archive member, checked against its size and the budget first."""
    budget = [max_bytes]

    def read(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        member = f"{prefix}data/{key}"
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ReleaseFileError(f"storage {quote(key)} is missing from the archive") from None
        expected = numel * dtype.itemsize
        if info.file_size != expected:
            raise ReleaseFileError(f"storage {quote(key)} has {info.file_size} bytes, its tensor needs {expected}")
        if expected > budget[0]:
            raise ReleaseFileError(
                f"the tensors of {name} hold more than {max_bytes / 2**20:.0f} MB, the limit for a release file"
            )
        budget[0] -= expected
        if not expected:
            return torch.empty(0, dtype=dtype)
        with zf.open(info) as f:
            data = bytearray(f.read(expected + 1))  # never more than the member declares (a bomb stops here)
        if len(data) != expected:
            raise ReleaseFileError(f"storage {quote(key)} is truncated")
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype)

    return read


def read_pickled_module(path: str | os.PathLike, max_bytes: int = MAX_RELEASE_BYTES):
    """Safely unpickle a `torch.save` zip archive into inert placeholders and real tensors (UserError otherwise)."""
    path = Path(path)
    name = quote(path.name, 60)
    if not path.is_file():
        raise UserError(f"Release file {name} was not found" if not path.exists() else f"{name} is not a file")
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise UserError(f"{name} has no data.pkl: not a torch.save checkpoint")
            if zf.getinfo(pkl).file_size > MAX_PICKLE_BYTES:
                raise UserError(f"{name}: its data.pkl is larger than a release file's ({MAX_PICKLE_BYTES >> 20} MB)")
            with zf.open(pkl) as f:
                data = f.read(MAX_PICKLE_BYTES + 1)
            reader = _storage_reader(zf, pkl[: -len("data.pkl")], name, max_bytes)
            return RestrictedUnpickler(io.BytesIO(data), reader).load()
    except UserError:
        raise
    except zipfile.BadZipFile:
        raise UserError(
            f"{name} is not a torch zip checkpoint (corrupted, truncated, or the legacy format; "
            "re-save it with torch >= 1.6)"
        ) from None
    except ReleaseFileError as e:
        raise UserError(f"Refusing to load {name}: {e}") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"{name} is corrupted or truncated: {str(e)[:100]}") from None
    except RecursionError:
        raise UserError(f"Refusing to load {name}: its structure nests too deeply") from None
    except (
        OSError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        RuntimeError,
        OverflowError,
        MemoryError,
        zipfile.LargeZipFile,
    ) as e:  # a malformed archive or pickle
        raise UserError(f"{name} is corrupted or malformed ({type(e).__name__} while reading it)") from None


def _module_state(root: Inert) -> dict[str, torch.Tensor]:
    """state_dict() of an inert module tree: parameters and persistent buffers, walked without recursion.

    Every level is checked: a module's state is a dict, its `_parameters` / `_buffers` map names to tensors (or
    None), its `_modules` map names to modules (or None); a module met twice (a cycle, or one module under two
    names) and trees deeper than MAX_MODULE_DEPTH are refused."""
    out, seen = {}, set()
    todo = [(root, "", 0)]
    while todo:
        module, prefix, depth = todo.pop()
        where = prefix.rstrip(".") or "the root module"
        if id(module) in seen:
            raise UserError(f"module {quote(where)} appears twice in the module tree (a cycle or a shared module)")
        if depth > MAX_MODULE_DEPTH:
            raise UserError(f"the module tree is deeper than {MAX_MODULE_DEPTH} levels")
        seen.add(id(module))
        state = module.__state__
        if not isinstance(state, dict):
            raise UserError(f"module {quote(where)} has no pickled state")
        non_persistent = state.get("_non_persistent_buffers_set") or set()
        if not isinstance(non_persistent, set):
            raise UserError(f"module {quote(where)}: _non_persistent_buffers_set is {_kind(non_persistent)}")
        for kind in ("_parameters", "_buffers"):
            for name, tensor in _names_to(state.get(kind) or {}, torch.Tensor, f"{where}.{kind}"):
                if tensor is not None and name not in non_persistent:
                    out[prefix + name] = tensor.detach()
        children = _names_to(state.get("_modules") or {}, Inert, f"{where}._modules")
        todo.extend((child, f"{prefix}{name}.", depth + 1) for name, child in reversed(children) if child is not None)
    return out


def _names_to(mapping, value_type: type, where: str) -> list[tuple[str, object]]:
    """The (name, value) items of a module's dict attribute, checked: string names, values of one type or None."""
    if not isinstance(mapping, dict):
        raise UserError(f"{quote(where)} is {_kind(mapping)}, not a dict")
    for name, value in mapping.items():
        if not isinstance(name, str) or not (value is None or isinstance(value, value_type)):
            raise UserError(f"{quote(where)} holds {_kind(value)} under {quote(name)}")
    return list(mapping.items())


def _child(module, *path: str) -> Inert:
    """The submodule at `path` below `module` (through `_modules`), or a UserError naming what is missing."""
    for name in path:
        children = module.__state__.get("_modules") if isinstance(module.__state__, dict) else None
        module = children.get(name) if isinstance(children, dict) else None
        if not isinstance(module, Inert):
            raise UserError(f"the official module has no submodule {quote('.'.join(path))}")
    return module


def _number(attrs: dict, key: str, default, kind: type):
    """A hyper-parameter the official module pickled as an attribute (the default when absent)."""
    value = attrs.get(key, default)
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value == int(value))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not whole):
        raise UserError(f"the official module's {key} is {_kind(value)} {quote(value, 20)}, not a {kind.__name__}")
    return kind(value)


def official_config(root, state: dict[str, torch.Tensor], backbone=None) -> InversionConfig:
    """Dimensions from the tensors; hyper-parameters from the attributes the official module pickled."""
    attrs = root.__state__
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
    attention = _child(root, "transformer", "layers", "0", "attn").__state__
    needed = ("phi_s.layers.0.weight", "phi_s.layers.6.weight", "templates", "transformer.layers.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in state]
    shapes = {k: tuple(state[k].shape) for k in needed if k in state}
    if missing or [len(shapes[k]) for k in needed] != [2, 2, 3, 2]:
        raise UserError(f"the official module lacks or mis-shapes {', '.join(missing) or 'its weights'}")
    fc1 = shapes["transformer.layers.0.mlp.fc1.weight"]
    return InversionConfig.from_dict(
        dict(
            embed_dim=shapes["phi_s.layers.0.weight"][1],
            token_dim=shapes["phi_s.layers.6.weight"][0],
            patch_dim=shapes["templates"][-1],
            num_k=_number(attrs, "num_k", shapes["templates"][1], int),
            topk=_number(attrs, "topk", 12, int),
            epsilon=_number(attrs, "epsilon", 0.05, float),
            tf_layers=len(layers),
            tf_heads=_number(attention if isinstance(attention, dict) else {}, "num_heads", 1, int),
            mlp_ratio=fc1[0] / fc1[1] if fc1[1] else float("nan"),
            temperature=_number(attrs, "temperature", 0.2, float),
            reg_weight=_number(attrs, "hy_regLoss", 1.4, float),
            backbone=backbone.name if backbone is not None else "",
            pretrained=str(backbone.pretrained) if backbone is not None else "",
            extra={"converted_from": "official FTI4CIR release"},
        )
    )


def read_official(path: str | os.PathLike, backbone=None, max_bytes: int = MAX_RELEASE_BYTES) -> InversionNetwork:
    """An InversionNetwork with the weights of an official release file (a pickled `IMG2TEXT`)."""
    name = quote(Path(path).name, 60)
    root = read_pickled_module(path, max_bytes)
    if not isinstance(root, Inert) or type(root).qualname != "i2t_model.IMG2TEXT":
        raise UserError(f"{name} does not hold an official i2t_model.IMG2TEXT module")
    try:
        official = _module_state(root)
        config = official_config(root, official, backbone)
    except UserError as e:
        raise UserError(f"{name}: official module structure not recognised ({e})") from None
    except ValueError as e:  # the config's checks
        raise UserError(f"{name}: the official module's settings are invalid ({e})") from None
    state, unknown = {}, []
    for key, tensor in official.items():
        ours = official_to_ours(key)
        (unknown.append(key) if ours is None else state.__setitem__(ours, tensor))
    if unknown:
        raise UserError(f"{name}: unrecognised parameters {', '.join(quote(k) for k in unknown[:5])}")
    check_state_dict(expected_shapes(InversionNetwork, config), state, name)
    net = InversionNetwork(config)
    net.load_state_dict(state)
    return net


def convert_official(
    src: str | os.PathLike, dst: str | os.PathLike, backbone_name: str = "ViT-L-14", pretrained: str = "openai"
) -> Path:
    """Convert an official release file to our .safetensors + .json (no backbone needs to be loaded)."""
    net = read_official(src)
    net.config.backbone, net.config.pretrained = backbone_name, pretrained
    return save_weights(net, dst)
