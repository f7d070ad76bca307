"""The ``monte-trio`` command line: ``keygen``, ``pubkey``, ``serve``, ``bench``, ``call``
and ``demo``, one module each.

Every subcommand prepares its options synchronously (reading key, passphrase and PSK files,
parsing trust specifications), so that bad usage is reported by argparse (exit status 2)
before any event loop starts, then runs one :func:`trio.run` (``main``), or awaits the
command in the event loop already running (``async_main``).

Exit statuses: 0 success (``serve`` stopped by SIGTERM included); 1 a
:class:`~monte_trio.MonteError` or :class:`OSError` (one line on stderr,
``monte-trio: error: ...``, no traceback) or a failed check; 2 bad usage (a missing
``serve --trust`` included); 130 interrupted (Ctrl-C, or SIGTERM for the commands other than
``serve``).

Text that a peer chose (a remote error's message, a refusal's reason) is printed with its
control characters and terminal escape sequences escaped (``monte_trio._util.printable``).

Modules, one job each:

=================  ==========================================================================
``_run``           the parser (one subparser per command), ``main`` and ``async_main``
``_keygen``        ``keygen``: create a key pair, save the private key
``_serve``         ``serve``: the echo server (its own signal handling), the ``echo`` handler
                   and the stream echo
``_bench``         ``bench``: drive an echo server, measure throughput and latency
``_stream_bench``  ``bench --mode stream``: bytes over one stream and back, SHA-256 checked
``_demo``          ``demo``: two peers calling each other, with its handlers and checks
``_options``       argument types, the help format, the security flags
``_security``      the security flags resolved: secret files, key, trust policy
``_interrupt``     SIGINT/SIGTERM as a cancellation for ``bench`` and ``demo`` (status 130)
``_errors``        expected errors described in one escaped line, and their exit status
``_output``        the program's name, stdout lines, warnings on stderr
``_stats``         the nearest-rank percentile shared with ``benchmarks/``
=================  ==========================================================================
"""

from __future__ import annotations

from ._run import async_main, build_parser, main
from ._stats import percentile

__all__ = ["async_main", "build_parser", "main", "percentile"]
