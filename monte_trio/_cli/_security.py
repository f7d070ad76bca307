"""The security options of ``serve`` and ``bench`` resolved: secret files, key, trust policy.

Secret files (a passphrase, a pre-shared key) are read before any event loop starts; one
that is unreadable, readable by others or malformed is a usage error (exit status 2) naming
the option. A key file that does not load is a :class:`~monte_trio.KeyFileError` (exit
status 1) whose message ends with the command-line fix.
"""

from __future__ import annotations

import argparse
import os
import shlex

import attrs

from .._exceptions import KeyFileError
from .._handshake import Handshake, MonteV1Handshake
from .._keys import Identity
from .._known_keys import KnownKeysFile
from .._secret_files import read_secret_file
from .._trust import AcceptAnyKey, PinnedKeys, TrustPolicy
from ._options import MONTE_V1, NATIVE, TRUST_CHOICES
from ._output import PROG, warn

__all__ = ["Security", "read_passphrase", "read_psk", "resolve_security"]

_PSK_SIZE = 32


_TRUST_FORMS = '"any", "pin:KEY[,KEY...]" or "tofu:FILE"'


def parse_trust(spec: str) -> TrustPolicy:
    """Build a trust policy from a command-line specification.

    Args:
        spec: one of

            * ``any``: :class:`AcceptAnyKey` (encryption without authentication);
            * ``pin:KEY[,KEY...]``: :class:`PinnedKeys` with those printable keys;
            * ``tofu:FILE``: :class:`KnownKeysFile` on ``FILE`` (a read-only file is in
              lockdown).

    Returns:
        The policy.

    Raises:
        ValueError: ``spec`` is none of these forms, or a pinned key is invalid.
    """
    text = spec.strip()
    kind, sep, arg = text.partition(":")
    if text == "any":
        return AcceptAnyKey()
    if sep and kind == "pin":
        parts = [part.strip() for part in arg.split(",")]
        if not any(parts):
            raise ValueError(f"trust {spec!r}: pin: needs at least one key; use {_TRUST_FORMS}")
        try:
            return PinnedKeys(part for part in parts if part)
        except ValueError as exc:
            raise ValueError(f"trust {spec!r}: {exc}") from exc
    if sep and kind == "tofu":
        if not arg.strip():
            raise ValueError(f"trust {spec!r}: tofu: needs a file name; use {_TRUST_FORMS}")
        return KnownKeysFile(arg.strip())
    raise ValueError(f"unknown trust policy {spec!r}; use {_TRUST_FORMS}")


def _read_secret_file(
    parser: argparse.ArgumentParser, option: str, path: str, *, what: str
) -> bytes:
    """Read a psk or passphrase file (a usage error if it is unreadable or not private)."""
    try:
        return read_secret_file(path, what=what)
    except KeyFileError as exc:
        parser.error(f"{option} {path}: {exc}")


def read_passphrase(parser: argparse.ArgumentParser, path: str | None) -> bytes | None:
    """The passphrase in ``path`` as bytes (one trailing newline dropped), or ``None``."""
    if path is None:
        return None
    data = _read_secret_file(parser, "--passphrase-file", path, what="passphrase file")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        parser.error(f"--passphrase-file {path}: the passphrase is empty")
    return data


def _decode_psk(data: bytes) -> bytes | None:
    if len(data) == _PSK_SIZE:
        return data
    text = data.strip()
    if len(text) == 2 * _PSK_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    return None


def read_psk(parser: argparse.ArgumentParser, path: str) -> bytes:
    """Read a pre-shared key file: 32 raw bytes, or 64 hexadecimal characters."""
    data = _read_secret_file(parser, "--psk", path, what="psk file")
    psk = _decode_psk(data)
    if psk is None:
        parser.error(
            f"--psk {path}: a pre-shared key file holds exactly {_PSK_SIZE} raw bytes or "
            f"{2 * _PSK_SIZE} hexadecimal characters (optionally followed by a newline); "
            f"this one holds {len(data)} bytes"
        )
    return psk


@attrs.frozen
class Security:
    """The handshake options of ``serve`` and ``bench``, resolved from the command line."""

    profile: str
    handshake: Handshake | None  # None: the native profile, built from the fields below
    identity: Identity | None
    trust: TrustPolicy | None
    psk: bytes | None


def _identity_hint(path: str, message: str, passphrase_file: str | None) -> str:
    """The command-line fix for a key file that did not load (``""`` if none applies)."""
    text = message.lower()
    if "chmod" in text:  # the message already says what to run
        return ""
    if not os.path.lexists(path):
        if f"{PROG} keygen" in text:
            return ""
        return f"; create one with `{PROG} keygen {shlex.quote(path)}`"
    if "not encrypted" in text and passphrase_file is not None:
        return "; drop --passphrase-file"
    if "passphrase" in text or "encrypt" in text or "decrypt" in text:
        if passphrase_file is None:
            return "; pass --passphrase-file FILE (a file holding the passphrase, mode 0600)"
        return f"; check the passphrase in --passphrase-file {passphrase_file}"
    if f"{PROG} keygen" not in text and ("x25519" in text or "pem" in text or "pkcs" in text):
        return f"; is it the right file? `{PROG} keygen FILE` creates a key"
    return ""


def _load_identity(path: str, passphrase: bytes | None, passphrase_file: str | None) -> Identity:
    """:meth:`Identity.load`; its :class:`KeyFileError` names the flag that fixes it."""
    try:
        return Identity.load(path, passphrase=passphrase)
    except KeyFileError as exc:
        hint = _identity_hint(path, str(exc), passphrase_file)
        raise KeyFileError(f"--identity {path}: {exc}{hint}") from exc


def resolve_security(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *, who: str
) -> Security:
    """Check the security options together, read their files and load the key.

    Args:
        parser: the command's parser, for usage errors.
        args: the parsed command line.
        who: the peer being authenticated, ``"client"`` (``serve``: ``--trust`` required)
            or ``"server"`` (``bench``: any key accepted, with a warning, by default).

    Raises:
        SystemExit: a usage error (status 2), through ``parser.error``.
        KeyFileError: the ``--identity`` file did not load.
    """
    if args.profile == MONTE_V1:
        given = [
            option
            for option, value in (
                ("--identity", args.identity),
                ("--passphrase-file", args.passphrase_file),
                ("--trust", args.trust),
                ("--psk", args.psk),
            )
            if value is not None
        ]
        if given:
            parser.error(
                f"{', '.join(given)}: only for the native profile; monte-v1 authenticates nobody"
            )
        warn(
            "profile monte-v1 authenticates nobody and is weakly encrypted; use it only to "
            "talk to Go monte"
        )
        return Security(MONTE_V1, MonteV1Handshake(), None, None, None)
    if args.trust is None and who == "client":
        parser.error(
            "the native profile needs --trust, the policy deciding which clients may "
            "connect: " + TRUST_CHOICES.format(who=who)
        )
    if args.passphrase_file is not None and args.identity is None:
        parser.error("--passphrase-file needs --identity")
    passphrase = read_passphrase(parser, args.passphrase_file)
    psk = read_psk(parser, args.psk) if args.psk is not None else None
    if args.trust is None:
        warn(
            f"no --trust given: accepting any {who} key, so {who}s are not authenticated "
            "(the traffic is still encrypted); pass --trust pin:KEY or --trust tofu:FILE"
        )
        trust: TrustPolicy = AcceptAnyKey()
    else:
        try:
            trust = parse_trust(args.trust)
        except ValueError as exc:
            parser.error(f"--trust: {exc}")
        if isinstance(trust, AcceptAnyKey):
            warn(
                f"--trust any: accepting any {who} key, so {who}s are not authenticated "
                "(the traffic is still encrypted)"
            )
    identity = (
        _load_identity(args.identity, passphrase, args.passphrase_file)
        if args.identity is not None
        else Identity.generate()
    )
    return Security(NATIVE, None, identity, trust, psk)
