"""Trust policies: which peers' static keys a connection accepts.

This module owns the :class:`TrustPolicy` interface and two of its implementations; the
third, :class:`~monte_trio.KnownKeysFile` (trust on first use), is in ``_known_keys``
with its file format:

* :class:`AcceptAnyKey`: accepts every key. Encryption without authentication; it must be
  chosen by name.
* :class:`PinnedKeys`: accepts exactly a fixed set of keys.

What a refused peer is told: only the :attr:`TrustPolicy.kind` of the policy that refused
it (the handshake sends that, never the message of the :class:`PeerRejected`, which may
name files and counts and goes to the refusing side's log).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import ClassVar

import attrs
import trio

from ._exceptions import PeerRejected
from ._keys import PublicKey

__all__ = ["AcceptAnyKey", "PinnedKeys", "TrustPolicy"]


class TrustPolicy(abc.ABC):
    """Decides whether a peer's static public key is acceptable.

    The handshake calls :meth:`verify` once it knows the peer's static key, before any
    application data flows.

    Attributes:
        kind: what a refused peer is told about the policy that refused it, e.g.
            ``"pinned keys"``: a kind, never a detail. The message of the
            :class:`PeerRejected` stays on the refusing side (in its log and exception).
    """

    kind: ClassVar[str] = "custom trust policy"

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

    kind: ClassVar[str] = "accept any key"

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

    kind: ClassVar[str] = "pinned keys"

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
