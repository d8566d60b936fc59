"""Reading a layer's parameters from an ``.npz`` archive without trusting the file.

``numpy.load`` followed by a shape check decompresses a member whole before anyone looks at
its shape, so a small archive whose ``.npy`` header claims gigabytes takes gigabytes. Here
each wanted member's header is read first (``numpy.lib.format``) and checked against the
layer: its shape must be the parameter's and its dtype a real number. Data is read only when
every header passed, and only as many bytes as the (checked) header describes. Everything
that can go wrong with the file's contents is reported as :class:`Invalid` with a reason.
"""

from __future__ import annotations

import math
import struct
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy_format

try:  # optional in CPython builds; zipfile only needs it for LZMA members
    import lzma

    _LZMA_ERRORS: tuple = (lzma.LZMAError,)
except ImportError:  # pragma: no cover
    _LZMA_ERRORS = ()

# What the zip, zlib, bz2 (OSError) and lzma layers and numpy.lib.format raise on malformed
# input: bad zip structures, bad compressed streams, truncation (EOFError), CRC mismatches
# (BadZipFile), encrypted members (RuntimeError), unknown compression (NotImplementedError),
# bad magic or header (ValueError).
CORRUPT = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    *_LZMA_ERRORS,
)

# An .npy header is a short dict literal (numpy itself refuses more than 10000 characters);
# reading through this bound means a length field claiming gigabytes costs nothing.
_MAX_HEADER_BYTES = npy_format.MAGIC_LEN + 4 + 65536
_NPY_PREFIX = npy_format.MAGIC_PREFIX


class Invalid(Exception):
    """The archive cannot be loaded into the layer; ``str()`` is the reason."""


class _Bounded:
    """At most ``limit`` bytes of ``stream``, for ``numpy.lib.format``'s header readers."""

    def __init__(self, stream, limit: int):
        self._stream = stream
        self._left = limit

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._left:
            size = self._left
        data = self._stream.read(size)
        self._left -= len(data)
        return data


def _read_header(stream, member: str):
    """``(shape, fortran_order, dtype)`` from the start of an ``.npy`` member stream."""
    bounded = _Bounded(stream, _MAX_HEADER_BYTES)
    try:
        version = npy_format.read_magic(bounded)
    except ValueError as exc:
        raise Invalid(f"member {member!r} is not a .npy array ({exc})") from None
    if version not in ((1, 0), (2, 0)):
        raise Invalid(f"member {member!r} has an unsupported .npy format version {version}")
    try:
        if version == (1, 0):
            return npy_format.read_array_header_1_0(bounded)
        return npy_format.read_array_header_2_0(bounded)
    except ValueError as exc:  # numpy's message says what is wrong with the header
        raise Invalid(f"member {member!r} has a malformed .npy header ({exc})") from None


def _check_header(member: str, key: str, header, shape: tuple, layer_dtype: np.dtype) -> None:
    found_shape, _, dtype = header
    if dtype.hasobject or dtype.kind not in "biuf":
        raise Invalid(
            f"member {member!r} has dtype {dtype}, which cannot be cast to the layer's dtype "
            f"{layer_dtype}; expected a real floating-point, integer or bool array"
        )
    if tuple(found_shape) != shape:
        raise Invalid(
            f"{key} shape does not match the layer: got {tuple(found_shape)} but expected {shape}"
        )


def _read_data(stream, member: str, header) -> np.ndarray:
    """The array after the header: exactly the bytes the header describes, then the end."""
    shape, fortran_order, dtype = header
    size = math.prod(shape) * dtype.itemsize
    data = stream.read(size)
    if len(data) != size:
        raise Invalid(f"member {member!r} is truncated: {len(data)} of {size} data bytes")
    # Reaching the member's end also makes zipfile verify its CRC-32.
    if stream.read(1):
        raise Invalid(f"member {member!r} holds more data than its header describes")
    array = np.frombuffer(data, dtype=dtype)
    return array.reshape(shape, order="F" if fortran_order else "C")


def read_parameters(file, shapes: dict, layer_dtype: np.dtype, strict: bool):
    """Read the parameters ``shapes`` (name -> shape) from the ``.npz`` archive ``file``.

    ``file`` is a binary, seekable file object positioned at the archive. Returns
    ``(values, missing_keys, unexpected_keys)`` with ``values`` a dict of name -> array (of
    the file's dtype; the caller casts). Raises :class:`Invalid` for anything wrong with the
    contents, including read errors of the zip, zlib, bz2 and lzma layers (``CORRUPT``).
    """
    try:
        return _read_parameters(file, shapes, layer_dtype, strict)
    except CORRUPT as exc:
        raise Invalid(f"corrupt or unreadable archive ({type(exc).__name__}: {exc})") from exc


def _read_parameters(file, shapes: dict, layer_dtype: np.dtype, strict: bool):
    start = file.tell()
    head = file.read(len(_NPY_PREFIX))
    file.seek(start)
    if not head:
        raise Invalid("the file is empty")
    if head == _NPY_PREFIX:
        raise Invalid("it holds a single array (.npy), not an .npz archive of named parameters")
    if not zipfile.is_zipfile(file):
        raise Invalid(
            "it is not an .npz archive: no zip directory found (not a zip file, or truncated)"
        )
    file.seek(start)

    with zipfile.ZipFile(file) as archive:
        members = {}
        for info in archive.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if key in members:
                raise Invalid(
                    f"two members hold {key!r}: {members[key].filename!r} and {info.filename!r}"
                )
            members[key] = info
        missing = [name for name in shapes if name not in members]
        unexpected = [key for key in members if key not in shapes]
        if strict and (missing or unexpected):
            raise Invalid(f"missing key(s) {missing}, unexpected key(s) {unexpected}")
        wanted = [name for name in shapes if name in members]

        # Every header first: nothing is decompressed beyond a header until all fit the layer.
        headers = {}
        for name in wanted:
            with archive.open(members[name]) as stream:
                headers[name] = _read_header(stream, members[name].filename)
            _check_header(members[name].filename, name, headers[name], shapes[name], layer_dtype)

        values = {}
        for name in wanted:
            member = members[name].filename
            with archive.open(members[name]) as stream:
                # The same member again: a file changed in between must not get past the checks.
                if _read_header(stream, member) != headers[name]:
                    raise Invalid(f"member {member!r} changed while it was read")
                values[name] = _read_data(stream, member, headers[name])
    return values, missing, unexpected
