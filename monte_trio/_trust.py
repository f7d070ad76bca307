"""Trust policies: which peers' static keys a connection accepts.

This module owns the :class:`TrustPolicy` interface, its three implementations and the
known-keys file format:

* :class:`AcceptAnyKey`: accepts every key. Encryption without authentication; it must be
  chosen by name.
* :class:`PinnedKeys`: accepts exactly a fixed set of keys.
* :class:`KnownKeysFile`: trust on first use, in the style of rpc25519's
  ``known_server_keys`` / ``known_client_keys`` files. A writable file learns new keys; a
  read-only file (no write permission bits) is in lockdown and refuses unknown keys.

:func:`parse_trust` turns a command-line specification into a policy.

Theory of operation of :class:`KnownKeysFile`
---------------------------------------------
Each line of the file is ``<printable key> <name>``. A client verifying a server records the
server's key under the server's ``host:port``; a server verifying a client records the
client's key under ``*`` (client ports are ephemeral, so the address says nothing). Like
SSH's ``known_hosts``, a client that already knows a key for ``host:port`` refuses any other
key for it, even while learning: a changed server key is what a man-in-the-middle looks
like, so only the operator may accept it, by editing the file.

The file is re-read on every verification, so edits take effect without a restart; it is
small and verification happens once per handshake. The read, the decision and any append
run in a worker thread, under a :class:`trio.Lock`, so that concurrent handshakes presenting
the same new key record it once. The lock is per :class:`KnownKeysFile` object: several
objects (or processes) learning into one file at the same moment may record a key twice,
which is harmless.
"""

from __future__ import annotations

import abc
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import attrs
import trio

from ._exceptions import KeyFileError, PeerRejected
from ._keys import PublicKey

__all__ = [
    "AcceptAnyKey",
    "KnownKey",
    "KnownKeysFile",
    "PinnedKeys",
    "TrustPolicy",
    "parse_trust",
]

logger = logging.getLogger(__name__)

ANY_PEER = "*"
"""The name under which a known-keys file lists a key accepted from any peer."""

_HEADER = """\
# monte_trio known keys: one "<public key> <name>" entry per line.
# <name> is "host:port" for a server's key learned by a client, or "*" for a key
# accepted from any peer (what a server records for its clients).
# Blank lines and lines starting with "#" are ignored.
# While this file is writable, new keys are learned (appended). Remove its write
# permission (chmod a-w) to lock it down: unknown keys are then refused.
"""


class TrustPolicy(abc.ABC):
    """Decides whether a peer's static public key is acceptable.

    The handshake calls :meth:`verify` once it knows the peer's static key, before any
    application data flows.
    """

    @abc.abstractmethod
    async def verify(self, key: PublicKey, *, peer: str | None) -> None:
        """Accept ``key`` by returning, or refuse it by raising :class:`PeerRejected`.

        Args:
            key: the static public key the peer proved it holds.
            peer: ``"host:port"`` of the server when a client verifies the server's key;
                ``None`` when a server verifies a client's key (client ports are
                ephemeral, so the address identifies nothing).

        Raises:
            PeerRejected: the key is refused; ``public_key`` is its printable form.
            KeyFileError: the policy's file could not be read or written.
        """


@attrs.frozen
class AcceptAnyKey(TrustPolicy):
    """Accepts every key. **No authentication: encryption only.**

    A connection using this policy is protected against passive eavesdropping, but anyone
    able to intercept it (a man in the middle) can impersonate the peer. Use it for tests
    and demos, or where the network itself authenticates the peer; otherwise prefer
    :class:`PinnedKeys` or :class:`KnownKeysFile`. It is never a default: it must be chosen
    by name.
    """

    async def verify(self, key: PublicKey, *, peer: str | None) -> None:
        """Accept ``key``. See :meth:`TrustPolicy.verify`."""
        await trio.lowlevel.checkpoint()


def _to_key_set(keys: Iterable[PublicKey | str]) -> frozenset[PublicKey]:
    if isinstance(keys, (str, PublicKey)):
        raise TypeError(
            "PinnedKeys takes an iterable of keys; wrap a single key in a list: PinnedKeys([key])"
        )
    result = set()
    for key in keys:
        result.add(key if isinstance(key, PublicKey) else PublicKey.parse(key))
    return frozenset(result)


def _not_empty(
    instance: PinnedKeys, attribute: attrs.Attribute[frozenset[PublicKey]], value: object
) -> None:
    if not value:
        raise ValueError(
            "PinnedKeys needs at least one key (an empty set would refuse every peer)"
        )


@attrs.frozen
class PinnedKeys(TrustPolicy):
    """Accepts exactly the given keys, from any peer.

    Args:
        keys: the accepted keys, as :class:`PublicKey` objects or printable strings
            (parsed with :meth:`PublicKey.parse`).

    Raises:
        ValueError: ``keys`` is empty or a string is not a valid key.
    """

    keys: frozenset[PublicKey] = attrs.field(converter=_to_key_set, validator=_not_empty)

    async def verify(self, key: PublicKey, *, peer: str | None) -> None:
        """Accept ``key`` if it is pinned. See :meth:`TrustPolicy.verify`."""
        await trio.lowlevel.checkpoint()
        if key not in self.keys:
            who = f"server {peer}" if peer is not None else "client"
            raise PeerRejected(
                f"the {who} presented the key {key}, which is not one of the "
                f"{len(self.keys)} pinned key(s)",
                public_key=str(key),
            )


@attrs.frozen
class KnownKey:
    """One entry of a known-keys file.

    Attributes:
        key: the public key.
        name: ``"host:port"`` of the server it belongs to, or ``"*"`` for any peer.
        line: the line number (from 1) of the entry in the file.
    """

    key: PublicKey
    name: str
    line: int


def _check_peer(peer: str) -> None:
    if not peer or peer == ANY_PEER or any(c.isspace() for c in peer) or peer.startswith("#"):
        raise ValueError(f'peer must be "host:port", got {peer!r}')


def _valid_name(name: str) -> bool:
    if name == ANY_PEER:
        return True
    host, sep, port = name.rpartition(":")
    return bool(sep and host and port.isdigit())


def _same_name(a: str, b: str) -> bool:
    # Host names are case-insensitive; compare like SSH's known_hosts does.
    return a.lower() == b.lower()


@attrs.define(eq=False)
class KnownKeysFile(TrustPolicy):
    """Trust on first use, recorded in a known-keys file.

    The file holds one ``<printable key> <name>`` entry per line, where ``name`` is
    ``host:port`` (a server's key, learned by a client) or ``*`` (a key accepted from any
    peer, which is what a server records for its clients). Blank lines and lines starting
    with ``#`` are ignored.

    Verification:

    * A client (``peer="host:port"``): if the file lists keys for that name, the key must be
      one of them, **even in learn mode**: another key for a known server is refused as a
      possible man-in-the-middle (edit the file if the server's key really changed).
      Otherwise a key listed under ``*`` is accepted, and any other key is learned under
      ``host:port`` (learn mode) or refused (lockdown).
    * A server (``peer=None``): a key listed under any name is accepted; any other key is
      learned under ``*`` (learn mode) or refused (lockdown).

    Args:
        path: the known-keys file. It need not exist: in learn mode it is created (mode
            0600, with an explanatory header) when the first key is learned; in lockdown a
            missing file refuses every key.
        lockdown: ``True`` refuses unknown keys; ``False`` learns them (and fails with
            :class:`KeyFileError` if the file cannot be written); ``None`` (the default)
            decides at each verification, like rpc25519: lockdown if the file exists and has
            no write permission bits at all, learn otherwise.
    """

    path: Path = attrs.field(converter=Path)
    lockdown: bool | None = attrs.field(default=None, kw_only=True)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False, repr=False)

    async def verify(self, key: PublicKey, *, peer: str | None) -> None:
        """Accept, learn or refuse ``key``. See :meth:`TrustPolicy.verify`."""
        if peer is not None:
            _check_peer(peer)
        async with self._lock:
            await trio.to_thread.run_sync(self._verify_sync, key, peer)

    def entries(self) -> list[KnownKey]:
        """Read and return the file's entries, in file order (none if it does not exist).

        Raises:
            KeyFileError: the file cannot be read, or a line is malformed.
        """
        text = self._read()
        return [] if text is None else self._parse(text)

    def _in_lockdown(self) -> bool:
        if self.lockdown is not None:
            return self.lockdown
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise KeyFileError(
                f"cannot examine known-keys file {str(self.path)!r}: {exc.strerror or exc}"
            ) from exc
        # Not os.access(): it says "writable" to root whatever the mode bits are.
        return stat.S_IMODE(mode) & 0o222 == 0

    def _read(self) -> str | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyFileError(
                f"cannot read known-keys file {str(self.path)!r}: {exc.strerror or exc}"
            ) from exc
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise KeyFileError(
                f"known-keys file {str(self.path)!r} is not UTF-8 text: {exc}"
            ) from exc

    def _parse(self, text: str) -> list[KnownKey]:
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            fields = stripped.split()
            where = f"known-keys file {str(self.path)!r}, line {number}"
            if len(fields) != 2:
                raise KeyFileError(
                    f'{where}: expected "<public key> <host:port or *>", got '
                    f"{_abbreviate(stripped)!r}; fix or delete the line"
                )
            try:
                key = PublicKey.parse(fields[0])
            except ValueError as exc:
                raise KeyFileError(f"{where}: {exc}; fix or delete the line") from exc
            if not _valid_name(fields[1]):
                raise KeyFileError(
                    f'{where}: the name {_abbreviate(fields[1])!r} is neither "host:port" '
                    'nor "*"; fix or delete the line'
                )
            entries.append(KnownKey(key=key, name=fields[1], line=number))
        return entries

    def _verify_sync(self, key: PublicKey, peer: str | None) -> None:
        """Read, decide, maybe append. Runs in a worker thread, under ``self._lock``."""
        # If the file is created by someone else (another process or object) between our
        # read and our creating it, decide again with what they wrote.
        for _ in range(3):
            if self._verify_once(key, peer):
                return
        raise KeyFileError(
            f"known-keys file {str(self.path)!r} keeps appearing and disappearing; "
            "is something else creating and deleting it?"
        )

    def _verify_once(self, key: PublicKey, peer: str | None) -> bool:
        """Accept (True), refuse (raise) or learn (True); False if the file appeared
        after it was found missing, so the caller must decide again."""
        lockdown = self._in_lockdown()
        text = self._read()
        entries = [] if text is None else self._parse(text)
        file_name = str(self.path)

        if peer is not None:
            named = [e for e in entries if _same_name(e.name, peer)]
            if named:
                if any(e.key == key for e in named):
                    return True
                lines = ", ".join(str(e.line) for e in named)
                raise PeerRejected(
                    f"the server {peer} presented the key {key}, but {file_name!r} records "
                    f"a different key for it (line {lines}). This may be a man-in-the-middle "
                    "attack. If the server's key legitimately changed, edit or delete that "
                    f"line of {file_name!r} and connect again.",
                    public_key=str(key),
                )
            if any(e.key == key and e.name == ANY_PEER for e in entries):
                return True
        elif any(e.key == key for e in entries):
            return True

        name = ANY_PEER if peer is None else peer
        who = "a client" if peer is None else f"the server {peer}"
        if lockdown:
            if text is None:
                reason = f"{file_name!r} does not exist and lockdown refuses every key"
            else:
                reason = f"{file_name!r} is in lockdown (read-only) and does not list it"
            raise PeerRejected(
                f"{who} presented the unknown key {key}: {reason}. To trust it, add the "
                f'line "{key} {name}" to {file_name!r}.',
                public_key=str(key),
            )
        if not self._append(text, f"{key} {name}\n"):
            return False
        logger.info("learned the key %s of %s, recorded in %s", key, who, file_name)
        return True

    def _append(self, text: str | None, entry: str) -> bool:
        """Append ``entry``, creating the file (mode 0600, with a header) if ``text`` is None.

        Returns:
            False if the file was to be created but already exists now; True otherwise.
        """
        if text is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            data = _HEADER + entry
        else:
            flags = os.O_WRONLY | os.O_APPEND
            data = entry if text == "" or text.endswith("\n") else "\n" + entry
        try:
            try:
                fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
            except FileExistsError:
                return False
            try:
                view = memoryview(data.encode("utf-8"))
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise KeyFileError(
                f"cannot record a new key in known-keys file {str(self.path)!r}: "
                f"{exc.strerror or exc}"
            ) from exc
        return True


def _abbreviate(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
