"""The restricted unpickler: plain data in, code refused before it runs."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess

import numpy as np
import pytest

from instalign.data.safe_pickle import PickleReadError, UnsafePickleError, safe_load, safe_loads

PLAIN = [
    {"ref_id": 0, "ann_id": [1, 2], "split": "train", "sentences": [{"raw": "the dog", "sent_id": 3}],
     "score": 0.5, "flag": True, "none": None, "big": 2**70, "neg": -7, "tags": {"a", "b"},
     "frozen": frozenset({1}), "pair": (1, "x"), "blob": b"\x00\xffbytes"},
]


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_round_trips_at_every_protocol(protocol):
    assert safe_loads(pickle.dumps(PLAIN, protocol=protocol)) == PLAIN


def _short_binstring(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b


def _python2_pickle(text: bytes) -> bytes:
    """What Python 2's cPickle (protocol 2) writes for ``[{'raw': text, 'ids': set([1, 2]), 'n': 5L}]``."""
    return b"".join([
        b"\x80\x02]q\x00(}q\x01(",
        _short_binstring(b"raw"), _short_binstring(text),
        _short_binstring(b"ids"), b"c__builtin__\nset\nq\x02]q\x03(K\x01K\x02e\x85Rq\x04",
        _short_binstring(b"n"), b"\x8a\x01\x05",  # LONG1: a Python 2 long
        b"ue.",
    ])


def test_python2_strings_sets_and_longs():
    out = safe_loads(_python2_pickle("café".encode("utf-8")))
    assert out == [{"raw": "café", "ids": {1, 2}, "n": 5}]
    assert all(isinstance(k, str) for k in out[0])


def test_python2_non_utf8_strings_fall_back_to_latin1(caplog):
    with caplog.at_level(logging.WARNING, logger="instalign.data.safe_pickle"):
        out = safe_loads(_python2_pickle(b"caf\xe9"), source="old.p")
    assert out[0]["raw"] == "café"
    assert "old.p" in caplog.text and "Latin-1" in caplog.text


def test_numpy_scalars_become_python_scalars():
    data = pickle.dumps({"ann_id": np.int64(7), "w": np.float32(0.5), "ok": np.bool_(True)}, protocol=2)
    out = safe_loads(data)
    assert out == {"ann_id": 7, "w": 0.5, "ok": True}
    assert type(out["ann_id"]) is int and type(out["w"]) is float


class _Reduce:
    """Pickles as ``func(*args)``: what a hostile file looks like."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def test_hostile_pickle_is_refused_and_does_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "refs(final).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1}, _Reduce(os.system, (f"touch {marker}",))], protocol=2))
    with pytest.raises(UnsafePickleError) as info:
        safe_load(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "system" in message and "nothing in the file was executed" in message
    assert not marker.exists()
    # The same file through plain pickle really is hostile (proves the test can fail).
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("payload, refused", [
    # Protocol 2 writes Python 2 module names (__builtin__, commands): match the name only.
    (_Reduce(eval, ("1 + 1",)), r"builtin\w*\.eval'"),
    (_Reduce(exec, ("x = 1",)), r"builtin\w*\.exec'"),
    (_Reduce(getattr, ("abc", "upper")), r"builtin\w*\.getattr'"),
    (_Reduce(open, ("/etc/passwd",)), r"io\.open'"),
    (_Reduce(subprocess.Popen, (["true"],)), r"\.Popen'"),
    (np.array([1, 2, 3]), "numpy"),  # arrays (possibly of objects) are not plain data
    (np.array([None], dtype=object), "numpy"),
    (logging.getLogger("x"), "logging"),
])
def test_every_other_global_is_refused(payload, refused):
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        with pytest.raises(UnsafePickleError, match=f"refused.*{refused}"):
            safe_loads(pickle.dumps([payload], protocol=protocol), source="x.p")


def test_allowed_globals_cannot_be_abused():
    # _codecs.encode is admitted for bytes-at-protocol-2 only: (str, 'latin1').
    import _codecs
    with pytest.raises(UnsafePickleError, match="x.p: .*only \\(str, 'latin1'\\)"):
        safe_loads(pickle.dumps(_Reduce(_codecs.encode, ("abc", "rot13")), protocol=2), source="x.p")
    # numpy.dtype is admitted for numeric scalars only.
    with pytest.raises(UnsafePickleError, match="only bool/int/uint/float"):
        safe_loads(pickle.dumps(np.str_("abc"), protocol=2))


def test_unreadable_pickles_name_the_file(tmp_path):
    path = tmp_path / "refs(unc).p"
    good = pickle.dumps(PLAIN, protocol=2)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(PickleReadError, match=r"refs\(unc\)\.p: not a readable pickle"):
        safe_load(path)
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(PickleReadError, match=r"refs\(unc\)\.p: not a readable pickle"):
        safe_load(path)


@pytest.mark.parametrize("payload", [b"X\x01\x00\x00\x00\x80.",  # BINUNICODE: always UTF-8
                                     b"\x80\x04\x8c\x01\x80.",  # SHORT_BINUNICODE
                                     b"cos\xe3\nsystem\n."])  # a module name
def test_text_that_no_encoding_reads_is_a_clean_refusal(payload):
    # found by the fuzz tests: both passes raised UnicodeDecodeError and an AssertionError escaped
    with pytest.raises(PickleReadError, match=r"refs\.p: not a readable pickle \(text that is not UTF-8"):
        safe_loads(payload, source="refs.p")


def test_a_memo_index_no_pickler_writes_is_refused_before_anything_is_allocated():
    import resource
    import struct

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for index in (2**28, 2**31):  # CPython would allocate and zero 4 GiB, 16 GiB of memo for 10 bytes
        data = b"\x80\x02N" + b"r" + struct.pack("<I", index) + b"."  # None, LONG_BINPUT index
        with pytest.raises(UnsafePickleError, match=rf"refs\.p: memo index {index} at byte 3"):
            safe_loads(data, source="refs.p")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # KiB: not GiBs
    assert safe_loads(pickle.dumps([["a"], ["a"]] * 3, protocol=0)) == [["a"], ["a"]] * 3  # real memo use


def test_a_numpy_dtype_left_outside_a_scalar_is_refused():
    # found by the fuzz tests: a mutated NumPy scalar whose dtype was built but never used
    data = b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00i8\x89\x88\x87R."
    with pytest.raises(UnsafePickleError, match=r"refs\.p: a numpy\.dtypes?\.\w+ came out of the pickle"):
        safe_loads(data, source="refs.p")
