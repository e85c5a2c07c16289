# SPDX-License-Identifier: Apache-2.0
"""I/O engines for chunk files: hipFile, O_DIRECT POSIX where the filesystem allows it, buffered elsewhere.

Runs in the vLLM worker process (the storage tier's I/O threads; each thread
has its own aligned staging buffer).

O_DIRECT bypasses the page cache, so chunk traffic neither evicts the hosts's
other caches nor double-buffers multi-GB KV; it needs every buffer address,
file offset and length aligned (statx ``STATX_DIOALIGN`` where the kernel
reports it, 4 KiB otherwise). Writes go to a temporary name and are renamed
into place, so a reader sees a whole file or none; a file cut short by a crash
or a full disk fails its length or checksum check and is treated as a miss.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
import uuid
from dataclasses import dataclass

from vllm_kvplugin.storage.format import ALIGN, HEADER_SIZE, ChunkHeader, ChunkRejected, aligned, check_payload, decode_header

_O_DIRECT = getattr(os, "O_DIRECT", 0)
# Files up to this size are read whole in one call (LMCache chunks are a few MiB to ~100 MiB); larger ones
# (a damaged or foreign file) read their header first, so a file's size cannot make a reader allocate.
ONE_READ_MAX = 256 << 20


@dataclass(frozen=True)
class DioAlignment:
    memory: int
    offset: int


def dio_alignment(path: str) -> DioAlignment | None:
    """What O_DIRECT needs on ``path``'s filesystem (statx), or None if the kernel does not say."""
    STATX_DIOALIGN, AT_FDCWD = 0x2000, -100
    buf = ctypes.create_string_buffer(256)  # struct statx
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.statx(AT_FDCWD, os.fsencode(path), 0, STATX_DIOALIGN, buf) != 0:
            return None
    except (OSError, AttributeError):
        return None
    mask = int.from_bytes(buf.raw[0:4], "little")
    mem, offset = int.from_bytes(buf.raw[0x98:0x9C], "little"), int.from_bytes(buf.raw[0x9C:0xA0], "little")
    if not mask & STATX_DIOALIGN or not offset:
        return None
    return DioAlignment(mem, offset)


def read_header(fd: int, head: memoryview, expected_key: str) -> ChunkHeader:
    """Read (into ``head``, 4 KiB) and verify an open chunk file's header.

    The payload length it claims is checked against the file's size before any
    caller sizes a buffer by it: a crafted header cannot make a reader allocate.
    """
    if os.preadv(fd, [head], 0) != HEADER_SIZE:
        raise ChunkRejected("truncated header")
    header = decode_header(head, expected_key)
    check_file_size(os.fstat(fd).st_size, header)
    return header


def check_file_size(size: int, header: ChunkHeader) -> None:
    """Refuse a file too short for the payload its header claims."""
    if size < HEADER_SIZE + aligned(header.payload_len):
        raise ChunkRejected(f"truncated payload (file shorter than the {header.payload_len} bytes claimed)")


class HostStaging(threading.local):
    """A page-aligned buffer per thread, grown on demand and reused."""

    buf: mmap.mmap | None = None

    def get(self, size: int) -> memoryview:
        if self.buf is None or len(self.buf) < size:
            self.buf = mmap.mmap(-1, aligned(size))  # anonymous mappings are page-aligned
        return memoryview(self.buf)[:size]


class PosixIO:
    """Chunk files through ``pwrite``/``pread``, with O_DIRECT or through the page cache."""

    def __init__(self, direct: bool):
        self.direct = direct and bool(_O_DIRECT)
        self.name = "posix-odirect" if self.direct else "posix-buffered"
        self._staging = HostStaging()

    def write(self, path: str, header: bytes, payload: memoryview) -> None:
        """Write ``header`` + ``payload`` (padded) to ``path`` atomically."""
        payload = memoryview(payload).cast("B") if memoryview(payload).format != "B" else payload
        total = HEADER_SIZE + aligned(len(payload))
        buf = self._staging.get(total)
        buf[:HEADER_SIZE] = header
        buf[HEADER_SIZE : HEADER_SIZE + len(payload)] = payload
        buf[HEADER_SIZE + len(payload) :] = bytes(total - HEADER_SIZE - len(payload))
        with new_file(path, _O_DIRECT if self.direct else 0) as fd:
            written = os.pwrite(fd, buf, 0)
            if written != total:  # a full disk part-way through
                raise OSError(errno.ENOSPC, f"short write ({written} of {total} bytes)", path)

    def read(self, path: str, expected_key: str) -> tuple[ChunkHeader, memoryview]:
        """The verified header and payload of ``path`` (payload valid until this thread's next read).

        Raises:
            ChunkRejected: the file is not a whole, intact chunk of ``expected_key``.
            OSError: the file cannot be read (missing, permissions, I/O error).
        """
        fd = os.open(path, os.O_RDONLY | (_O_DIRECT if self.direct else 0))
        try:
            size = os.fstat(fd).st_size
            if HEADER_SIZE <= size <= ONE_READ_MAX:  # header and payload in one read: one device round trip
                buf = self._staging.get(aligned(size))
                got = os.preadv(fd, [buf], 0)
                if got < HEADER_SIZE:  # cut short since the fstat
                    raise ChunkRejected("truncated header")
                header = decode_header(buf[:HEADER_SIZE], expected_key)
                check_file_size(size, header)
                payload = buf[HEADER_SIZE : min(got, HEADER_SIZE + header.payload_len)]
            else:  # too short (rejected there) or too long to stage whole: the header says how much to read
                header = read_header(fd, self._staging.get(HEADER_SIZE), expected_key)
                buf = self._staging.get(aligned(header.payload_len))
                payload = buf[: max(0, os.preadv(fd, [buf], HEADER_SIZE))][: header.payload_len]
        finally:
            os.close(fd)
        if len(payload) < header.payload_len:
            raise ChunkRejected(f"truncated payload ({len(payload)} of {header.payload_len} bytes)")
        check_payload(header, payload)
        return header, payload

    def close(self) -> None:
        """Nothing to release: the staging buffers are plain memory."""


@contextlib.contextmanager
def new_file(path: str, flags: int):
    """An fd on a new 0600 temporary file that becomes ``path`` when the block succeeds.

    On any failure (in the block, at close, at rename) the temporary file is
    removed: a reader sees a whole file or none, and no ``*.tmp`` stays behind.
    """
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, 0o600)
    try:
        try:
            yield fd
        finally:
            os.close(fd)  # may itself report a deferred write error (NFS)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # already gone with its directory, or on a filesystem gone read-only
        raise


def choose_io(directory: str) -> PosixIO:
    """O_DIRECT if ``directory``'s filesystem accepts it at our 4 KiB alignment, buffered otherwise."""
    if not _O_DIRECT:
        return PosixIO(direct=False)
    probe = os.path.join(directory, f".kvplugin-probe-{uuid.uuid4().hex}")
    engine = PosixIO(direct=True)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        # Kernels report DIO alignment for regular files only, hence on the probe.
        alignment = dio_alignment(probe)
        if alignment is not None and (ALIGN % alignment.offset or ALIGN % max(alignment.memory, 1)):
            return PosixIO(direct=False)  # the device wants coarser alignment than the format's
        fd = os.open(probe, os.O_WRONLY | _O_DIRECT)
        try:
            os.pwrite(fd, engine._staging.get(ALIGN), 0)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return PosixIO(direct=False)  # filesystems without O_DIRECT
    finally:
        if os.path.exists(probe):
            os.unlink(probe)
    return engine
