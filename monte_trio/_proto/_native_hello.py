"""The native profile's handshake messages, sans-IO: preamble, verdict and record keys.

The handshake is ``Noise_XX_25519_AESGCM_BLAKE2b`` (``XXpsk3`` with a pre-shared key),
framed as follows (the full specification, with test vectors, is in docs/wire-native)::

    initiator                                             responder
    PREAMBLE(version, flags) | u16 len | msg1  ------>
                                 <------  PREAMBLE(version, status) | u16 len | msg2
    u16 len | msg3  ------------------------------------>
                                 <------  record 0: VERDICT (accept / refuse + reason)
    records ...                  <----->  records ...

* ``msg1`` carries the initiator's ephemeral key and an empty payload (it is not
  encrypted, so nothing is said there).
* ``msg2`` and ``msg3`` carry each side's static key and its hello, encrypted: the TLV
  :class:`~monte_trio._proto._wire2.Hello2` (version, record and message sizes, windows,
  call slots, nested allowance, feature bits).
* An initiator whose trust policy refuses the responder's key sends an empty ``msg3``
  (length 0) instead of the real one, so an impostor never learns the initiator's key, and
  closes; the responder reports the refusal.
* The responder checks the initiator's key with its trust policy and answers with a
  verdict in the first transport record, so a refused client learns why before it sends
  anything, and the client's handshake only completes once it is accepted.
* The prologue (:func:`monte_trio._proto._wire2.prologue`) binds the protocol name, the
  version and the initiator's preamble, so a man in the middle who alters the version or
  the psk flag makes the handshake fail.

After the handshake each direction has its own key from Noise's ``Split()``; nonces are
the Noise counters; both sides rekey (Noise ``REKEY``) every :data:`REKEY_INTERVAL` records
of a direction, keeping every key's use far below AES-GCM's limits (:func:`transport`).
What a record's plaintext carries (frames) is the session's business:
:mod:`monte_trio._proto._wire2` and :mod:`monte_trio._proto._session`. The trio side, which
sequences these messages over a stream, is :mod:`monte_trio._native_handshake`. Nothing
here performs I/O or imports trio.
"""

from __future__ import annotations

from typing import Final

from .._exceptions import HandshakeError, LocalProtocolError, RemoteProtocolError
from ._noise_cipher import CipherState
from ._noise_crypto import NOISE_AESGCM_NONCE, NOISE_CHACHAPOLY_NONCE
from ._records import RecordOpener, RecordSealer
from ._wire2 import MAX_RECORD, VERSION

__all__ = [
    "FLAG_PSK",
    "MAGIC",
    "MAX_VERDICT_REASON",
    "PREAMBLE_SIZE",
    "REKEY_INTERVAL",
    "VERDICT_ACCEPT",
    "VERDICT_REFUSE",
    "Status",
    "decode_preamble",
    "decode_verdict",
    "encode_preamble",
    "encode_verdict",
    "fit_text",
    "protocol_name",
    "transport",
]

MAGIC: Final = b"MNTRIO"
"""The first six bytes each side sends."""
PREAMBLE_SIZE: Final = 8
FLAG_PSK: Final = 0x01
"""Initiator preamble flag: a pre-shared key is in use (``XXpsk3``)."""
MAX_VERDICT_REASON: Final = 1024
"""The largest refusal reason (UTF-8 bytes) a verdict may carry."""
REKEY_INTERVAL: Final = 1 << 20
"""Records per direction between two rekeys."""
VERDICT_ACCEPT: Final = 0
VERDICT_REFUSE: Final = 1


class Status:
    """The responder preamble's status byte."""

    OK = 0
    UNSUPPORTED_VERSION = 1
    PSK_REQUIRED = 2
    PSK_NOT_CONFIGURED = 3

    MESSAGES: Final = {
        1: "the server does not support this protocol version",
        2: "the server requires a pre-shared key (psk) and none was configured here",
        3: "a pre-shared key (psk) is configured here but the server has none",
    }


def protocol_name(*, psk: bool, cipher: str = "AESGCM") -> str:
    """The Noise protocol name for the native profile."""
    return f"Noise_XX{'psk3' if psk else ''}_25519_{cipher}_BLAKE2b"


def encode_preamble(byte: int, version: int = VERSION) -> bytes:
    """A preamble: magic, version, then flags (initiator) or status (responder)."""
    return MAGIC + bytes([version, byte])


def decode_preamble(data: bytes, *, who: str) -> tuple[int, int]:
    """Return ``(version, flags_or_status)`` from an 8-byte preamble.

    Raises:
        HandshakeError: the bytes are not a monte_trio native preamble.
    """
    if len(data) != PREAMBLE_SIZE or data[: len(MAGIC)] != MAGIC:
        hint = (
            "it may be a monte-v1 (Go monte) server: use the monte-v1 profile to talk to it"
            if who == "server"
            else "it may be a monte-v1 (Go monte) client, which this server does not accept"
        )
        raise HandshakeError(f"the {who} does not speak the monte_trio native profile; {hint}")
    return data[6], data[7]


def encode_verdict(
    accept: bool,
    reason: str = "",
    *,
    # (Any default above 1,025 changes nothing: MAX_VERDICT_REASON cuts first.)
    max_size: int = 1025,  # pragma: no mutate
) -> bytes:
    """The plaintext of the responder's first transport record.

    A refusal's reason is cut to at most 1,024 bytes and to ``max_size`` in all (the
    largest plaintext the initiator's records allow).
    """
    if accept:
        return bytes([VERDICT_ACCEPT])
    room = max(0, min(MAX_VERDICT_REASON, max_size - 1))
    return bytes([VERDICT_REFUSE]) + fit_text(reason, room)


def decode_verdict(plaintext: bytes) -> tuple[bool, str]:
    """Return ``(accepted, reason)`` from the responder's first transport record.

    Raises:
        RemoteProtocolError: the record is not a verdict, or its reason is longer than
            :data:`MAX_VERDICT_REASON` bytes.
    """
    if not plaintext or plaintext[0] not in (VERDICT_ACCEPT, VERDICT_REFUSE):
        raise RemoteProtocolError("the server's first record is not a handshake verdict")
    if len(plaintext) - 1 > MAX_VERDICT_REASON:
        raise RemoteProtocolError(
            f"the server's verdict carries a reason of {len(plaintext) - 1} bytes, more than "
            f"the {MAX_VERDICT_REASON} the protocol allows"
        )
    # UTF-8 is the default codec and codec names ignore case (equivalent mutants).
    reason = plaintext[1:].decode(
        "utf-8",  # pragma: no mutate
        errors="replace",
    )
    return plaintext[0] == VERDICT_ACCEPT, reason


def fit_text(text: str, limit: int) -> bytes:
    """``text`` in UTF-8, cut to at most ``limit`` bytes on a character boundary."""
    data = text.encode(
        "utf-8",  # pragma: no mutate (as above)
        errors="replace",
    )
    if len(data) <= limit:
        return data
    cut = max(0, limit)
    while cut and (data[cut] & 0xC0) == 0x80:  # a continuation byte: back to a boundary
        cut -= 1
    return data[:cut]


def transport(
    send: CipherState, receive: CipherState, *, peer_max_record: int, own_max_record: int
) -> tuple[RecordSealer, RecordOpener]:
    """Record sealer and opener from the cipher states of Noise's ``Split()``."""
    nonce = NOISE_AESGCM_NONCE if send.cipher_name == "AESGCM" else NOISE_CHACHAPOLY_NONCE
    send_key, receive_key = send.key, receive.key
    if send_key is None or receive_key is None:
        raise LocalProtocolError("split cipher states have no key")
    return (
        RecordSealer(
            send_key,
            nonce,
            max_record_size=min(peer_max_record, MAX_RECORD),
            counter=send.nonce,
            rekey_interval=REKEY_INTERVAL,
        ),
        RecordOpener(
            receive_key,
            nonce,
            max_record_size=min(own_max_record, MAX_RECORD),
            counter=receive.nonce,
            rekey_interval=REKEY_INTERVAL,
        ),
    )
