# SPDX-License-Identifier: Apache-2.0
"""Which engine moves a directory's chunk files: hipFile, O_DIRECT or buffered I/O, and why.

Runs in the vLLM worker process when the direct-I/O tier starts (and in
``vllm-kvplugin doctor``). The choice is logged once per process.

hipFile moves bytes between device memory and NVMe; it only pays off when the
chunks are in device memory. LMCache 0.5.6 hands storage plugins chunks in host
memory (its CPU allocator), so the tier asks with ``chunks_on_device=False`` and
O_DIRECT serves it without a host-to-device-to-disk round trip; the reason says
so, which is what an MI300X operator needs to see.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from vllm_kvplugin.storage.io import choose_io

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


def select_io(directory: str, chunks_on_device: bool):
    """hipFile where it can run and the chunks are in device memory, else O_DIRECT, else buffered I/O.

    Returns the engine (``PosixIO`` or ``HipFileIO``) and its :class:`IOChoice`.
    """
    from vllm_kvplugin.storage.hipfile_io import HipFileUnavailable, open_hipfile_io  # torch, optional hipfile

    posix = choose_io(directory)
    if not posix.direct:  # hipFile opens its files O_DIRECT too
        return posix, _announce(IOChoice(posix.name, f"O_DIRECT unsupported on {directory}; using buffered I/O"))
    try:
        engine = open_hipfile_io(directory)
    except HipFileUnavailable as e:
        return posix, _announce(IOChoice(posix.name, f"{e}; using O_DIRECT"))
    if not chunks_on_device:
        engine.close()
        return posix, _announce(IOChoice(
            posix.name, "hipFile available, but chunks are staged in host memory; "
            "O_DIRECT writes them without a device round trip"))
    return engine, _announce(IOChoice(engine.name, engine.reason))
