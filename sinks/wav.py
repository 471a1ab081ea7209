"""WAV file sink: PCM16 appended to a RIFF/WAVE file that stays valid after every write.

Each write appends the samples and then patches the RIFF and ``data`` chunk sizes in the
44-byte header and flushes to the OS, so a crash or a lost connection leaves a playable file
holding every sample received so far. ``drain()`` optionally ``fsync``s. Boundary: file I/O
only; imports ``tts_stream.audio`` and ``tts_stream.errors``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from typing import BinaryIO

from tts_stream.audio import PCM16, AudioFormat
from tts_stream.errors import UsageError

from ._base import BaseSink

__all__ = ["WavSink"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")  # canonical 44-byte PCM header
_RIFF_SIZE_AT = 4  # offset of the RIFF chunk size (file size - 8)
_DATA_SIZE_AT = 40  # offset of the data chunk size
_MAX_DATA = 0xFFFFFFFF - (_HEADER.size - 8)  # RIFF sizes are 32-bit
_WAVE_FORMAT_PCM = 1


class WavSink(BaseSink):
    """Write the stream to a 16-bit PCM WAV file at ``path``.

    The file is created (truncated) by :meth:`open`, with the stream's rate and channel count.
    ``fsync=True`` makes :meth:`drain` (and so :meth:`aclose`) force the data to disk.
    ``interrupt()`` has nothing queued to drop: it returns the samples written.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = False, name: str | None = None
    ) -> None:
        self.path = os.fspath(path)
        super().__init__(name=name or f"wav:{self.path}")
        self._fsync = fsync
        self._file: BinaryIO | None = None
        self._data_bytes = 0

    async def _open(self, fmt: AudioFormat) -> None:
        # Opening and writing a 44-byte header are page-cache operations: inline is cheaper
        # than a thread hop.
        self._file = open(self.path, "wb")  # noqa: ASYNC230 - see comment above
        block_align = 2 * fmt.channels
        self._file.write(
            _HEADER.pack(
                b"RIFF", _HEADER.size - 8, b"WAVE",
                b"fmt ", 16, _WAVE_FORMAT_PCM, fmt.channels, fmt.sample_rate,
                fmt.sample_rate * block_align, block_align, 16,
                b"data", 0,
            )
        )
        self._file.flush()
        self._data_bytes = 0

    async def _write(self, samples: PCM16) -> None:
        self._append(samples)

    def _try_write(self, samples: PCM16) -> bool:
        # _write never awaits: the non-blocking path is the same code.
        self._append(samples)
        return True

    def _append(self, samples: PCM16) -> None:
        assert self._file is not None
        data = samples.astype("<i2", copy=False).tobytes()
        if self._data_bytes + len(data) > _MAX_DATA:
            raise UsageError(f"{self.name}: a WAV file holds at most 4 GiB of audio")
        # Writes are a few KB per delta into the page cache (microseconds); a worker thread
        # per write would cost more than the write itself, so this stays on the loop.
        f = self._file
        try:
            f.write(data)
            f.flush()
        except BaseException:
            # e.g. disk full: cut what part of the frame got in, so that the header's sizes
            # and the file agree again (and a later write does not append after garbage)
            f.seek(_HEADER.size + self._data_bytes)
            f.truncate()
            raise
        self._data_bytes += len(data)
        f.seek(_RIFF_SIZE_AT)
        f.write(struct.pack("<I", _HEADER.size - 8 + self._data_bytes))
        f.seek(_DATA_SIZE_AT)
        f.write(struct.pack("<I", self._data_bytes))
        f.seek(0, os.SEEK_END)
        f.flush()  # to the OS: the file is valid even if this process dies now
        self._mark_first_sample()
        self._samples_played += int(samples.size) // self.format.channels

    async def _drain(self) -> None:
        if self._fsync and self._file is not None:
            # fsync can block for a long time on a busy disk: that one goes to a thread.
            await asyncio.to_thread(os.fsync, self._file.fileno())

    async def _interrupt(self) -> int:
        return self._samples_played

    async def _release(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            f.close()
            log.debug("%s: closed after %d data bytes", self.name, self._data_bytes)
