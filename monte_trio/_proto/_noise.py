"""The Noise Protocol Framework (revision 34), sans-IO: :class:`HandshakeState`.

The Noise implementation is four modules, one job each:

* ``_noise_crypto.py``: the crypto functions (X25519, BLAKE2b, HKDF, and the AEAD
  cipher functions with their nonce layout and ``REKEY``, shared with the record layer);
* ``_noise_cipher.py``: :class:`~monte_trio._proto._noise_cipher.CipherState` and
  :class:`~monte_trio._proto._noise_cipher.SymmetricState` (sections 5.1 and 5.2);
* ``_noise_patterns.py``: the handshake patterns and the parsing of protocol names;
* this module: :class:`HandshakeState` (section 5.3), which interprets a pattern.

None of them performs I/O or imports an async library: handshake messages go in and out
as :class:`bytes`, and the caller moves them.

Supported: DH ``25519``, hash ``BLAKE2b``, ciphers ``AESGCM`` and ``ChaChaPoly``; every
one-way, fundamental interactive and deferred pattern of the specification (sections 7.4,
7.5 and 18.1), with any number of ``pskN`` modifiers (section 9), for example
``Noise_XXpsk3_25519_AESGCM_BLAKE2b``.

Theory of operation
-------------------

A :class:`HandshakeState` interprets its pattern: a list of message patterns, each a tuple
of tokens. Message ``i`` (counting from 0) is written by the initiator when ``i`` is even
and by the responder when it is odd; one-way patterns (``N``, ``K``, ``X``) have a single
message. :attr:`HandshakeState.is_my_turn` says who writes next. After the last message
:attr:`HandshakeState.complete` is true and :meth:`HandshakeState.split` hands out the two
transport :class:`CipherState` objects, exactly once (handing the same nonce-carrying
objects out twice would invite nonce reuse).

Like h11's ``ERROR`` state, any exception raised by :meth:`HandshakeState.write_message`
or :meth:`HandshakeState.read_message` before completion leaves the handshake state
unusable: every later call raises :class:`~monte_trio._exceptions.LocalProtocolError`. The
specification says a failed handshake must be deleted; this enforces it.

Errors:

* the peer's message fails authentication: :class:`~monte_trio._exceptions.DecryptionError`
  (opaque, translated from :class:`cryptography.exceptions.InvalidTag`);
* the peer's message is malformed (too short for its tokens, too long, a low-order public
  key): :class:`~monte_trio._exceptions.RemoteProtocolError`. A truncated message that is
  still long enough for every token fails authentication instead and raises
  :class:`~monte_trio._exceptions.DecryptionError` (itself a ``RemoteProtocolError``);
* the caller's misuse (writing or reading out of turn, a message over 65535 bytes, nonce
  exhaustion, no key): :class:`~monte_trio._exceptions.LocalProtocolError`;
* invalid constructor arguments (an unsupported protocol name, a key of the wrong length,
  key material the pattern needs but was not given): :class:`ValueError`.

The X25519 all-zero output (a low-order public key) is refused rather than used, which
section 12.1 allows; pre-known remote keys are checked for it in the constructor.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .._exceptions import LocalProtocolError, RemoteProtocolError
from ._noise_cipher import CipherState, SymmetricState
from ._noise_crypto import (
    DHLEN,
    MAX_MESSAGE_LEN,
    TAGLEN,
    check_key,
    check_public,
    dh,
    is_low_order,
    private_key,
)
from ._noise_patterns import Pattern, Tokens, parse_protocol_name

__all__ = ["HandshakeState"]


class HandshakeState:
    """Noise's ``HandshakeState`` (section 5.3): runs one handshake, sans-IO.

    The constructor performs ``Initialize()``. Then the two parties alternate
    :meth:`write_message` and :meth:`read_message` (:attr:`is_my_turn` says which one to
    call) until :attr:`complete`, and each calls :meth:`split` once.

    Args:
        protocol_name: e.g. ``"Noise_XX_25519_AESGCM_BLAKE2b"``; see
            :func:`parse_protocol_name`.
        initiator: whether this party sends the first message.
        prologue: data both parties must agree on; it is hashed, never sent.
        s: our 32-byte raw X25519 static private key, if the pattern uses one (ignored
            otherwise).
        e: a fixed 32-byte ephemeral private key (test vectors only; by default a fresh
            one is generated when the pattern sends ``e``).
        rs: the peer's 32-byte static public key, exactly when the pattern has it as a
            pre-message (e.g. the initiator of ``IK``).
        re: the peer's ephemeral public key, exactly when the pattern has it as a
            pre-message (none of the supported patterns do).
        psks: one 32-byte pre-shared key per ``psk`` token, in order of use.

    Raises:
        ValueError: unsupported protocol name, keys of the wrong length, key material the
            pattern needs but was not given (or a remote key it would not use), a
            low-order pre-known remote key, or the wrong number of PSKs.
    """

    __slots__ = (
        "_broken",
        "_e",
        "_e_public",
        "_index",
        "_initiator",
        "_pattern",
        "_psks",
        "_re",
        "_rs",
        "_s",
        "_s_public",
        "_split",
        "_split_taken",
        "_ss",
    )

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        s: bytes | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        pattern, cipher = parse_protocol_name(protocol_name)
        self._pattern = pattern
        self._initiator = bool(initiator)
        self._index = 0
        self._broken = False
        self._split: tuple[CipherState, CipherState] | None = None
        self._split_taken = False

        self._s = private_key(s, "s") if s is not None else None
        self._s_public = self._s.public_key().public_bytes_raw() if self._s is not None else None
        self._e = private_key(e, "e") if e is not None else None
        self._e_public = self._e.public_key().public_bytes_raw() if self._e is not None else None
        self._rs = check_public(rs, "rs") if rs is not None else None
        self._re = check_public(re, "re") if re is not None else None

        self._check_key_material(pattern)

        psk_count = sum(m.count("psk") for m in pattern.messages)
        psk_list = [check_key(p, "pre-shared key") for p in psks]
        if len(psk_list) != psk_count:
            raise ValueError(
                f"pattern {pattern.name!r} needs {psk_count} pre-shared key(s), "
                f"got {len(psk_list)}"
            )
        self._psks = psk_list

        self._ss = SymmetricState(protocol_name, cipher)
        self._ss.mix_hash(bytes(prologue))
        # Pre-messages: the initiator's keys first, in the order listed (section 5.3).
        for owner_is_initiator, tokens in (
            (True, pattern.initiator_pre),
            (False, pattern.responder_pre),
        ):
            mine = owner_is_initiator == self._initiator
            for token in tokens:
                if token == "s":
                    key = self._s_public if mine else self._rs
                else:  # "e"
                    key = self._e_public if mine else self._re
                assert key is not None  # checked by _check_key_material
                self._ss.mix_hash(key)
                if token == "e" and pattern.has_psk:
                    self._ss.mix_key(key)

    def _check_key_material(self, pattern: Pattern) -> None:
        """Check that the keys the pattern needs were given, and no unusable remote key."""
        my_pre = pattern.initiator_pre if self._initiator else pattern.responder_pre
        peer_pre = pattern.responder_pre if self._initiator else pattern.initiator_pre
        needs_s = "s" in my_pre
        for i, message in enumerate(pattern.messages):
            mine = (i % 2 == 0) == self._initiator
            # Tokens that use our static key: sending "s", "ss", and the DH of our
            # static key with the peer's ephemeral ("es" for the responder, "se" for the
            # initiator).
            my_static_dh = "se" if self._initiator else "es"
            if any((t == "s" and mine) or t in ("ss", my_static_dh) for t in message):
                needs_s = True
        if needs_s and self._s is None:
            raise ValueError(
                f"pattern {pattern.name!r} needs a local static key (s) for the "
                f"{'initiator' if self._initiator else 'responder'}"
            )
        if "e" in my_pre and self._e is None:
            raise ValueError(f"pattern {pattern.name!r} needs a pre-message ephemeral key (e)")
        for name, value in (("rs", self._rs), ("re", self._re)):
            token = name[1]
            if token in peer_pre:
                if value is None:
                    raise ValueError(
                        f"pattern {pattern.name!r} needs the peer's pre-known public key "
                        f"({name}) for the {'initiator' if self._initiator else 'responder'}"
                    )
                if is_low_order(value):
                    raise ValueError(f"{name} is a low-order X25519 point")
            elif value is not None:
                raise ValueError(
                    f"pattern {pattern.name!r} does not take a pre-known {name} for the "
                    f"{'initiator' if self._initiator else 'responder'}"
                )

    def __repr__(self) -> str:
        role = "initiator" if self._initiator else "responder"
        return (
            f"<HandshakeState {self._pattern.name} {role} "
            f"message={self._index}/{len(self._pattern.messages)}"
            f"{' broken' if self._broken else ''}>"
        )

    # -- properties ---------------------------------------------------------------------

    @property
    def pattern(self) -> Pattern:
        """The parsed handshake pattern."""
        return self._pattern

    @property
    def initiator(self) -> bool:
        """Whether this party is the initiator."""
        return self._initiator

    @property
    def complete(self) -> bool:
        """Whether every handshake message has been written or read."""
        return self._index >= len(self._pattern.messages)

    @property
    def broken(self) -> bool:
        """Whether an error occurred: the handshake can no longer be used."""
        return self._broken

    @property
    def message_index(self) -> int:
        """How many handshake messages have been written or read so far."""
        return self._index

    @property
    def is_my_turn(self) -> bool:
        """Whether the next call is :meth:`write_message` (false once complete)."""
        if self.complete or self._broken:
            return False
        return (self._index % 2 == 0) == self._initiator

    @property
    def expects_write(self) -> bool:
        """Alias of :attr:`is_my_turn`."""
        return self.is_my_turn

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, once known (pre-known or received)."""
        return self._rs

    @property
    def remote_ephemeral(self) -> bytes | None:
        """The peer's ephemeral public key, once received."""
        return self._re

    @property
    def local_static_public(self) -> bytes | None:
        """Our static public key, if we have a static key."""
        return self._s_public

    @property
    def handshake_hash(self) -> bytes:
        """The handshake hash ``h`` (64 bytes). Unique to this session once
        :attr:`complete`: use it for channel binding (section 11.2)."""
        return self._ss.get_handshake_hash()

    # -- processing ---------------------------------------------------------------------

    def _check_usable(self, writing: bool) -> None:
        if self._broken:
            raise LocalProtocolError("the Noise handshake failed earlier and cannot be used")
        if self.complete:
            # Not an error of the handshake itself: the state stays usable for split().
            raise LocalProtocolError("the Noise handshake is already complete")
        if self.is_my_turn != writing:
            self._broken = True
            raise LocalProtocolError(
                "it is our turn to write a handshake message"
                if self.is_my_turn
                else "it is the peer's turn to write a handshake message"
            )

    def _mix_dh(self, token: str) -> None:
        if token == "ee":
            local, remote = self._e, self._re
        elif token == "ss":
            local, remote = self._s, self._rs
        elif (token == "es") == self._initiator:
            # "es" as initiator, "se" as responder: DH(e, rs)
            local, remote = self._e, self._rs
        else:
            # "se" as initiator, "es" as responder: DH(s, re)
            local, remote = self._s, self._re
        if local is None or remote is None:  # pragma: no cover - excluded by construction
            raise LocalProtocolError(f"missing key material for the {token!r} token")
        self._ss.mix_key(dh(local, remote))

    def _message_len(self, tokens: Tokens, payload_len: int) -> int:
        """The length :meth:`write_message` will produce, computed without side effects."""
        has_key = self._ss.has_key()
        length = 0
        for token in tokens:
            if token == "e":
                length += DHLEN
                has_key = has_key or self._pattern.has_psk
            elif token == "s":
                length += DHLEN + (TAGLEN if has_key else 0)
            else:  # "ee", "es", "se", "ss", "psk" all key the cipher
                has_key = True
        return length + payload_len + (TAGLEN if has_key else 0)

    def _finish_message(self) -> None:
        self._index += 1
        if self.complete:
            self._split = self._ss.split()

    def write_message(self, payload: bytes = b"") -> bytes:
        """``WriteMessage(payload)``: produce our next handshake message.

        Args:
            payload: the handshake payload; encrypted if a key has been established by
                then (check the pattern's payload security properties before sending
                anything sensitive early).

        Returns:
            The message to send to the peer.

        Raises:
            LocalProtocolError: not our turn, the handshake is complete or broken, or the
                message would exceed 65535 bytes.
            RemoteProtocolError: a key the peer sent earlier is a low-order point.
        """
        self._check_usable(writing=True)
        try:
            tokens = self._pattern.messages[self._index]
            length = self._message_len(tokens, len(payload))
            if length > MAX_MESSAGE_LEN:
                raise LocalProtocolError(
                    f"Noise handshake message would be {length} bytes, over the "
                    f"{MAX_MESSAGE_LEN}-byte limit"
                )
            out = bytearray()
            for token in tokens:
                if token == "e":
                    if self._e is None:
                        self._e = X25519PrivateKey.generate()
                        self._e_public = self._e.public_key().public_bytes_raw()
                    assert self._e_public is not None
                    out += self._e_public
                    self._ss.mix_hash(self._e_public)
                    if self._pattern.has_psk:
                        self._ss.mix_key(self._e_public)
                elif token == "s":
                    assert self._s_public is not None  # checked by _check_key_material
                    out += self._ss.encrypt_and_hash(self._s_public)
                elif token == "psk":
                    self._ss.mix_key_and_hash(self._psks.pop(0))
                else:
                    self._mix_dh(token)
            out += self._ss.encrypt_and_hash(bytes(payload))
            self._finish_message()
        except BaseException:
            self._broken = True
            raise
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """``ReadMessage(message)``: process the peer's next handshake message.

        Args:
            message: the message exactly as the peer's :meth:`write_message` returned it.

        Returns:
            The decrypted payload.

        Raises:
            DecryptionError: the message failed authentication (tampered, truncated, or a
                different prologue, PSK or key).
            RemoteProtocolError: the message is too short for its tokens, over 65535
                bytes, or carries a low-order public key.
            LocalProtocolError: not the peer's turn, or the handshake is complete or broken.
        """
        self._check_usable(writing=False)
        try:
            data = bytes(message)
            if len(data) > MAX_MESSAGE_LEN:
                raise RemoteProtocolError(
                    f"Noise handshake message of {len(data)} bytes is over the "
                    f"{MAX_MESSAGE_LEN}-byte limit"
                )
            pos = 0
            for token in self._pattern.messages[self._index]:
                if token == "e":
                    if len(data) - pos < DHLEN:
                        raise RemoteProtocolError("Noise handshake message is too short")
                    self._re = data[pos : pos + DHLEN]
                    pos += DHLEN
                    self._ss.mix_hash(self._re)
                    if self._pattern.has_psk:
                        self._ss.mix_key(self._re)
                elif token == "s":
                    size = DHLEN + (TAGLEN if self._ss.has_key() else 0)
                    if len(data) - pos < size:
                        raise RemoteProtocolError("Noise handshake message is too short")
                    self._rs = self._ss.decrypt_and_hash(data[pos : pos + size])
                    pos += size
                elif token == "psk":
                    self._ss.mix_key_and_hash(self._psks.pop(0))
                else:
                    self._mix_dh(token)
            rest = data[pos:]
            if self._ss.has_key() and len(rest) < TAGLEN:
                raise RemoteProtocolError("Noise handshake message is too short")
            payload = self._ss.decrypt_and_hash(rest)
            self._finish_message()
        except BaseException:
            self._broken = True
            raise
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """Hand out the transport cipher states (``Split()``); callable exactly once.

        For one-way patterns only the first is used; the responder must not send with
        the second (section 7.4).

        Returns:
            ``(initiator_to_responder, responder_to_initiator)``: the initiator encrypts
            with the first and decrypts with the second; the responder the reverse.

        Raises:
            LocalProtocolError: the handshake is not complete, failed, or the cipher
                states were already handed out.
        """
        if self._broken:
            raise LocalProtocolError("the Noise handshake failed and cannot be split")
        if self._split_taken:
            raise LocalProtocolError("the Noise cipher states were already handed out")
        if not self.complete or self._split is None:
            raise LocalProtocolError("the Noise handshake is not complete")
        result = self._split
        self._split_taken = True
        self._split = None
        return result
