"""Small helpers shared by the trio-facing modules."""

from __future__ import annotations

import unicodedata
from abc import ABCMeta
from typing import Any, NoReturn, TypeVar

import trio

__all__ = [
    "PEER_TEXT_LIMIT",
    "ConflictDetector",
    "NoPublicConstructor",
    "escape_peer_text",
    "printable",
]

_T = TypeVar("_T")

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class NoPublicConstructor(ABCMeta):
    """The metaclass of classes users get from the library and never construct (as
    trio's ``Nursery``): calling the class raises :exc:`TypeError` saying how to get one
    (the class's ``_get_one_with``); the library makes them with ``_create``."""

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        how = getattr(cls, "_get_one_with", "the function that returns one")
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor: use {how}"
        )

    def _create(cls: type[_T], *args: Any, **kwargs: Any) -> _T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc,no-any-return]


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


def printable(text: str) -> str:
    r"""``text`` with every control, format, private-use, unassigned and separator
    character escaped: ESC becomes ``\x1b``, a right-to-left override ``\u202e``.

    Use it on any text a peer chose before printing or logging it: a terminal would
    otherwise act on the escape sequences in it (clear the screen, move the cursor,
    retitle the window), and bidirectional overrides would disguise it. The result is
    printable, so escaping it again changes nothing.
    """
    if text.isprintable():
        return text
    out = []
    for char in text:
        if unicodedata.category(char) in _UNSAFE_CATEGORIES:
            code = ord(char)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def escape_peer_text(text: str, limit: int = PEER_TEXT_LIMIT) -> str:
    """Make text a peer sent safe to put in an exception message, a log or a terminal.

    It is :func:`printable`, cut to ``limit`` characters of the original with a note
    saying so.

    Args:
        text: the peer's text.
        limit: how many characters of ``text`` to keep.

    Returns:
        A printable, single-line rendering of ``text``.
    """
    if len(text) <= limit:
        return printable(text)
    return printable(text[:limit]) + f"... [cut at {limit} characters]"
