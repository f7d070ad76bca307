"""``monte-trio pubkey KEYFILE``: print the public key of a private key file."""

from __future__ import annotations

import argparse

import trio

from .._keys import Identity
from ._options import Job, add_command
from ._output import say
from ._security import read_passphrase

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``pubkey`` command and its options to ``commands``."""
    pubkey = add_command(
        commands,
        "pubkey",
        summary="print the public key of a private key file",
        description="Load the private key in KEYFILE (as written by keygen) and print its "
        "public key, the form peers pin (--trust pin:KEY).",
        run=run,
    )
    pubkey.add_argument("keyfile", metavar="KEYFILE", help="the private key file")
    pubkey.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="the passphrase of KEYFILE, if it is encrypted; FILE must be readable by its "
        "owner only (default: the key is not encrypted)",
    )


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Job:
    """Read the passphrase file; return the work: load the key, print its public key."""
    passphrase = read_passphrase(parser, args.passphrase_file)

    async def pubkey() -> int:
        """Print the public key; return 0.

        Raises:
            KeyFileError: the file did not load.
        """
        identity = await trio.to_thread.run_sync(
            lambda: Identity.load(args.keyfile, passphrase=passphrase)
        )
        say(str(identity.public_key))
        return 0

    return pubkey
