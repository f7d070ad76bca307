"""What every command prints and how: the program's name, stdout lines, warnings.

Results go to stdout (flushed at once, so a supervising process sees each line as it
happens); warnings and errors go to stderr, each prefixed with the program's name.
"""

from __future__ import annotations

import sys

__all__ = ["PROG", "format_address", "say", "warn"]

PROG = "monte-trio"


def say(*parts: object) -> None:
    """Print one line on stdout and flush it."""
    print(*parts, flush=True)


def warn(message: str) -> None:
    """Print ``monte-trio: warning: message`` on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def format_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
