"""Handshakes: turn a raw trio Stream into a :class:`~monte_trio.SecureStream`.

A :class:`Handshake` runs one of the sans-IO handshake state machines of ``_proto`` over a
stream and returns a secure stream carrying the record keys both sides agreed on, and the
:class:`SessionFacts` (profile, limits, peer key) the connection builds its session from.
The caller bounds it in time (clients and servers apply their ``handshake_timeout``).

Why :class:`Handshake` is not an extension point: a handshake's result is more than a key
exchange. It must produce record sealers and openers, a hello whose limits the session
enforces, and a profile whose frame layer exists in ``_proto``: all private, and all free
to change. Exporting them would freeze the record layer and the session's inputs as public
API for a feature nobody needs (the two profiles are the two wires that exist). So
``Handshake`` is public only as the type of the two built-in handshakes,
:class:`~monte_trio.NativeHandshake` (this package's ``_native_handshake``) and
:class:`MonteV1Handshake`; subclassing it outside monte_trio raises :class:`TypeError`.
Its one public method, :meth:`Handshake.handshake`, is how an application gets a
:class:`~monte_trio.SecureStream` over its own stream, as it would get a
:class:`trio.SSLStream`.

Errors: anything that goes wrong is raised as :class:`~monte_trio.HandshakeError` (or a
subclass), with the transport's exception as ``__cause__``.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, final

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
    from ._keys import PublicKey

__all__ = ["Handshake", "MonteV1Handshake", "SessionFacts"]


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
            stream_window_cap=config.stream_window_max,
            compression_threshold=config.compression_threshold,
            # Credit below 1/64 of the smaller window waits for more (or for the
            # driver's flush timer) instead of riding on every record.
            credit_floor=min(self.local_hello.request_window, self.local_hello.reply_window) // 64,
        )


class Handshake(abc.ABC):
    """The type of the two built-in handshakes: :class:`~monte_trio.NativeHandshake` and
    :class:`~monte_trio.MonteV1Handshake`. Not for subclassing (a custom handshake would
    need the private record layer); subclassing it outside monte_trio raises
    :class:`TypeError`.

    Attributes:
        profile: the wire profile's name, ``"native"`` or ``"monte-v1"``.
    """

    profile: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__module__.startswith("monte_trio."):
            raise TypeError(
                f"{cls.__qualname__}: monte_trio.Handshake is not an extension point; use "
                "monte_trio.NativeHandshake or monte_trio.MonteV1Handshake"
            )

    async def handshake(
        self,
        transport: trio.abc.Stream,
        *,
        initiator: bool,
        peer: str | None = None,
        config: ConnectionConfig | None = None,
    ) -> SecureStream:
        """Run the handshake on ``transport`` and return the secure stream over it.

        This is how to use a secure stream over a stream of your own (a pipe, a
        :class:`trio.SSLStream`, an in-memory pair), as one would wrap it in a
        :class:`trio.SSLStream`. Both ends call it, one with ``initiator=True``. Bound it
        in time yourself (:func:`trio.fail_after`); on failure close ``transport``.

        Args:
            transport: a connected stream; the handshake owns it until it returns, and the
                secure stream owns it afterwards (closing one closes the other).
            initiator: ``True`` on the side that dialed.
            peer: the ``host:port`` dialed (on the initiator), for trust policies such as
                :class:`~monte_trio.KnownKeysFile` that remember keys per peer.
            config: the local limits announced to the peer (record and message sizes,
                windows); the defaults if ``None``.

        Raises:
            HandshakeError: the handshake failed (:class:`~monte_trio.PeerRejected` if a
                trust policy refused a key).
        """
        return await self._handshake(
            transport,
            initiator=initiator,
            peer=peer,
            config=config if config is not None else ConnectionConfig(),
        )

    @abc.abstractmethod
    async def _handshake(
        self,
        transport: trio.abc.Stream,
        *,
        initiator: bool,
        peer: str | None,
        config: ConnectionConfig,
    ) -> SecureStream: ...


@final
class MonteV1Handshake(Handshake):
    """Go monte's handshake: anonymous X25519, one AES-256-GCM key for both directions.

    .. warning::

       For talking to Go monte services only. It authenticates nobody (a man in the middle
       can read and forge everything) and reuses AES-GCM nonces across the two
       directions, which leaks plaintext relationships and allows forgeries. Prefer
       :class:`~monte_trio.NativeHandshake`.

    Records are limited to ``config.max_record_size`` (default 4,096 bytes, Go monte's
    default read buffer), and a message must fit in one record.
    """

    profile = "monte-v1"

    async def _handshake(
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
