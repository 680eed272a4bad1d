"""Byte-level I/O of tar members and `.npy` arrays, on any byte stream, every size bounded before it is read.

Hand-written rather than `tarfile` and `np.lib.format.read_array` because, measured in one run
(`python bench/tario.py`), these are several times faster on shard members and because `tarfile`'s
headers are not the bytes existing shards hold (it leaves the device fields empty), so shards written
through it would not be byte-identical to those already built.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from pipeline.errors import AslError

# Bounds on what a header may claim: a sample's largest member (padded float32 x.npy) is 1.1 MB.
MAX_MEMBER_BYTES = 64 << 20
MAX_NAME_BYTES = 4096  # a GNU long name
USTAR_NAME_BYTES = 100  # the name field of a ustar header; the writer never uses the prefix field
TAR_END = bytes(1024)  # two zero blocks end an archive
_ZERO_BLOCK = bytes(512)


class TarError(AslError, ValueError):
    """A tar stream that cannot be read; `reason` says why, the message also names the stream."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.reason = reason


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` (at most USTAR_NAME_BYTES) of `size` bytes.

    Fixed fields (mode 0644, uid/gid 0, mtime 0, no user or group names), so the same members
    always give the same bytes.
    """
    raw = name.encode()
    if len(raw) > USTAR_NAME_BYTES:
        raise ValueError(f"tar member name longer than {USTAR_NAME_BYTES} bytes: {name!r}")
    header = b"".join(
        [
            raw.ljust(100, b"\0"),
            b"0000644\0",
            b"0000000\0",
            b"0000000\0",
            b"%011o\0" % size,
            b"00000000000\0",
            b" " * 8,
            b"0",
            b"\0" * 100,
            b"ustar\x0000",
            b"\0" * 64,
            b"0000000\0" * 2,
            b"\0" * 155,
        ]
    ).ljust(512, b"\0")
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]


def member_blocks(name: str, data: bytes) -> tuple[bytes, bytes, bytes]:
    """The header, data and zero padding of one regular-file member, as written into a tar stream."""
    return ustar_header(name, len(data)), data, bytes(-len(data) % 512)


def tar_members(f: BinaryIO, name: str) -> Iterator[tuple[str, bytes]]:
    """`(member name, data)` of every regular file in a tar stream (ustar, pax and GNU long names).

    Any other member type is refused. Headers are checksummed; every size is parsed strictly and
    bounded (`MAX_MEMBER_BYTES`) before anything is read; truncation, malformed pax records and read
    errors are `TarError`s naming the stream `name`. Read front to back only (a pipe or a socket works).
    """
    long_name, pax = None, {}
    while True:
        header = _read(f, 512, name)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < 512:
            raise TarError(name, "truncated header")
        size = _header_size(header, name)
        data = _read(f, size, name)
        if len(data) < size or len(_read(f, -size % 512, name)) < -size % 512:
            raise TarError(name, "truncated member")
        kind = header[156:157]
        if kind == b"x":  # pax extended header: only the path matters here
            pax = _pax_records(data, name)
            continue
        if kind in (b"g", b"L"):
            if kind == b"L" and size > MAX_NAME_BYTES:
                raise TarError(name, f"long name of {size} bytes")
            long_name = _text(data.split(b"\0", 1)[0], name) if kind == b"L" else long_name
            continue
        member = pax.get("path") or long_name or _header_name(header, name)
        long_name, pax = None, {}
        if kind not in (b"0", b"\0"):
            raise TarError(name, f"member {member!r} is not a regular file")
        yield member, data


def _read(f: BinaryIO, size: int, name: str) -> bytes:
    try:
        return f.read(size)
    except OSError as exc:  # a read error of the underlying stream
        raise TarError(name, f"read error ({exc.strerror or exc})") from None


def _header_size(header: bytes, name: str) -> int:
    """The member size of a checksummed header, within `MAX_MEMBER_BYTES`."""
    try:
        checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:  # includes GNU base-256 sizes, far beyond any member of ours
        raise TarError(name, "bad header") from None
    if checksum != sum(header[:148]) + 256 + sum(header[156:]):
        raise TarError(name, "header checksum mismatch")
    if not 0 <= size <= MAX_MEMBER_BYTES:
        raise TarError(name, f"member of {size} bytes, over {MAX_MEMBER_BYTES}")
    return size


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise TarError(name, "member name or pax record not UTF-8") from None


def _header_name(header: bytes, name: str) -> str:
    member = _text(header[:100].split(b"\0", 1)[0], name)
    prefix = _text(header[345:500].split(b"\0", 1)[0], name) if header[257:262] == b"ustar" else ""
    return f"{prefix}/{member}" if prefix else member


def _pax_records(data: bytes, name: str) -> dict[str, str]:
    """`key=value` records of a pax header ("LEN key=value\\n" each, LEN counting the whole record)."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarError(name, f"malformed pax record at byte {pos}")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise TarError(name, f"malformed pax record at byte {pos}")
        records[_text(key, name)] = _text(value, name)
        pos = end
    return records


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` in the `.npy` format, as `np.save` writes it (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """Decode `.npy` bytes; object arrays (pickle) are refused. Any malformed data raises ValueError.

    The headers `np.save` writes for plain numeric arrays are parsed directly (numpy parses them with
    `ast.literal_eval`, the larger part of decoding a small array); any other header goes through
    numpy's header parser. Either way the data's size is checked against the shape before anything
    is allocated, so a header claiming an absurd shape is an error, not a MemoryError. The arrays
    are read-only views of `data`.
    """
    fast = _plain_npy(data)
    return fast if fast is not None else _checked_npy(data)


def _checked_npy(data: bytes) -> np.ndarray:
    f = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(f)
        if major not in (1, 2):
            raise ValueError(f"unsupported .npy format version {major}")
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
    except (ValueError, EOFError, TypeError) as exc:
        raise ValueError(f"malformed .npy header ({exc})") from None
    if dtype.hasobject:
        raise ValueError("object arrays are refused (they would be unpickled)")
    count, offset = math.prod(shape), f.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f".npy header says {dtype} {shape} ({count * dtype.itemsize} bytes), {len(data) - offset} bytes follow"
        )
    return np.frombuffer(data, dtype, count, offset=offset).reshape(shape, order="F" if fortran_order else "C")


_NPY_HEADER = re.compile(rb"\{'descr': '([<|][fiub][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n")


def _plain_npy(data: bytes) -> np.ndarray | None:
    """A version-1.0 `.npy` of a numeric dtype in C order whose size matches its shape, else None."""
    if data[:8] != b"\x93NUMPY\x01\x00" or len(data) < 10:
        return None
    end = 10 + int.from_bytes(data[8:10], "little")
    match = _NPY_HEADER.fullmatch(data, 10, end)
    if match is None:
        return None
    shape = tuple(int(v) for v in match.group(2).split(b",") if v.strip())
    dtype = np.dtype(match.group(1).decode())
    count = math.prod(shape)
    if len(data) - end != count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype, count, offset=end).reshape(shape)
