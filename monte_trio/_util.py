"""Small helpers shared by the trio-facing modules."""

from __future__ import annotations

import trio

__all__ = ["ConflictDetector"]


class ConflictDetector:
    """Raises :class:`trio.BusyResourceError` when two tasks use one resource at once.

    As trio's own streams do: ``with detector:`` around each send (or receive).
    """

    __slots__ = ("_held", "_msg")

    def __init__(self, msg: str) -> None:
        self._msg = msg
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._msg)
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False
