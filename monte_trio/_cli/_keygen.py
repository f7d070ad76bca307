"""``monte-trio keygen PATH``: create a key pair, save its private key, print the public key."""

from __future__ import annotations

import argparse
import os

import trio

from .._keys import Identity
from ._errors import CommandFailed
from ._options import Job, add_command
from ._output import say
from ._security import read_passphrase

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keygen`` command and its options to ``commands``."""
    keygen = add_command(
        commands,
        "keygen",
        summary="generate a static key pair and save its private key",
        description="Generate a static X25519 key pair, write the private key to PATH "
        "(mode 0600) and print the public key to give to peers.",
        run=run,
    )
    keygen.add_argument("path", metavar="PATH", help="where to write the private key (0600)")
    keygen.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="encrypt the key with the passphrase in FILE, which must be readable by its "
        "owner only (default: the key is not encrypted)",
    )
    keygen.add_argument(
        "--force", action="store_true", help="replace an existing PATH (default: refuse)"
    )


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Job:
    """Read the passphrase file; return the work: write a new private key to ``args.path``
    (in a worker thread: encrypting the key takes a deliberately slow key derivation)."""
    passphrase = read_passphrase(parser, args.passphrase_file)

    def write() -> Identity:
        if os.path.lexists(args.path) and not args.force:
            raise CommandFailed(f"{args.path} already exists; pass --force to replace it")
        identity = Identity.generate()
        identity.save(args.path, passphrase=passphrase, overwrite=args.force)
        return identity

    async def keygen() -> int:
        """Write the key, say where and what its public key is; return 0.

        Raises:
            CommandFailed: the path exists and ``--force`` was not given.
        """
        identity = await trio.to_thread.run_sync(write)
        encrypted = "encrypted with the passphrase" if passphrase is not None else "unencrypted"
        say(f"wrote private key to {args.path} (mode 0600, {encrypted})")
        say(f"public key: {identity.public_key}")
        return 0

    return keygen
