"""Small helpers shared by the trio-facing modules."""

from __future__ import annotations

import unicodedata

import trio

__all__ = ["PEER_TEXT_LIMIT", "ConflictDetector", "escape_peer_text"]

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


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


PEER_TEXT_LIMIT = 1024
"""The most characters of peer-supplied text :func:`escape_peer_text` keeps."""


def escape_peer_text(text: str, limit: int = PEER_TEXT_LIMIT) -> str:
    """Make text a peer sent safe to put in an exception message, a log or a terminal.

    Control characters (C0, DEL, C1, including ESC, so no terminal escape sequence
    survives), format characters (bidirectional overrides, zero-width characters),
    unassigned and private-use code points and line or paragraph separators are replaced
    by their Python escape (``\\x1b``, ``\\u202e``); the result is cut to ``limit``
    characters of the original, with a note saying so.

    Args:
        text: the peer's text.
        limit: how many characters of ``text`` to keep.

    Returns:
        A printable, single-line rendering of ``text``.
    """
    out = [
        char.encode("unicode_escape").decode("ascii")
        if char == "\\" or unicodedata.category(char) in _UNSAFE_CATEGORIES
        else char
        for char in text[:limit]
    ]
    if len(text) > limit:
        out.append(f"... [cut at {limit} characters]")
    return "".join(out)
