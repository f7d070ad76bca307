"""Handshakes: turn a raw trio Stream into a :class:`~monte_trio.SecureStream`.

A :class:`Handshake` is the pluggable part of a connection, as in Go monte: it runs one of
the sans-IO handshake state machines of ``_proto`` over a stream, and returns a secure
stream carrying the record keys and the message codec both sides agreed on. The caller
bounds it in time (clients and servers apply their ``handshake_timeout``).

Errors: anything that goes wrong is raised as :class:`~monte_trio.HandshakeError` (or a
subclass), with the transport's exception as ``__cause__``.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

import attrs
import trio

from ._config import ConnectionConfig
from ._exceptions import HandshakeError, MonteError
from ._proto._monte_v1 import MONTE_V1_DEFAULT_MAX_RECORD, MonteV1HandshakeState
from ._proto._session import Session
from ._proto._session_v1 import MonteV1Session
from ._proto._wire2 import Hello2
from ._secure_stream import SecureStream

if TYPE_CHECKING:
    from ._keys import Identity, PublicKey
    from ._trust import TrustPolicy

__all__ = ["Handshake", "MonteV1Handshake", "SessionFacts", "resolve_handshake"]

NATIVE = "native"
MONTE_V1 = "monte-v1"


@attrs.frozen(kw_only=True)
class SessionFacts:
    """What a handshake agreed: the one place the connection's facts live.

    Attributes:
        profile: the wire profile, ``"native"`` or ``"monte-v1"``.
        initiator: whether this side dialed the connection.
        peer_public_key: the peer's authenticated static key (native), else ``None``.
        local_hello: the hello this side sent (native): the limits it accepts.
        peer_hello: the hello the peer sent (native): the limits this side obeys.
        max_record_size: monte-v1: the largest record either side accepts.
        max_message_size: the largest message body this side sends (the peer's limit,
            and for monte-v1 also the local ``max_message_size``).
    """

    profile: str
    initiator: bool
    peer_public_key: PublicKey | None = None
    local_hello: Hello2 | None = None
    peer_hello: Hello2 | None = None
    max_record_size: int = 0
    max_message_size: int = 0

    def new_session(self, config: ConnectionConfig, now: float) -> Session | MonteV1Session:
        """The sans-IO session that makes every protocol decision of the connection."""
        if self.local_hello is None or self.peer_hello is None:
            return MonteV1Session(initiator=self.initiator, max_record_size=self.max_record_size)
        return Session(
            initiator=self.initiator,
            local=self.local_hello,
            peer=self.peer_hello,
            now=now,
            keepalive_interval=config.keepalive_interval,
            keepalive_tolerance=config.keepalive_tolerance,
            grace_period=config.grace_period,
        )


class Handshake(abc.ABC):
    """Establishes a secure stream over a connected transport.

    Subclass it to plug in another key exchange; the result must be a
    :class:`~monte_trio.SecureStream` whose ``facts`` (a :class:`SessionFacts`) say
    which session the connection runs.

    Attributes:
        profile: the wire profile's name.
    """

    profile: ClassVar[str]

    @abc.abstractmethod
    async def handshake(
        self,
        transport: trio.abc.Stream,
        *,
        initiator: bool,
        peer: str | None,
        config: ConnectionConfig,
    ) -> SecureStream:
        """Run the handshake on ``transport``.

        Args:
            transport: a connected stream; the handshake owns it until it returns.
            initiator: ``True`` on the side that dialed.
            peer: the ``host:port`` dialed (on the initiator), for trust policies.
            config: the local connection limits (record and message sizes).

        Raises:
            HandshakeError: the handshake failed; ``transport`` should be closed.
        """


class MonteV1Handshake(Handshake):
    """Go monte's handshake: anonymous X25519, one AES-256-GCM key for both directions.

    .. warning::

       For talking to Go monte services only. It authenticates nobody (a man in the middle
       can read and forge everything) and reuses AES-GCM nonces across the two
       directions, which leaks plaintext relationships and allows forgeries. Prefer
       :class:`~monte_trio.NoiseHandshake`.

    Records are limited to ``config.max_record_size`` (default 4,096 bytes, Go monte's
    default read buffer), and a message must fit in one record.
    """

    profile = "monte-v1"

    async def handshake(
        self,
        transport: trio.abc.Stream,
        *,
        initiator: bool,
        peer: str | None,
        config: ConnectionConfig,
    ) -> SecureStream:
        state = MonteV1HandshakeState(initiator=initiator)
        rest = b""
        try:
            out = state.data_to_send()
            if out:
                await transport.send_all(out)
            while state.peer_public is None:
                rest = state.receive_data(bytes(await transport.receive_some(4096)))
            out = state.data_to_send()
            if out:
                await transport.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise HandshakeError(
                f"the connection was lost during the monte-v1 handshake: {exc}"
            ) from exc
        max_record = config.max_record_size or MONTE_V1_DEFAULT_MAX_RECORD
        sealer, opener = state.records(max_record_size=max_record)
        try:
            initial = opener.receive_data(rest) if rest else []
        except MonteError as exc:
            raise HandshakeError(f"invalid record right after the handshake: {exc}") from exc
        facts = SessionFacts(
            profile=self.profile,
            initiator=initiator,
            max_record_size=max_record,
            # u32 seq + 16-byte tag: a message must fit one record
            max_message_size=min(max_record - 20, config.max_message_size),
        )
        return SecureStream(transport, sealer, opener, facts=facts, initial_records=initial)


def resolve_handshake(
    handshake: Handshake | None,
    *,
    identity: Identity | None,
    trust: TrustPolicy | None,
    psk: bytes | None,
) -> Handshake:
    """The handshake a client or server uses: ``handshake`` if given, else the native one.

    Raises:
        TypeError: both ``handshake`` and native options were given, or the native profile
            was chosen without a trust policy.
    """
    if handshake is not None:
        if identity is not None or trust is not None or psk is not None:
            raise TypeError(
                "pass either handshake= or the native options (identity, trust, psk), not both"
            )
        return handshake
    from ._native import NoiseHandshake

    if trust is None:
        raise TypeError(
            "the native profile needs trust=: PinnedKeys([...]) to accept known keys, "
            "KnownKeysFile(path) for trust on first use, or AcceptAnyKey() to accept any "
            "key (encryption without authentication)"
        )
    return NoiseHandshake(identity=identity, trust=trust, psk=psk)
