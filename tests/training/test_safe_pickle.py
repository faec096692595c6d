"""Unpickling data files: CIFAR-10 batches of every writer load, anything that names other code is refused
before it runs."""
import io
import os
import pickle
import pickletools
import struct

import numpy as np
import pytest

from data_writers import write_cifar10
from revglow.errors import RevglowError
from revglow.training.safe_pickle import ALLOWED_GLOBALS, UnsafePickleError, safe_load, safe_loads


class _Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's cPickle wrote its str, a (SHORT_)BINSTRING: the CIFAR-10 batches'
    format (protocol 2, numpy arrays as numpy.core.multiarray._reconstruct)."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _python2_batch(data, labels):
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump({"batch_label": "training batch 1 of 5", "labels": labels,
                                              "data": data, "filenames": ["a.png", "b.png"]})
    # numpy 1.x (as CIFAR's own files) names the module numpy.core; this numpy writes numpy._core
    return buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _globals(data):
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_a_written_cifar_batch_loads_as_pickle_loads_it(tmp_path):
    folder = write_cifar10(tmp_path / "cifar", per_batch=4)
    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "rb") as handle:
            expected = pickle.load(handle, encoding="bytes")
        got = safe_load(folder / name, encoding="bytes")
        assert got.keys() == expected.keys() and got[b"labels"] == expected[b"labels"]
        assert got[b"data"].dtype == np.uint8 and np.array_equal(got[b"data"], expected[b"data"])


@pytest.mark.parametrize("encoding", ["bytes", "latin1"])
def test_a_python2_batch_loads_with_either_encoding(encoding):
    data = np.random.default_rng(0).integers(0, 256, (2, 3072), dtype=np.uint8)
    raw = _python2_batch(data, [3, 7])
    assert _globals(raw) == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    batch = safe_loads(raw, encoding=encoding)
    key = (lambda k: k.encode()) if encoding == "bytes" else (lambda k: k)
    assert np.array_equal(batch[key("data")], data) and batch[key("labels")] == [3, 7]
    assert batch[key("filenames")] == [key("a.png"), key("b.png")]


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_arrays_and_scalars_load_at_every_protocol(protocol):
    value = {"uint8": np.arange(12, dtype=np.uint8).reshape(3, 4), "fortran": np.asfortranarray(np.ones((2, 3))),
             "scalar": np.int64(-3), "float": np.float32(0.5), "mixed": (1, 2.5, True, None, b"x", "y", [1])}
    got = safe_loads(pickle.dumps(value, protocol=protocol))
    assert got.keys() == value.keys() and got["mixed"] == value["mixed"]
    for name in ("uint8", "fortran"):
        assert got[name].dtype == value[name].dtype and np.array_equal(got[name], value[name])
    assert got["fortran"].flags.f_contiguous
    assert type(got["scalar"]) is np.int64 and got["scalar"] == -3 and got["float"] == np.float32(0.5)


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _WritesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class _ExecsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload, refused", [(_RunsShell, "posix.system"), (_WritesFile, "io.open"),
                                              (_ExecsCode, "__builtin__.exec")])   # protocol 2 names builtins so
def test_a_crafted_batch_is_refused_before_it_runs(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [payload(marker)]}   # hidden inside the dict
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UnsafePickleError) as caught:
        safe_load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: refused to unpickle {refused}") and "\n" not in message
    assert isinstance(caught.value, RevglowError) and isinstance(caught.value, ValueError)
    assert not marker.exists()
    assert os.listdir(tmp_path) == ["data_batch_1"]


@pytest.mark.parametrize("module, name", [("numpy", "load"), ("numpy.core.multiarray", "frombuffer"),
                                          ("numpy.ctypeslib", "load_library"), ("builtins", "getattr"),
                                          ("copyreg", "_reconstructor"), ("collections", "OrderedDict"),
                                          ("numpy", "_reconstruct"), ("numpy.core", "multiarray")])
def test_only_the_listed_globals_resolve(module, name):
    raw = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."
    with pytest.raises(UnsafePickleError, match="refused to unpickle"):
        safe_loads(raw)
    assert (module, name) not in ALLOWED_GLOBALS


def test_codecs_encode_is_admitted_for_latin1_only():
    assert safe_loads(pickle.dumps(b"\x00\xff", protocol=2)) == b"\x00\xff"          # _codecs.encode(.., latin1)
    # _codecs.encode("a", "hex_codec")
    crafted = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x09\x00\x00\x00hex_codec\x86R."
    with pytest.raises(pickle.UnpicklingError, match="latin1"):
        safe_loads(crafted)


def test_persistent_ids_are_refused():
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_loads(b"\x80\x02X\x01\x00\x00\x00aQ.")
