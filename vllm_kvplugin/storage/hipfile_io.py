# SPDX-License-Identifier: Apache-2.0
"""hipFile engine for chunk files: payloads move by DMA between a registered ROCm device buffer and NVMe.

Runs in the vLLM worker process (the storage tier's I/O threads; each thread
has its own registered device staging buffer and host header buffer).

hipFile (AMD's cuFile counterpart, REFERENCE §7) transfers between device
memory and an O_DIRECT file. Its Python bindings are optional (extra ``rocm``)
and imported only by :func:`open_hipfile_io`; whatever is missing (bindings,
ROCm build or device, ext4/xfs, a working driver) raises
:class:`HipFileUnavailable` naming it, and the tier uses O_DIRECT instead.

Files have exactly :class:`~vllm_kvplugin.storage.io.PosixIO`'s format: the
4 KiB header goes through the host path (``pwrite``/``preadv``), the payload
through hipFile at offset 4096, in pieces of at most 2 GiB - 4 KiB (hipFile
quietly truncates larger requests). hipFile reopens the header's descriptor
(``/proc/self/fd``), so a concurrent rename never pairs one file's header with
another's payload. Payload checksums are verified on host bytes, so reads
return host memory and a bad file raises ``ChunkRejected`` as with PosixIO.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import sys
import threading
import uuid

import torch

from vllm_kvplugin.devices import device_ops
from vllm_kvplugin.storage.format import (
    ALIGN, HEADER_SIZE, ChunkHeader, ChunkRejected, aligned, check_payload,
)
from vllm_kvplugin.storage.io import HostStaging, new_file, read_header

MAX_IO = 0x7FFFF000  # hipFile's largest single transfer: 2 GiB - 4 KiB
_SUPPORTED_FS = {0xEF53: "ext4", 0x58465342: "xfs"}  # statfs f_type magic numbers
_API = ("Driver", "FileHandle", "Buffer", "HipFileException")
_INSTALL = "pip install --pre 'vllm-kvplugin[rocm]'"


class HipFileUnavailable(RuntimeError):
    def __init__(self, reason: str):
        super().__init__(f"hipFile unavailable: {reason}")


def load_bindings():
    """The ``hipfile`` module, or :class:`HipFileUnavailable` saying why it cannot be used."""
    try:
        hipfile = importlib.import_module("hipfile")
    except (ImportError, OSError) as e:  # OSError: the HIP runtime library does not load
        raise HipFileUnavailable(f"the hipfile bindings do not import ({e}); {_INSTALL}") from e
    missing = [name for name in _API if not hasattr(hipfile, name)]
    if missing:
        raise HipFileUnavailable(f"this hipfile lacks {', '.join(missing)} (the placeholder wheel?); {_INSTALL}")
    return hipfile


def rocm_device() -> torch.device:
    """The current ROCm device, or :class:`HipFileUnavailable` on other torch builds and machines."""
    if not torch.version.hip:
        raise HipFileUnavailable(f"torch {torch.__version__} is not a ROCm build")
    if not torch.cuda.is_available():
        raise HipFileUnavailable("no ROCm device is visible")
    return torch.device("cuda", torch.cuda.current_device())


def filesystem_magic(path: str) -> int:
    """``statfs(2)``'s ``f_type`` of ``path``'s filesystem (its first field, a C long)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder) & 0xFFFFFFFF


def check_filesystem(directory: str) -> str:
    """The filesystem's name if hipFile will do I/O on it, else :class:`HipFileUnavailable`."""
    magic = filesystem_magic(directory)
    if magic in _SUPPORTED_FS:
        return _SUPPORTED_FS[magic]
    if os.environ.get("HIPFILE_UNSUPPORTED_FILE_SYSTEMS", "").lower() == "true":
        return f"filesystem {magic:#x}, allowed by HIPFILE_UNSUPPORTED_FILE_SYSTEMS"
    raise HipFileUnavailable(f"{directory} is on filesystem {magic:#x}; hipFile supports ext4 and xfs "
                             "(HIPFILE_UNSUPPORTED_FILE_SYSTEMS=true overrides)")


def open_hipfile_io(directory: str) -> HipFileIO:
    """A working :class:`HipFileIO` for ``directory`` (probed with one block), or :class:`HipFileUnavailable`."""
    hipfile = load_bindings()
    device = rocm_device()
    fs = check_filesystem(directory)
    engine = None
    try:
        engine = HipFileIO(hipfile, device)
        engine.probe(directory)
    except (hipfile.HipFileException, OSError, RuntimeError) as e:
        if engine is not None:
            engine.close()
        raise HipFileUnavailable(f"the driver or a probe write failed ({e})") from e
    engine.reason = f"hipFile on {device}, {fs}, bindings {getattr(hipfile, '__version__', 'unknown')}"
    return engine


class HipFileIO:
    """Chunk files through ``hipFileWrite``/``hipFileRead`` from a registered device buffer."""

    name = "hipfile"
    direct = True  # every file is opened O_DIRECT
    max_io = MAX_IO

    def __init__(self, hipfile, device: torch.device):
        self._hf = hipfile
        self.device = torch.device(device)
        self.reason = ""
        self._ops = device_ops(self.device.type)
        self._driver = hipfile.Driver()
        self._driver.open()
        self._staging = threading.local()  # .tensor, and .buffer: the hipfile.Buffer registering it
        self._host = HostStaging()
        self._lock = threading.Lock()
        self._buffers: list = []  # every registered Buffer, for close()

    def region(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of this thread's registered device buffer (uint8, 4 KiB-aligned).

        A producer that has the payload on the device can fill this and pass it
        to :meth:`write`, which then copies nothing.
        """
        return self._device_buffer(nbytes)[1][:nbytes]

    def write(self, path: str, header: bytes, payload) -> None:
        """Write ``header`` + ``payload`` (a host buffer or a tensor, e.g. :meth:`region`) to ``path`` atomically."""
        size = aligned(self._stage(payload))
        buffer, _ = self._device_buffer(size)
        with new_file(path, os.O_DIRECT) as fd:
            head = self._host.get(HEADER_SIZE)
            head[:] = header
            written = os.pwrite(fd, head, 0)
            if written == HEADER_SIZE:
                written += self._transfer(fd, os.O_WRONLY, "write", buffer, size)
            if written != HEADER_SIZE + size:
                raise OSError(errno.EIO, f"short write ({written} of {HEADER_SIZE + size} bytes)", path)

    def read(self, path: str, expected_key: str) -> tuple[ChunkHeader, memoryview]:
        """The verified header and host payload of ``path`` (valid until this thread's next I/O).

        Raises:
            ChunkRejected: the file is not a whole, intact chunk of ``expected_key``.
            OSError: the file cannot be read (missing, permissions, I/O or hipFile error).
        """
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            header = read_header(fd, self._host.get(HEADER_SIZE), expected_key)
            buffer, device = self._device_buffer(aligned(header.payload_len))
            got = self._transfer(fd, os.O_RDONLY, "read", buffer, aligned(header.payload_len))
        finally:
            os.close(fd)
        if got < header.payload_len:
            raise ChunkRejected(f"truncated payload ({got} of {header.payload_len} bytes)")
        payload = self._host.get(header.payload_len)
        if header.payload_len:
            torch.frombuffer(payload, dtype=torch.uint8).copy_(device[: header.payload_len])
        check_payload(header, payload)
        return header, payload

    def probe(self, directory: str) -> None:
        """One block through hipFile into a scratch file, so a broken setup fails here, not per chunk."""
        path = os.path.join(directory, f".kvplugin-hipfile-probe-{uuid.uuid4().hex}")
        buffer, device = self._device_buffer(ALIGN)
        device.zero_()
        self._ops.synchronize()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        try:
            if self._transfer(fd, os.O_WRONLY, "write", buffer, ALIGN) != ALIGN:
                raise OSError(errno.EIO, "short probe write", path)
        finally:
            os.close(fd)
            os.unlink(path)

    def close(self) -> None:
        """Deregister every staging buffer and close the driver."""
        with self._lock:
            buffers, self._buffers = self._buffers, []
        for buffer in buffers:
            buffer.deregister()
        self._driver.close()

    def _device_buffer(self, nbytes: int):
        """This thread's registered buffer and its tensor, grown (and re-registered) only when too small."""
        local = self._staging
        if getattr(local, "tensor", None) is None or local.tensor.numel() < nbytes:
            if getattr(local, "buffer", None) is not None:
                with self._lock:
                    self._buffers.remove(local.buffer)
                local.buffer.deregister()
            size = max(aligned(nbytes), ALIGN)
            raw = torch.empty(size + ALIGN, dtype=torch.uint8, device=self.device)
            skip = -raw.data_ptr() % ALIGN  # hipFile's fast path wants 4 KiB-aligned device addresses
            local.tensor = raw[skip : skip + size]
            local.buffer = self._hf.Buffer(local.tensor.data_ptr(), size, 0)
            local.buffer.register()
            with self._lock:
                self._buffers.append(local.buffer)
        return local.buffer, local.tensor

    def _stage(self, payload) -> int:
        """Put ``payload`` into this thread's device buffer, zero-padded to the alignment; its length."""
        src = payload.reshape(-1).view(torch.uint8) if isinstance(payload, torch.Tensor) else self._host_tensor(payload)
        size = src.numel()
        _, device = self._device_buffer(aligned(size))
        if src.data_ptr() != device.data_ptr() or src.device != device.device:
            device[:size].copy_(src)
        device[size : aligned(size)].zero_()
        self._ops.synchronize()  # hipFile DMAs from device memory: the copies must have landed
        return size

    def _host_tensor(self, payload) -> torch.Tensor:
        view = memoryview(payload).cast("B")
        if view.readonly:  # torch.frombuffer wants writable memory
            staged = self._host.get(len(view))
            staged[:] = view
            view = staged
        return torch.frombuffer(view, dtype=torch.uint8) if len(view) else torch.empty(0, dtype=torch.uint8)

    def _transfer(self, fd: int, flags: int, op: str, buffer, size: int) -> int:
        """Move ``size`` bytes between the file from ``HEADER_SIZE`` on and ``buffer``; the count moved.

        Pieces are at most :attr:`max_io`, and a short count (hipFile's truncation)
        continues where it stopped; 0 means end of file.
        """
        done = 0
        try:
            with self._hf.FileHandle(f"/proc/self/fd/{fd}", flags | os.O_DIRECT, 0o600) as handle:
                move = getattr(handle, op)
                while done < size:
                    got = move(buffer, min(size - done, self.max_io), HEADER_SIZE + done, done)
                    if got <= 0:
                        break
                    done += got
        except self._hf.HipFileException as e:
            raise OSError(errno.EIO, f"hipFile {op} failed: {e}") from e
        return done
