"""How a failed command ends: the expected errors, described in one escaped line.

An expected error (a :class:`~monte_trio.MonteError`, an :class:`OSError` or a failed
check, :class:`CommandFailed`) is printed as one line on stderr,
``monte-trio: error: ...``, with no traceback: exit status 1. Anything else is a bug and
keeps its traceback. Text a peer chose is escaped (``monte_trio._util.printable``), so it
cannot drive the terminal.
"""

from __future__ import annotations

import os
import sys

from .._exceptions import KeyFileError, MonteError
from .._util import printable
from ._output import PROG

__all__ = ["EXPECTED_ERRORS", "CommandFailed", "describe", "exit_status"]


class CommandFailed(Exception):
    """A check made by a subcommand failed (exit status 1)."""


EXPECTED_ERRORS = (MonteError, OSError, CommandFailed)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and inner and all(isinstance(e, BaseException) for e in inner):
        return [leaf for e in inner for leaf in _leaves(e)]
    return [exc]


def _os_causes(exc: BaseException) -> list[str]:
    """The system errors (``Connection refused``...) behind ``exc``, each named once.

    trio reports a failed connect as ``OSError("all attempts to connect ... failed")`` whose
    ``__cause__`` groups one error per address tried; a library error may wrap that again.
    """
    found: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending and len(seen) < 100:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            reason = os.strerror(current.errno)
            if reason not in found:
                found.append(reason)
        inner = getattr(current, "exceptions", None)
        if isinstance(inner, tuple):
            pending.extend(e for e in inner if isinstance(e, BaseException))
        if current.__cause__ is not None:
            pending.append(current.__cause__)
        elif current.__context__ is not None and not current.__suppress_context__:
            pending.append(current.__context__)
    return found


def describe(exc: BaseException) -> str:
    """One line for ``exc``: its message, the system errors behind it, escaped."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    # A key file error already says what happened to the file in its own words.
    causes = [] if isinstance(exc, KeyFileError) else _os_causes(exc)
    missing = [reason for reason in causes if reason not in text]
    if missing:
        text = f"{text} ({'; '.join(missing)})"
    return printable(text)


def exit_status(exc: BaseException) -> int | None:
    """Report ``exc`` (maybe a group) on stderr and return the exit status.

    Returns:
        130 if ``exc`` is only keyboard interrupts, 1 if it is only expected errors (and
        keyboard interrupts), after printing one line on stderr; ``None`` for anything
        else, which the caller re-raises.
    """
    leaves = _leaves(exc)
    if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    if all(isinstance(leaf, (*EXPECTED_ERRORS, KeyboardInterrupt)) for leaf in leaves):
        first = next(leaf for leaf in leaves if isinstance(leaf, EXPECTED_ERRORS))
        print(f"{PROG}: error: {describe(first)}", file=sys.stderr, flush=True)
        return 1
    return None
