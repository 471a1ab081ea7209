"""A base for async context managers that keep everything they own on one AsyncExitStack.

Subclasses fill ``self._stack`` in ``__aenter__``; leaving the block, or ``aclose()``, unwinds
it exactly once (idempotent), in reverse order of acquisition.
"""

from __future__ import annotations

import contextlib
from types import TracebackType

__all__ = ["StackResource"]


class StackResource:
    """Idempotent ``aclose()`` over one :class:`contextlib.AsyncExitStack`."""

    _stack: contextlib.AsyncExitStack | None = None
    _closed: bool = False

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release everything acquired, in reverse order. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._stack is not None:
            await self._stack.aclose()
