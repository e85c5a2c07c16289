# SPDX-License-Identifier: Apache-2.0
"""Which engine moves a directory's chunk files: hipFile, O_DIRECT or buffered I/O, and why.

Runs in the vLLM worker process when the direct-I/O tier starts (and in
``vllm-kvplugin doctor``). The choice is logged once per process.

hipFile moves bytes between device memory and NVMe; it only pays off when the
chunks are in device memory. LMCache 0.5.6 hands storage plugins chunks in host
memory (its CPU allocator), so the tier asks with ``chunks_on_device=False`` and
O_DIRECT serves it without a host-to-device-to-disk round trip; the reason says
so, which is what an MI300X operator needs to see.

``kvplugin.directio.engine`` overrides ``auto``: ``posix``, ``nixl`` (NIXL's
POSIX backend, or GDS for chunks on device) or ``hipfile`` (used even for host
chunks, staged through device memory). An engine that cannot run here falls
back to O_DIRECT with the reason logged: the server never fails for it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from vllm_kvplugin.storage.io import choose_io
from vllm_kvplugin.storage.settings import ENGINE_KEY

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IOChoice:
    """Which engine moves a directory's chunk files, and why (for the log and ``doctor``)."""

    engine: str
    reason: str


@functools.cache
def _announce(choice: IOChoice) -> IOChoice:
    logger.info("chunk files: %s (%s)", choice.engine, choice.reason)
    return choice


def select_io(directory: str, chunks_on_device: bool, engine: str = "auto"):
    """The engine ``engine`` asks for (``auto``: hipFile where it can run and the chunks are in
    device memory), else O_DIRECT, else buffered I/O.

    Returns the engine (``PosixIO``, ``NixlIO`` or ``HipFileIO``) and its :class:`IOChoice`.
    """
    posix = choose_io(directory)
    if not posix.direct:  # hipFile and NIXL open their files O_DIRECT too
        why = "" if engine in ("auto", "posix") else f" ({engine} needs it)"
        return posix, _announce(IOChoice(posix.name, f"O_DIRECT unsupported on {directory}{why}; using buffered I/O"))
    if engine == "posix":
        return posix, _announce(IOChoice(posix.name, f"{ENGINE_KEY}=posix: O_DIRECT"))
    if engine == "nixl":
        from vllm_kvplugin.storage.nixl_io import NixlUnavailable, open_nixl_io  # optional nixl

        try:
            io = open_nixl_io(directory, chunks_on_device)
        except NixlUnavailable as e:
            return posix, _announce(IOChoice(posix.name, f"{e}; using O_DIRECT"))
        return io, _announce(IOChoice(io.name, io.reason))
    from vllm_kvplugin.storage.hipfile_io import HipFileUnavailable, open_hipfile_io  # torch, optional hipfile

    try:
        io = open_hipfile_io(directory)
    except HipFileUnavailable as e:
        return posix, _announce(IOChoice(posix.name, f"{e}; using O_DIRECT"))
    if not chunks_on_device and engine != "hipfile":
        io.close()
        return posix, _announce(IOChoice(
            posix.name, "hipFile available, but chunks are staged in host memory; "
            "O_DIRECT writes them without a device round trip"))
    if not chunks_on_device:
        return io, _announce(IOChoice(io.name, f"{io.reason}; {ENGINE_KEY}=hipfile: host chunks staged through "
                                                "device memory"))
    return io, _announce(IOChoice(io.name, io.reason))
