# SPDX-License-Identifier: Apache-2.0
"""NIXL engine for chunk files: bytes move through a ``nixl_agent``'s POSIX backend (or GDS, chunks on device).

Runs in the vLLM worker process (the storage tier's I/O threads), in the
``lmcache server`` process (the MP L2 adapter's pool) and in ``doctor``/``bench``.

NIXL (REFERENCE §8, §19) is optional (extra ``nixl``) and imported only by
:func:`open_nixl_io`; whatever is missing (the package, the POSIX plugin, a
probe write) raises :class:`NixlUnavailable` saying why, and the tier uses
O_DIRECT POSIX instead. Local storage in NIXL is a loopback transfer: the
staging buffer (registered ``DRAM``) is the local side, the open file
(``FILE``, by fd) the "remote" side of the agent's own name. Files are opened
``O_DIRECT``; the staging buffer is page-aligned (an anonymous mapping), one
per thread, registered once and re-registered only when a bigger chunk comes.

Files have exactly :class:`~vllm_kvplugin.storage.io.PosixIO`'s format and the
same atomic temporary-file-and-rename (:func:`~vllm_kvplugin.storage.io.new_file`);
the header is read and checked on the host path (:func:`~vllm_kvplugin.storage.io.read_header`)
before anything is sized by it, so a truncated, bit-flipped or foreign file
raises ``ChunkRejected`` exactly as with PosixIO. A NIXL error (its
exceptions, ``ERR``, a transfer still running after 10 s + 1 s per 50 MB) is an
``OSError``: the tier's miss or skipped store.

Threads: one agent per engine, shared by the tier's threads, created with
``NIXL_THREAD_SYNC_STRICT`` (every agent call serialised inside NIXL; the I/O
itself runs in the kernel between calls, so threads still overlap). Measured
on nixl 1.5.1: 8 threads x 150 write+read round trips byte-exact under
``STRICT`` and ``RW`` (same speed); under ``NONE`` (the default without a
listener thread) the same runs aborted on a corrupted heap or logged failed
submissions.

GDS/GDS_MT would be the choice where their plugins load (``libcufile.so.0``)
and the caller's chunks are in device memory: the staging buffer is then a
device tensor registered as ``VRAM``. LMCache hands our tiers host memory, so
no caller asks for that today, and no CUDA machine has run it; the same
tensor-staging code runs on CPU (``device=cpu``, ``DRAM``) in the tests.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import mmap
import os
import threading
import time
import uuid

from vllm_kvplugin.storage.format import (
    ALIGN, HEADER_SIZE, ChunkHeader, ChunkRejected, aligned, check_payload, crc32c, encode_header,
)
from vllm_kvplugin.storage.io import HostStaging, new_file, read_header

INSTALL = "pip install 'vllm-kvplugin[nixl]'"
GDS_BACKENDS = ("GDS_MT", "GDS")


class NixlUnavailable(RuntimeError):
    """NIXL cannot move this directory's files; the message says why (for the log and ``doctor``)."""


def load_api():
    """``nixl._api``, or :class:`NixlUnavailable` saying why it cannot be used."""
    try:
        return importlib.import_module("nixl._api")
    except ModuleNotFoundError as e:
        if e.name in ("nixl", "nixl._api"):
            raise NixlUnavailable(f"nixl not installed ({INSTALL})") from e
        raise NixlUnavailable(f"nixl does not import ({e}); {INSTALL}") from e
    except (ImportError, OSError) as e:  # no nixl_cu* wheel, or a library that does not load
        raise NixlUnavailable(f"nixl does not import ({e}); {INSTALL}") from e


def open_nixl_io(directory: str, chunks_on_device: bool = False) -> NixlIO:
    """A working :class:`NixlIO` for ``directory`` (probed with one block), or :class:`NixlUnavailable`."""
    api = load_api()
    try:  # one agent per engine, shared by the threads (see the module docstring)
        conf = api.nixl_agent_config(enable_prog_thread=False, backends=[],
                                     sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        agent = api.nixl_agent(f"kvplugin-{os.getpid()}-{uuid.uuid4().hex[:8]}", conf)
    except Exception as e:  # noqa: BLE001 - whatever it is, the tier uses O_DIRECT instead
        raise NixlUnavailable(f"no nixl agent could be created ({type(e).__name__}: {e})") from e
    errors = _nixl_errors()
    gds, gds_reason = _gds(agent, chunks_on_device, errors)
    if gds is not None:
        engine = NixlIO(agent, gds[0], device=gds[1])
        engine.reason = f"NIXL {gds[0]} from {gds[1]} memory"
    else:
        if "POSIX" not in agent.get_plugin_list():
            raise NixlUnavailable(f"this nixl has no POSIX plugin (plugins: {', '.join(agent.get_plugin_list())})")
        try:
            agent.create_backend("POSIX", {})
        except errors as e:
            raise NixlUnavailable(f"nixl's POSIX backend could not be created ({e})") from e
        engine = NixlIO(agent, "POSIX")
        engine.reason = f"NIXL POSIX backend, O_DIRECT; {gds_reason}"
    try:
        engine.probe(directory)
    except (OSError, ChunkRejected) as e:
        engine.close()
        raise NixlUnavailable(f"a probe write through nixl's {engine.backend} backend failed ({e})") from e
    return engine


def _gds(agent, chunks_on_device: bool, errors):
    """``((backend, device), "")`` where GDS moves device chunks here, else ``(None, why not)``.

    GDS is only created when the chunks are on the device: creating it opens
    the cuFile driver, which a tier handed host memory has no use for.
    """
    plugins = [b for b in GDS_BACKENDS if b in agent.get_plugin_list()]
    if not plugins:
        return None, "GDS: no GDS plugin in this nixl"
    try:
        ctypes.CDLL("libcufile.so.0")
    except OSError:
        return None, "GDS: libcufile.so.0 not found"
    if not chunks_on_device:
        return None, "GDS not used: chunks are staged in host memory, POSIX writes them without a device round trip"
    import torch

    if torch.version.hip or not torch.cuda.is_available():
        return None, "GDS: no CUDA device visible"
    for backend in plugins:
        try:
            agent.create_backend(backend, {})
            return (backend, torch.device("cuda", torch.cuda.current_device())), ""
        except errors as e:
            reason = f"GDS: {backend} could not be created ({e})"
    return None, reason


def _nixl_errors() -> tuple[type[BaseException], ...]:
    """NIXL's exception classes (all plain ``Exception`` subclasses in its bindings)."""
    bindings = importlib.import_module("nixl._bindings")
    found = tuple(v for v in vars(bindings).values() if isinstance(v, type) and issubclass(v, Exception))
    return found or (Exception,)


class NixlIO:
    """Chunk files through loopback NIXL transfers between a registered staging buffer and the file."""

    direct = True  # every file is opened O_DIRECT

    def __init__(self, agent, backend: str = "POSIX", device=None, min_rate: float = 50e6, timeout_s: float = 10.0):
        self.agent, self.backend = agent, backend
        self.name = f"nixl-{backend.lower().replace('_', '-')}"
        self.reason = ""
        self._device = device  # None: host staging (mmap); a torch.device: a tensor there
        self._mem = "DRAM" if device is None or device.type == "cpu" else "VRAM"
        self._errors = _nixl_errors()
        self._local = threading.local()  # .region: (buffer, address, size, registration, device id)
        self._host = HostStaging()  # headers read, and the host copy of a device payload
        self._lock = threading.Lock()
        self._registered: list = []  # every registered staging region, for close()
        self._abandoned: list = []  # regions a timed-out transfer may still touch: never reused nor freed
        self.min_rate, self.timeout_s = min_rate, timeout_s  # a transfer may take timeout_s + bytes / min_rate

    def write(self, path: str, header: bytes, payload) -> None:
        """Write ``header`` + ``payload`` (padded) to ``path`` atomically."""
        view = memoryview(payload).cast("B") if memoryview(payload).format != "B" else memoryview(payload)
        total = HEADER_SIZE + aligned(len(view))
        buf, addr = self._staged(total)
        host = buf if self._device is None else self._host.get(total)
        host[:HEADER_SIZE] = header
        host[HEADER_SIZE : HEADER_SIZE + len(view)] = view
        host[HEADER_SIZE + len(view) : total] = bytes(total - HEADER_SIZE - len(view))
        if self._device is not None:
            self._to_device(buf, host, total)
        with new_file(path, os.O_DIRECT) as fd:
            self._move("WRITE", fd, 0, total, addr)
            if os.fstat(fd).st_size != total:  # NIXL reports short I/O as an error; stay defensive
                raise OSError(errno.ENOSPC, f"short write ({os.fstat(fd).st_size} of {total} bytes)", path)

    def read(self, path: str, expected_key: str) -> tuple[ChunkHeader, memoryview]:
        """The verified header and host payload of ``path`` (valid until this thread's next read).

        Raises:
            ChunkRejected: the file is not a whole, intact chunk of ``expected_key``.
            OSError: the file cannot be read (missing, permissions, I/O or NIXL error).
        """
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            header = read_header(fd, self._host.get(HEADER_SIZE), expected_key)  # the file is long enough
            size = aligned(header.payload_len)
            buf, addr = self._staged(HEADER_SIZE + size)  # the write's layout: the payload at 4096
            if size:
                self._move("READ", fd, HEADER_SIZE, size, addr + HEADER_SIZE)
        finally:
            os.close(fd)
        if self._device is None:
            payload = buf[HEADER_SIZE : HEADER_SIZE + header.payload_len]
        else:
            payload = self._host.get(header.payload_len)
            self._from_device(payload, buf, header.payload_len)
        check_payload(header, payload)
        return header, payload

    def probe(self, directory: str) -> None:
        """One block written and read back through NIXL, so a broken setup fails here, not per chunk."""
        path = os.path.join(directory, f".kvplugin-nixl-probe-{uuid.uuid4().hex}")
        block = os.urandom(ALIGN)
        try:
            self.write(path, encode_header(ChunkHeader("probe", "uint8", (ALIGN,), "", ALIGN, crc32c(block))), block)
            if bytes(self.read(path, "probe")[1]) != block:
                raise OSError(errno.EIO, "the probe block read back different bytes")
        finally:
            if os.path.exists(path):
                os.unlink(path)

    def close(self) -> None:
        """Deregister every staging buffer (the agent goes with its last reference)."""
        with self._lock:
            regions, self._registered = self._registered, []
        for registration in regions:
            try:
                self.agent.deregister_memory(registration, backends=[self.backend])
            except self._errors:
                pass  # closing anyway: the process's memory goes with it

    # -- staging and transfers ----------------------------------------------

    def _staged(self, nbytes: int):
        """This thread's registered buffer (page-aligned, ≥ ``nbytes``) and its address."""
        region = getattr(self._local, "region", None)
        if region is None or region[2] < nbytes:
            if region is not None:
                with self._lock:
                    self._registered.remove(region[3])
                self._nixl(self.agent.deregister_memory, region[3], backends=[self.backend])
            size = max(aligned(nbytes), ALIGN)
            if self._device is None:
                raw = mmap.mmap(-1, size)  # anonymous mappings are page-aligned
                buf, addr, dev = memoryview(raw), ctypes.addressof(ctypes.c_char.from_buffer(raw)), 0
            else:
                import torch

                whole = torch.empty(size + ALIGN, dtype=torch.uint8, device=self._device)
                skip = -whole.data_ptr() % ALIGN
                buf = whole[skip : skip + size]
                addr, dev = buf.data_ptr(), self._device.index or 0
            registration = self._nixl(self.agent.register_memory, [(addr, size, dev, "")], self._mem,
                                      backends=[self.backend])
            with self._lock:
                self._registered.append(registration)
            region = self._local.region = (buf, addr, size, registration, dev)
        return region[0], region[1]

    def _move(self, op: str, fd: int, offset: int, size: int, addr: int) -> None:
        """Move ``size`` bytes between staging at ``addr`` and the file at ``offset``; bounded, errors as OSError."""
        agent, backends, dev = self.agent, [self.backend], self._local.region[4]
        file_reg = self._nixl(agent.register_memory, [(offset, size, fd, "")], "FILE", backends=backends)
        try:
            handle = self._nixl(agent.initialize_xfer, op, agent.get_xfer_descs([(addr, size, dev)], self._mem),
                                agent.get_xfer_descs([(offset, size, fd)], "FILE"), agent.name, backends=backends)
            try:
                self._wait(op, handle, time.monotonic() + self.timeout_s + size / self.min_rate)
            finally:
                try:
                    handle.release()
                except self._errors:  # still in flight and not cancellable: the handle leaks with its region
                    self._abandon()
        finally:
            self._nixl(agent.deregister_memory, file_reg, backends=backends)

    def _wait(self, op: str, handle, deadline: float) -> None:
        state, delay = self._nixl(self.agent.transfer, handle), 0.0
        while state == "PROC":
            if time.monotonic() > deadline:
                self._abandon()
                raise OSError(errno.ETIMEDOUT, f"NIXL {op} did not finish in time")
            time.sleep(delay)  # releases the GIL: the other I/O threads and the engine run meanwhile
            delay = min(2 * delay + 1e-5, 5e-4)
            state = self._nixl(self.agent.check_xfer_state, handle)
        if state != "DONE":
            raise OSError(errno.EIO, f"NIXL {op} ended in state {state}")

    def _abandon(self) -> None:
        """Never reuse (nor free) this thread's region: a transfer NIXL could not stop may still write it."""
        region = getattr(self._local, "region", None)
        if region is not None:
            self._abandoned.append(region)
            self._local.region = None

    def _nixl(self, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except self._errors as e:
            name = getattr(call, "__name__", "call")
            raise OSError(errno.EIO, f"NIXL {name} failed ({type(e).__name__}: {e})") from e

    def _to_device(self, tensor, host: memoryview, size: int) -> None:
        import torch

        from vllm_kvplugin.devices import device_ops

        tensor[:size].copy_(torch.frombuffer(host, dtype=torch.uint8, count=size))
        device_ops(self._device.type).synchronize()  # NIXL DMAs from device memory: the copy must have landed

    def _from_device(self, host: memoryview, tensor, size: int) -> None:
        import torch

        if size:
            torch.frombuffer(host, dtype=torch.uint8, count=size).copy_(tensor[HEADER_SIZE : HEADER_SIZE + size])
