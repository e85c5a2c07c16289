# SPDX-License-Identifier: Apache-2.0
"""A fake ``hipfile`` module: the documented Python API (REFERENCE §7) over real files.

``FileHandle`` opens the path with the caller's flags and does real
``pread``/``pwrite`` to and from the registered buffer's memory; "device
memory" is a CPU tensor's. Like hipFile it refuses unregistered buffers and,
on O_DIRECT files, offsets and sizes off the 4 KiB grid, and it quietly
truncates requests above its per-call maximum.
"""

import ctypes
import os
import types

from vllm_kvplugin.storage.format import ALIGN


class HipFileException(Exception):
    def __init__(self, hipfile_err, hip_err=0):
        super().__init__(f"{hipfile_err} - fake hipFile error")
        self.hipfile_err, self.hip_err = hipfile_err, hip_err


def fake_hipfile(max_io=0x7FFFF000):
    """A ``hipfile`` module: the documented API, with its calls recorded in ``hf.calls``."""
    hf = types.ModuleType("hipfile")
    hf.__version__, hf.HipFileException = "0.4.0.dev0-fake", HipFileException
    hf.max_io, hf.opened, hf.registered, hf.registrations, hf.calls = max_io, 0, {}, 0, []

    class Driver:
        def open(self):
            hf.opened += 1

        def close(self):
            hf.opened -= 1

        __enter__ = lambda self: (self.open(), self)[1]  # noqa: E731
        __exit__ = lambda self, *exc: self.close()  # noqa: E731

    class Buffer:
        def __init__(self, ptr, length, flags):
            self.ptr, self.length = ptr, length

        def register(self):
            if self.ptr in hf.registered:
                raise HipFileException(5022)  # hipFileMemoryAlreadyRegistered
            hf.registered[self.ptr] = self.length
            hf.registrations += 1

        def deregister(self):
            hf.registered.pop(self.ptr, None)

    class FileHandle:
        def __init__(self, path, flags, mode=0o644, handle_type=None):
            self.path, self.flags, self.mode, self.fd = path, flags, mode, None

        def __enter__(self):
            if hf.opened < 1:
                raise HipFileException(5001)  # hipFileDriverNotInitialized
            self.fd = os.open(self.path, self.flags, self.mode)
            return self

        def __exit__(self, *exc):
            os.close(self.fd)

        def _memory(self, op, buffer, size, file_offset, buffer_offset):
            if buffer.ptr not in hf.registered or buffer_offset + size > hf.registered[buffer.ptr]:
                raise HipFileException(5012)  # hipFileHipPointerInvalid / range
            if self.flags & os.O_DIRECT and (size | file_offset | (buffer.ptr + buffer_offset)) % ALIGN:
                raise HipFileException(5019)  # misaligned for the O_DIRECT fast path
            n = min(size, hf.max_io)  # "Larger IOs will be quietly truncated"
            hf.calls.append((op, buffer.ptr, size, file_offset, buffer_offset))
            return (ctypes.c_char * n).from_address(buffer.ptr + buffer_offset)

        def write(self, buffer, size, file_offset, buffer_offset):
            return os.pwrite(self.fd, self._memory("write", buffer, size, file_offset, buffer_offset), file_offset)

        def read(self, buffer, size, file_offset, buffer_offset):
            return os.preadv(self.fd, [self._memory("read", buffer, size, file_offset, buffer_offset)], file_offset)

    hf.Driver, hf.Buffer, hf.FileHandle = Driver, Buffer, FileHandle
    return hf
