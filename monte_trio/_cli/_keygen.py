"""``monte-trio keygen PATH``: create a key pair, save its private key, print the public key;
``monte-trio keygen --psk FILE``: create a pre-shared key file."""

from __future__ import annotations

import argparse
import os
import secrets

import trio

from .._keys import Identity
from .._secret_files import write_private_file
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
        "(mode 0600) and print the public key to give to peers; or, with --psk FILE, "
        "write a new pre-shared key (32 random bytes as 64 hexadecimal characters, mode "
        "0600) for --psk of serve, bench and call.",
        run=run,
    )
    keygen.add_argument(
        "path", metavar="PATH", nargs="?", help="where to write the private key (0600)"
    )
    keygen.add_argument(
        "--psk", metavar="FILE", help="write a new pre-shared key to FILE (0600) instead"
    )
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
    if (args.path is None) == (args.psk is None):
        parser.error("give PATH (a key pair) or --psk FILE (a pre-shared key), one of them")
    if args.psk is not None:
        if args.passphrase_file is not None:
            parser.error("--passphrase-file encrypts key pairs, not pre-shared keys")
        return _psk_job(args.psk, args.force)
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


def _psk_job(path: str, force: bool) -> Job:
    def write() -> None:
        if os.path.lexists(path) and not force:
            raise CommandFailed(f"{path} already exists; pass --force to replace it")
        write_private_file(path, secrets.token_bytes(32).hex().encode() + b"\n", overwrite=force)

    async def keygen_psk() -> int:
        """Write the pre-shared key file; say where; return 0."""
        await trio.to_thread.run_sync(write)
        say(f"wrote pre-shared key to {path} (mode 0600); give it to both sides with --psk")
        return 0

    return keygen_psk
