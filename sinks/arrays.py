"""Array sink: hands the stream to Python code as numpy int16 blocks.

A bounded, lossless, back-pressured queue between the fan-out and a consumer: ``write`` awaits
while ``max_blocks`` blocks are waiting, the consumer iterates with ``async for`` (or calls
:meth:`ArraySink.read_all`), and iteration ends once the sink is closed and the queue is
empty. The queue is the engine's one channel type (:class:`tts_stream.channel.Channel`,
bounded by a count of blocks here). Boundary: asyncio only; imports ``tts_stream.audio``,
``tts_stream.channel`` and ``tts_stream.errors``.
"""

from __future__ import annotations

import asyncio
import logging

import anyio
import numpy as np

from tts_stream.audio import PCM16
from tts_stream.channel import Channel
from tts_stream.errors import Timeout, UsageError

from ._base import BaseSink, SinkState

__all__ = ["ArraySink"]

log = logging.getLogger(__name__)


class ArraySink(BaseSink):
    """Async-iterable over the int16 blocks written to it (one block per frame).

    ``samples_played`` counts the samples the consumer has taken. ``drain()`` returns at once:
    the queue *is* this sink's output, so queued blocks count as delivered and stay readable
    after :meth:`aclose`. ``interrupt()`` drops the blocks not yet taken. A ``write`` that
    waits longer than ``write_timeout`` seconds for the consumer raises
    :class:`~tts_stream.errors.Timeout`.

    Blocks are read-only views when the frame's array was read-only (the usual case: frames
    decoded from immutable bytes), else copies, so producers may reuse their buffers.
    """

    def __init__(
        self, *, max_blocks: int = 256, write_timeout: float = 60.0, name: str = "array"
    ) -> None:
        if max_blocks < 1:
            raise UsageError("max_blocks must be at least 1")
        super().__init__(name=name)
        self.max_blocks = max_blocks
        self._write_timeout = write_timeout
        self._blocks: Channel[PCM16] = Channel(max_blocks)

    # -- producer side (the Sink protocol) ------------------------------------------------

    async def _write(self, samples: PCM16) -> None:
        block = samples if not samples.flags.writeable else samples.copy()
        try:
            self._blocks.send_nowait(block)
            return
        except anyio.WouldBlock:
            pass
        except anyio.ClosedResourceError:
            raise self._state_error("write") from None
        try:
            async with asyncio.timeout(self._write_timeout):
                await self._blocks.send(block)  # the consumer makes room
        except TimeoutError:
            raise Timeout(f"the consumer of {self.name}", self._write_timeout) from None
        except anyio.ClosedResourceError:
            raise self._state_error("write") from None  # closed while waiting

    def _try_write(self, samples: PCM16) -> bool:
        # The state is OPEN (checked by write_nowait), so the channel is open for sending.
        try:
            self._blocks.send_nowait(samples if not samples.flags.writeable else samples.copy())
        except anyio.WouldBlock:
            return False
        return True

    async def _interrupt(self) -> int:
        dropped = sum(int(b.size) for b in self._blocks.clear()) // self.format.channels
        self._dropped_samples += dropped
        return self._samples_played

    async def _release(self) -> None:
        # Queued blocks stay readable, then iteration ends; a waiting writer is woken up.
        self._blocks.close_send()

    # -- consumer side ---------------------------------------------------------------------

    @property
    def queued_blocks(self) -> int:
        """Blocks written and not yet taken by the consumer."""
        return len(self._blocks)

    async def get(self) -> PCM16 | None:
        """The next block, or ``None`` once the sink is closed and empty.

        Waits for the producer: bound it with ``asyncio.timeout`` (or use :meth:`read_all`).
        One consumer at a time (a second concurrent ``get`` raises ``anyio.BusyResourceError``).
        """
        try:
            block = await self._blocks.receive()
        except anyio.EndOfStream:
            return None
        self._samples_played += int(block.size) // self.format.channels
        self._mark_first_sample()
        return block

    def __aiter__(self) -> ArraySink:
        return self

    async def __anext__(self) -> PCM16:
        block = await self.get()
        if block is None:
            raise StopAsyncIteration
        return block

    async def read_all(self, *, within: float = 60.0) -> PCM16:
        """Consume every block until the sink is closed; return them as one array.

        Raises :class:`~tts_stream.errors.Timeout` if the sink is not closed (and emptied)
        within ``within`` seconds.
        """
        if self._state is SinkState.NEW:
            raise UsageError(f"read_all() on sink {self.name!r} in state NEW")
        blocks: list[PCM16] = []
        try:
            async with asyncio.timeout(within):
                while (block := await self.get()) is not None:
                    blocks.append(block)
        except TimeoutError:
            raise Timeout(f"{self.name} to be closed", within) from None
        if not blocks:
            return np.zeros(0, np.int16)
        return np.concatenate(blocks)
