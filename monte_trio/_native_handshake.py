"""The native profile's handshake over trio (Noise XX with identities and trust), and
:func:`resolve_handshake`, which makes it the default.

This module only sequences reads and writes; the cryptography and every byte layout live
in the sans-IO modules ``_proto._noise``, ``_proto._native_hello`` (see it for the message
flow) and ``_proto._wire2`` (the hello). It imports :mod:`monte_trio._handshake`, never the
reverse.
"""

from __future__ import annotations

import contextlib
import struct
from typing import final

import trio

from ._config import ConnectionConfig
from ._exceptions import HandshakeError, MonteError, PeerRejected, RemoteProtocolError
from ._handshake import Handshake, SessionFacts
from ._keys import Identity, PublicKey
from ._proto import _native_hello as wire
from ._proto._compression import resolve as resolve_compression
from ._proto._noise import HandshakeState
from ._proto._records import RecordOpener, RecordSealer
from ._proto._wire2 import MAX_RECORD, MIN_RECORD_SIZE, VERSION, Codec, Hello2, prologue
from ._secure_stream import SecureStream
from ._trust import TrustPolicy
from ._util import escape_peer_text

__all__ = ["NativeHandshake", "resolve_handshake"]

_U16 = struct.Struct(">H")


def _codec_name(codec: int) -> str:
    try:
        return repr(Codec(codec).name.lower())
    except ValueError:
        return f"an unknown codec (id {codec})"


def codec_mismatch(local: Hello2, peer: Hello2, *, peer_is: str) -> str | None:
    """Why the two sides' service codecs disagree (naming both), or ``None``."""
    if local.codec == peer.codec:
        return None
    return (
        f"codec mismatch: this side uses {_codec_name(local.codec)}, the {peer_is} uses "
        f"{_codec_name(peer.codec)}; both sides must set the same ConnectionConfig(codec=...)"
    )


class _Reader:
    """Reads exact byte counts from a stream, keeping what arrives beyond them."""

    def __init__(self, stream: trio.abc.Stream, who: str) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._who = who

    async def exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            data = await self._stream.receive_some(max(n - len(self._buffer), 4096))
            if not data:
                raise HandshakeError(
                    f"the {self._who} closed the connection during the handshake; it may "
                    "have refused our key, use another profile, or expect a pre-shared key"
                )
            self._buffer += data
        chunk = bytes(self._buffer[:n])
        del self._buffer[:n]
        return chunk

    async def message(self) -> bytes:
        (length,) = _U16.unpack(await self.exactly(2))
        return await self.exactly(length)

    def rest(self) -> bytes:
        rest, self._buffer = bytes(self._buffer), bytearray()
        return rest


@final
class NativeHandshake(Handshake):
    """The native profile: Noise XX (``Noise_XX_25519_AESGCM_BLAKE2b``), mutually
    authenticated.

    Each side proves possession of its static key; each checks the other's key with its
    trust policy before any call is made. Forward secrecy comes from the ephemeral keys;
    each direction has its own key, rekeyed every 2**20 records.

    Args:
        identity: this side's static key pair; a fresh one if ``None`` (fine for clients
            whose key nobody pins; servers usually load theirs from a file).
        trust: which peer keys to accept: :class:`~monte_trio.PinnedKeys`,
            :class:`~monte_trio.KnownKeysFile` or, explicitly, :class:`~monte_trio.AcceptAnyKey`.
        psk: an optional 32-byte pre-shared key; both sides must hold the same one
            (``Noise_XXpsk3``). It adds a secret an attacker must also steal.
        cipher: ``"AESGCM"`` (default, fastest here) or ``"ChaChaPoly"``.
    """

    profile = "native"

    def __init__(
        self,
        identity: Identity | None = None,
        *,
        trust: TrustPolicy,
        psk: bytes | None = None,
        cipher: str = "AESGCM",
    ) -> None:
        if not isinstance(trust, TrustPolicy):
            raise TypeError(f"trust must be a TrustPolicy, got {trust!r}")
        if psk is not None and len(psk) != 32:
            raise ValueError(f"a pre-shared key is 32 bytes, got {len(psk)}")
        if cipher not in ("AESGCM", "ChaChaPoly"):
            raise ValueError("cipher must be 'AESGCM' or 'ChaChaPoly'")
        self.identity: Identity = identity or Identity.generate()
        self.trust = trust
        self._psk = psk
        self._cipher = cipher

    def __repr__(self) -> str:
        return (
            f"NativeHandshake(identity={self.identity!r}, trust={self.trust!r}, "
            f"psk={'set' if self._psk else None}, cipher={self._cipher!r})"
        )

    @property
    def public_key(self) -> PublicKey:
        """This side's static public key (give it to peers that pin keys)."""
        return self.identity.public_key

    def _hello(self, config: ConnectionConfig) -> Hello2:
        max_record = min(config.max_record_size or MAX_RECORD, MAX_RECORD)
        if max_record < MIN_RECORD_SIZE:
            raise HandshakeError(
                f"max_record_size {max_record} is below the native profile's floor of "
                f"{MIN_RECORD_SIZE}; raise it (or leave it unset)"
            )
        return Hello2(
            max_record_size=max_record,
            max_message_size=config.max_message_size,
            request_window=config.effective_request_window,
            reply_window=config.effective_reply_window,
            max_calls=config.max_calls,
            nested_allowance=config.nested_allowance,
            codec=Codec[config.codec.upper()],
            stream_window=config.stream_window,
            max_streams=config.max_streams,
            data_window=config.data_window,
            compression=resolve_compression(config.compression),
        )

    async def _handshake(
        self,
        transport: trio.abc.Stream,
        *,
        initiator: bool,
        peer: str | None,
        config: ConnectionConfig,
    ) -> SecureStream:
        who = "server" if initiator else "client"
        try:
            if initiator:
                return await self._initiate(transport, peer, config)
            return await self._respond(transport, config)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise HandshakeError(
                f"the connection to the {who} was lost during the handshake: {exc}"
            ) from exc
        except HandshakeError:
            raise
        except MonteError as exc:
            # DecryptionError / RemoteProtocolError from the Noise state machine.
            hint = " (a pre-shared key mismatch looks like this)" if self._psk else ""
            raise HandshakeError(
                f"the {who}'s handshake message was invalid{hint}: {exc}"
            ) from exc

    def _state(self, initiator: bool, preamble: bytes) -> HandshakeState:
        name = wire.protocol_name(psk=self._psk is not None, cipher=self._cipher)
        return HandshakeState(
            name,
            initiator=initiator,
            prologue=prologue(name, preamble),
            s=self.identity.private_bytes(),
            psks=[self._psk] if self._psk is not None else [],
        )

    async def _initiate(
        self, transport: trio.abc.Stream, peer: str | None, config: ConnectionConfig
    ) -> SecureStream:
        reader = _Reader(transport, "server")
        preamble = wire.encode_preamble(wire.FLAG_PSK if self._psk else 0)
        state = self._state(True, preamble)
        msg1 = state.write_message(b"")
        await transport.send_all(preamble + _U16.pack(len(msg1)) + msg1)
        _, status = wire.decode_preamble(await reader.exactly(wire.PREAMBLE_SIZE), who="server")
        if status != wire.Status.OK:
            raise HandshakeError(
                wire.Status.MESSAGES.get(status, f"the server refused the handshake ({status})")
            )
        server_hello = Hello2.decode(state.read_message(await reader.message()))
        remote = state.remote_static
        assert remote is not None
        server_key = PublicKey(remote)
        try:
            await self.trust.verify(server_key, peer=peer)
        except PeerRejected:
            # An empty msg3 says "refused" without revealing our static key to a server
            # we do not trust.
            await transport.send_all(_U16.pack(0))
            raise
        msg3 = state.write_message(self._hello(config).encode())
        await transport.send_all(_U16.pack(len(msg3)) + msg3)
        # The server refuses a codec mismatch too (its verdict names both); msg3 went out
        # so that it can.
        mismatch = codec_mismatch(self._hello(config), server_hello, peer_is="server")
        if mismatch is not None:
            raise HandshakeError(mismatch)
        send, receive = state.split()
        sealer, opener = wire.transport(
            send,
            receive,
            peer_max_record=server_hello.max_record_size,
            own_max_record=self._hello(config).max_record_size,
        )
        # The server's verdict on our key is its first record; records may follow it.
        rest = reader.rest()
        records = opener.receive_data(rest) if rest else []
        while not records:
            data = await transport.receive_some(65536)
            if not data:
                raise HandshakeError(
                    "the server closed the connection before accepting our key; it may have "
                    "refused it (check the server's trust policy)"
                )
            records = opener.receive_data(data)
        accepted, reason = wire.decode_verdict(records[0])
        if not accepted:
            raise PeerRejected(
                f"the server refused our key {self.public_key}: {escape_peer_text(reason)}"
            )
        initial = records[1:]
        return self._secure(
            transport, sealer, opener, server_hello, server_key, config, True, initial
        )

    async def _respond(self, transport: trio.abc.Stream, config: ConnectionConfig) -> SecureStream:
        reader = _Reader(transport, "client")
        preamble = await reader.exactly(wire.PREAMBLE_SIZE)
        version, flags = wire.decode_preamble(preamble, who="client")
        status = wire.Status.OK
        if version != VERSION:
            status = wire.Status.UNSUPPORTED_VERSION
        elif self._psk is not None and not flags & wire.FLAG_PSK:
            status = wire.Status.PSK_REQUIRED
        elif self._psk is None and flags & wire.FLAG_PSK:
            status = wire.Status.PSK_NOT_CONFIGURED
        if status != wire.Status.OK:
            await transport.send_all(wire.encode_preamble(status))
            raise HandshakeError(f"refused the client: {wire.Status.MESSAGES[status]}")
        state = self._state(False, preamble)
        state.read_message(await reader.message())
        msg2 = state.write_message(self._hello(config).encode())
        await transport.send_all(
            wire.encode_preamble(wire.Status.OK) + _U16.pack(len(msg2)) + msg2
        )
        msg3 = await reader.message()
        if not msg3:
            raise PeerRejected(
                f"the client refused this server's key {self.public_key} (its trust policy "
                "pins other keys or is locked down)"
            )
        client_hello = Hello2.decode(state.read_message(msg3))
        remote = state.remote_static
        assert remote is not None
        client_key = PublicKey(remote)
        send, receive = state.split()
        # split() gives (initiator->responder, responder->initiator): we send the second.
        sealer, opener = wire.transport(
            receive,
            send,
            peer_max_record=client_hello.max_record_size,
            own_max_record=self._hello(config).max_record_size,
        )
        try:
            await self.trust.verify(client_key, peer=None)
        except PeerRejected:
            # The client learns that it was refused and by which kind of policy; the
            # details (files, lines, counts) stay here, in the exception and the log.
            reason = f"this server's trust policy ({self.trust.kind}) does not accept it"
            verdict = wire.encode_verdict(False, reason, max_size=sealer.max_plaintext)
            await transport.send_all(sealer.seal(verdict))
            raise
        mismatch = codec_mismatch(self._hello(config), client_hello, peer_is="client")
        if mismatch is not None:
            verdict = wire.encode_verdict(False, mismatch, max_size=sealer.max_plaintext)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await transport.send_all(sealer.seal(verdict))
            raise HandshakeError(mismatch)
        await transport.send_all(sealer.seal(wire.encode_verdict(True)))
        try:
            rest = reader.rest()
            initial = opener.receive_data(rest) if rest else []
        except RemoteProtocolError as exc:
            raise HandshakeError(f"invalid record right after the handshake: {exc}") from exc
        return self._secure(
            transport, sealer, opener, client_hello, client_key, config, False, initial
        )

    def _secure(
        self,
        transport: trio.abc.Stream,
        sealer: RecordSealer,
        opener: RecordOpener,
        peer_hello: Hello2,
        peer_key: PublicKey,
        config: ConnectionConfig,
        initiator: bool,
        initial: list[bytes],
    ) -> SecureStream:
        facts = SessionFacts(
            profile=self.profile,
            initiator=initiator,
            peer_public_key=peer_key,
            local_hello=self._hello(config),
            peer_hello=peer_hello,
            max_record_size=sealer.max_plaintext + 16,
            max_message_size=peer_hello.max_message_size,
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
    if trust is None:
        raise TypeError(
            "the native profile needs trust=: PinnedKeys([...]) to accept known keys, "
            "KnownKeysFile(path) for trust on first use, or AcceptAnyKey() to accept any "
            "key (encryption without authentication)"
        )
    return NativeHandshake(identity=identity, trust=trust, psk=psk)
