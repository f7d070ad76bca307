"""The Noise Protocol Framework (revision 34), sans-IO.

This module owns everything Noise: the three state objects of the specification
(:class:`CipherState`, :class:`SymmetricState`, :class:`HandshakeState`), the table of
handshake patterns, the parsing of protocol names, and the translation of the
cryptographic library's failures into monte_trio's exceptions. It performs no I/O and
imports no async library: handshake messages go in and out as :class:`bytes`, and the
caller moves them.

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

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Final, TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .._exceptions import DecryptionError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "CIPHERS",
    "DHLEN",
    "HASHLEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "PATTERNS",
    "CipherState",
    "HandshakeState",
    "Pattern",
    "SymmetricState",
    "parse_protocol_name",
    "rekey_key",
]

DHLEN: Final = 32
"""Length of an X25519 public key and of a DH output."""
HASHLEN: Final = 64
"""Length of a BLAKE2b output."""
KEYLEN: Final = 32
"""Length of a cipher key and of a pre-shared key."""
TAGLEN: Final = 16
"""Length of the AEAD authentication tag."""
MAX_MESSAGE_LEN: Final = 65535
"""The largest Noise message (section 3)."""
MAX_NONCE: Final = 2**64 - 1
"""The reserved nonce value: reaching it means the key is exhausted (section 5.1)."""
CIPHERS: Final = ("AESGCM", "ChaChaPoly")
"""The supported cipher names."""

_ZEROS32: Final = bytes(32)


# ---------------------------------------------------------------------------------------
# Crypto functions (sections 4 and 12)
# ---------------------------------------------------------------------------------------

_Aead: TypeAlias = AESGCM | ChaCha20Poly1305


def _check_cipher(cipher: str) -> None:
    if cipher not in CIPHERS:
        raise ValueError(
            f"unsupported Noise cipher {cipher!r}: expected one of {', '.join(CIPHERS)}"
        )


def _make_aead(cipher: str, key: bytes) -> _Aead:
    if cipher == "AESGCM":
        return AESGCM(key)
    return ChaCha20Poly1305(key)


def _nonce_bytes(cipher: str, n: int) -> bytes:
    # 32 bits of zeros, then the 64-bit counter: big-endian for AESGCM (section 12.4),
    # little-endian for ChaChaPoly (section 12.3).
    if cipher == "AESGCM":
        return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


def _check_key(key: bytes, what: str = "key") -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) != KEYLEN:
        raise ValueError(f"{what} must be {KEYLEN} bytes, got {len(key)}")
    return key


def rekey_key(cipher: str, key: bytes) -> bytes:
    """Compute the Noise ``REKEY(k)`` function (section 4.2).

    ``REKEY(k)`` is the first 32 bytes of ``ENCRYPT(k, 2**64 - 1, b"", 32 zero bytes)``.

    Args:
        cipher: ``"AESGCM"`` or ``"ChaChaPoly"``.
        key: the current 32-byte cipher key.

    Returns:
        The new 32-byte cipher key.

    Raises:
        ValueError: if the cipher is unsupported or the key is not 32 bytes.
    """
    _check_cipher(cipher)
    key = _check_key(key)
    aead = _make_aead(cipher, key)
    return aead.encrypt(_nonce_bytes(cipher, MAX_NONCE), _ZEROS32, b"")[:KEYLEN]


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASHLEN).digest()


def _hmac_hash(key: bytes, data: bytes) -> bytes:
    # hashlib.blake2b has block_size 128 (BLOCKLEN) and digest_size 64 (HASHLEN).
    return hmac.new(key, data, hashlib.blake2b).digest()


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp_key = _hmac_hash(chaining_key, ikm)
    out1 = _hmac_hash(temp_key, b"\x01")
    out2 = _hmac_hash(temp_key, out1 + b"\x02")
    return out1, out2


def _hkdf3(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes, bytes]:
    temp_key = _hmac_hash(chaining_key, ikm)
    out1 = _hmac_hash(temp_key, b"\x01")
    out2 = _hmac_hash(temp_key, out1 + b"\x02")
    out3 = _hmac_hash(temp_key, out2 + b"\x03")
    return out1, out2, out3


def _private_key(raw: bytes, what: str) -> X25519PrivateKey:
    if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) != DHLEN:
        raise ValueError(f"{what} must be a {DHLEN}-byte raw X25519 private key")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def _check_public(raw: bytes, what: str) -> bytes:
    if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) != DHLEN:
        raise ValueError(f"{what} must be a {DHLEN}-byte raw X25519 public key")
    return bytes(raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519, refusing the all-zero output of a low-order public key.

    Raises:
        RemoteProtocolError: the public key is a low-order point.
    """
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        # OpenSSL refuses the all-zero shared secret itself.
        raise RemoteProtocolError("peer public key is a low-order point") from None
    if shared == _ZEROS32:  # pragma: no cover - OpenSSL already refuses it
        raise RemoteProtocolError("peer public key is a low-order point")
    return shared


def _is_low_order(public: bytes) -> bool:
    # With clamped scalars (multiples of the cofactor 8), every low-order point gives the
    # all-zero output for any private key, so one test exchange is conclusive.
    try:
        shared = X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return True
    return shared == _ZEROS32


# ---------------------------------------------------------------------------------------
# CipherState (section 5.1)
# ---------------------------------------------------------------------------------------


class CipherState:
    """A cipher key ``k`` and nonce ``n``: Noise's ``CipherState`` (section 5.1).

    Used once during the handshake (inside :class:`SymmetricState`) and twice after it,
    one per direction. It does not limit the size of a message; callers that frame Noise
    messages enforce :data:`MAX_MESSAGE_LEN` themselves.

    Args:
        cipher: ``"AESGCM"`` (nonce counter big-endian) or ``"ChaChaPoly"`` (little-endian).
        key: a 32-byte key, or ``None`` for the empty key (encryption is then the identity).

    Raises:
        ValueError: unsupported cipher or a key that is not 32 bytes.
    """

    __slots__ = ("_aead", "_k", "_n", "cipher_name")

    def __init__(self, cipher: str = "AESGCM", key: bytes | None = None) -> None:
        _check_cipher(cipher)
        self.cipher_name: str = cipher
        self._k: bytes | None = None
        self._aead: _Aead | None = None
        self._n = 0
        self.initialize_key(key)

    def __repr__(self) -> str:
        return f"<CipherState {self.cipher_name} has_key={self.has_key()} n={self._n}>"

    @property
    def key(self) -> bytes | None:
        """The current 32-byte key, or ``None`` when empty."""
        return self._k

    @property
    def nonce(self) -> int:
        """The nonce the next encryption or decryption will use (set it with
        :meth:`set_nonce`)."""
        return self._n

    def initialize_key(self, key: bytes | None) -> None:
        """``InitializeKey(key)``: set ``k = key`` and ``n = 0``.

        Args:
            key: a 32-byte key, or ``None`` for the empty key.

        Raises:
            ValueError: the key is not 32 bytes.
        """
        if key is None:
            self._k = None
            self._aead = None
        else:
            self._k = _check_key(key)
            self._aead = _make_aead(self.cipher_name, self._k)
        self._n = 0

    def has_key(self) -> bool:
        """``HasKey()``: whether ``k`` is non-empty."""
        return self._k is not None

    def set_nonce(self, n: int) -> None:
        """``SetNonce(n)``: set the nonce (for out-of-order transport, section 11.4).

        Args:
            n: an integer in ``[0, 2**64 - 1]``; ``2**64 - 1`` is reserved, so setting it
                makes every later encryption or decryption fail.

        Raises:
            ValueError: ``n`` is out of range.
        """
        if not 0 <= n <= MAX_NONCE:
            raise ValueError(f"nonce must be in [0, 2**64 - 1], got {n}")
        self._n = n

    def _next_nonce(self) -> bytes:
        if self._n >= MAX_NONCE:
            raise LocalProtocolError(
                "cipher nonce exhausted (2**64 - 1 is reserved); a new handshake is needed"
            )
        return _nonce_bytes(self.cipher_name, self._n)

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """``EncryptWithAd(ad, plaintext)``: encrypt with ``n``, then increment ``n``.

        Args:
            ad: associated data, authenticated but not encrypted.
            plaintext: the data to encrypt.

        Returns:
            The ciphertext with its 16-byte tag, or ``plaintext`` itself if the key is empty.

        Raises:
            LocalProtocolError: the nonce is exhausted.
        """
        if self._aead is None:
            return plaintext
        nonce = self._next_nonce()
        ciphertext = self._aead.encrypt(nonce, plaintext, ad)
        self._n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """``DecryptWithAd(ad, ciphertext)``: decrypt with ``n``, then increment ``n``.

        On an authentication failure ``n`` is not incremented.

        Args:
            ad: the associated data given to the encryption.
            ciphertext: the ciphertext with its tag.

        Returns:
            The plaintext, or ``ciphertext`` itself if the key is empty.

        Raises:
            DecryptionError: authentication failed (deliberately opaque).
            LocalProtocolError: the nonce is exhausted.
        """
        if self._aead is None:
            return ciphertext
        nonce = self._next_nonce()
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, ad)
        except InvalidTag:
            raise DecryptionError("Noise message failed authentication") from None
        self._n += 1
        return plaintext

    def rekey(self) -> None:
        """``Rekey()``: set ``k = REKEY(k)``; ``n`` is unchanged (section 11.3).

        Raises:
            LocalProtocolError: the key is empty.
        """
        if self._k is None:
            raise LocalProtocolError("cannot rekey a CipherState without a key")
        n = self._n
        self.initialize_key(rekey_key(self.cipher_name, self._k))
        self._n = n


# ---------------------------------------------------------------------------------------
# SymmetricState (section 5.2)
# ---------------------------------------------------------------------------------------


class SymmetricState:
    """A :class:`CipherState` plus the chaining key ``ck`` and hash ``h`` (section 5.2).

    The constructor performs ``InitializeSymmetric(protocol_name)``.

    Args:
        protocol_name: the full Noise protocol name, as ASCII text or bytes.
        cipher: the cipher of the inner :class:`CipherState`.

    Raises:
        ValueError: unsupported cipher.
    """

    __slots__ = ("_ck", "_cs", "_h")

    def __init__(self, protocol_name: str | bytes, cipher: str = "AESGCM") -> None:
        name = protocol_name.encode("ascii") if isinstance(protocol_name, str) else protocol_name
        h = name.ljust(HASHLEN, b"\x00") if len(name) <= HASHLEN else _hash(name)
        self._h: bytes = h
        self._ck: bytes = h
        self._cs = CipherState(cipher)

    @property
    def cipher_state(self) -> CipherState:
        """The inner handshake :class:`CipherState`."""
        return self._cs

    @property
    def chaining_key(self) -> bytes:
        """The chaining key ``ck``."""
        return self._ck

    def has_key(self) -> bool:
        """Whether the inner cipher state has a key."""
        return self._cs.has_key()

    def mix_key(self, input_key_material: bytes) -> None:
        """``MixKey(ikm)``: ``ck, temp_k = HKDF(ck, ikm, 2)``; key the cipher with
        ``temp_k[:32]``."""
        self._ck, temp_k = _hkdf2(self._ck, input_key_material)
        self._cs.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        """``MixHash(data)``: ``h = HASH(h || data)``."""
        self._h = _hash(self._h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """``MixKeyAndHash(ikm)``: mix a pre-shared key into both ``ck`` and ``h``
        (section 9)."""
        self._ck, temp_h, temp_k = _hkdf3(self._ck, input_key_material)
        self.mix_hash(temp_h)
        self._cs.initialize_key(temp_k[:KEYLEN])

    def get_handshake_hash(self) -> bytes:
        """``GetHandshakeHash()``: return ``h`` (for channel binding, section 11.2)."""
        return self._h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """``EncryptAndHash(plaintext)``: encrypt with ``h`` as associated data, then mix
        the ciphertext into ``h``.

        Raises:
            LocalProtocolError: the nonce is exhausted.
        """
        ciphertext = self._cs.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """``DecryptAndHash(ciphertext)``: decrypt with ``h`` as associated data, then mix
        the ciphertext into ``h``.

        Raises:
            DecryptionError: authentication failed.
        """
        plaintext = self._cs.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """``Split()``: derive the two transport cipher states.

        Returns:
            ``(initiator_to_responder, responder_to_initiator)``.
        """
        temp_k1, temp_k2 = _hkdf2(self._ck, b"")
        cipher = self._cs.cipher_name
        return CipherState(cipher, temp_k1[:KEYLEN]), CipherState(cipher, temp_k2[:KEYLEN])


# ---------------------------------------------------------------------------------------
# Handshake patterns (sections 7.4, 7.5, 9.4 and 18.1)
# ---------------------------------------------------------------------------------------

Tokens: TypeAlias = tuple[str, ...]


class Pattern:
    """A handshake pattern: pre-messages and message patterns, as tuples of tokens.

    Attributes:
        name: the pattern name section, modifiers included (``"XXpsk3"``).
        initiator_pre: tokens of the initiator's pre-message (``("s",)`` or ``()``).
        responder_pre: tokens of the responder's pre-message.
        messages: one tuple of tokens per handshake message, initiator's first.
    """

    __slots__ = ("initiator_pre", "messages", "name", "responder_pre")

    def __init__(
        self, name: str, initiator_pre: Tokens, responder_pre: Tokens, messages: tuple[Tokens, ...]
    ) -> None:
        self.name = name
        self.initiator_pre = initiator_pre
        self.responder_pre = responder_pre
        self.messages = messages

    @property
    def one_way(self) -> bool:
        """Whether only the initiator sends (patterns ``N``, ``K``, ``X``)."""
        return len(self.messages) == 1

    @property
    def has_psk(self) -> bool:
        """Whether the pattern has a ``psk`` token (then every ``e`` also calls MixKey)."""
        return any("psk" in m for m in self.messages)

    def __repr__(self) -> str:
        return f"<Pattern {self.name} {self.initiator_pre} {self.responder_pre} {self.messages}>"


# name: (initiator pre-message, responder pre-message, messages separated by "|")
# Copied from the specification: one-way 7.4, fundamental 7.5, deferred 18.1.
_PATTERN_TABLE: Final[dict[str, tuple[str, str, str]]] = {
    # one-way
    "N": ("", "s", "e es"),
    "K": ("s", "s", "e es ss"),
    "X": ("", "s", "e es s ss"),
    # fundamental interactive
    "NN": ("", "", "e | e ee"),
    "NK": ("", "s", "e es | e ee"),
    "NX": ("", "", "e | e ee s es"),
    "XN": ("", "", "e | e ee | s se"),
    "XK": ("", "s", "e es | e ee | s se"),
    "XX": ("", "", "e | e ee s es | s se"),
    "KN": ("s", "", "e | e ee se"),
    "KK": ("s", "s", "e es ss | e ee se"),
    "KX": ("s", "", "e | e ee se s es"),
    "IN": ("", "", "e s | e ee se"),
    "IK": ("", "s", "e es s ss | e ee se"),
    "IX": ("", "", "e s | e ee se s es"),
    # deferred
    "NK1": ("", "s", "e | e ee es"),
    "NX1": ("", "", "e | e ee s | es"),
    "X1N": ("", "", "e | e ee | s | se"),
    "X1K": ("", "s", "e es | e ee | s | se"),
    "XK1": ("", "s", "e | e ee es | s se"),
    "X1K1": ("", "s", "e | e ee es | s | se"),
    "X1X": ("", "", "e | e ee s es | s | se"),
    "XX1": ("", "", "e | e ee s | es s se"),
    "X1X1": ("", "", "e | e ee s | es s | se"),
    "K1N": ("s", "", "e | e ee | se"),
    "K1K": ("s", "s", "e es | e ee | se"),
    "KK1": ("s", "s", "e | e ee se es"),
    "K1K1": ("s", "s", "e | e ee es | se"),
    "K1X": ("s", "", "e | e ee s es | se"),
    "KX1": ("s", "", "e | e ee se s | es"),
    "K1X1": ("s", "", "e | e ee s | se es"),
    "I1N": ("", "", "e s | e ee | se"),
    "I1K": ("", "s", "e es s | e ee | se"),
    "IK1": ("", "s", "e s | e ee se es"),
    "I1K1": ("", "s", "e s | e ee es | se"),
    "I1X": ("", "", "e s | e ee s es | se"),
    "IX1": ("", "", "e s | e ee se s | es"),
    "I1X1": ("", "", "e s | e ee s | se es"),
}

PATTERNS: Final[frozenset[str]] = frozenset(_PATTERN_TABLE)
"""Names of the supported base handshake patterns (without modifiers)."""

_PATTERN_SECTION_RE: Final = re.compile(
    r"(?P<base>[A-Z][A-Z0-9]*?)(?P<modifiers>[a-z][a-z0-9]*(?:\+[a-z][a-z0-9]*)*)?"
)
_PSK_MODIFIER_RE: Final = re.compile(r"psk([0-9]+)")


def _base_pattern(name: str) -> Pattern:
    pre_i, pre_r, msgs = _PATTERN_TABLE[name]
    return Pattern(
        name,
        tuple(pre_i.split()),
        tuple(pre_r.split()),
        tuple(tuple(m.split()) for m in msgs.split("|")),
    )


def _parse_pattern_section(section: str) -> Pattern:
    match = _PATTERN_SECTION_RE.fullmatch(section)
    if match is None:
        raise ValueError(f"malformed Noise handshake pattern section {section!r}")
    base, modifiers = match.group("base"), match.group("modifiers")
    if base not in _PATTERN_TABLE:
        raise ValueError(
            f"unsupported Noise handshake pattern {base!r}: expected one of "
            f"{', '.join(sorted(_PATTERN_TABLE))}"
        )
    pattern = _base_pattern(base)
    if not modifiers:
        return pattern
    messages = [list(m) for m in pattern.messages]
    seen: set[int] = set()
    for modifier in modifiers.split("+"):
        psk = _PSK_MODIFIER_RE.fullmatch(modifier)
        if psk is None:
            raise ValueError(
                f"unsupported Noise pattern modifier {modifier!r}: only pskN is supported"
            )
        index = int(psk.group(1))
        if index in seen:
            raise ValueError(f"duplicate Noise pattern modifier {modifier!r}")
        seen.add(index)
        if index == 0:
            messages[0].insert(0, "psk")  # psk0: start of the first message
        elif index <= len(messages):
            messages[index - 1].append("psk")  # pskN: end of the N-th message
        else:
            raise ValueError(
                f"Noise modifier {modifier!r} is out of range for pattern {base!r}, "
                f"which has {len(messages)} message(s)"
            )
    return Pattern(
        section, pattern.initiator_pre, pattern.responder_pre, tuple(tuple(m) for m in messages)
    )


def parse_protocol_name(protocol_name: str) -> tuple[Pattern, str]:
    """Parse a Noise protocol name such as ``"Noise_XXpsk3_25519_AESGCM_BLAKE2b"``.

    Args:
        protocol_name: the full protocol name.

    Returns:
        ``(pattern, cipher_name)``.

    Raises:
        ValueError: the name is malformed or names an unsupported pattern, modifier, DH
            function, cipher or hash.
    """
    if not isinstance(protocol_name, str):
        raise TypeError(f"protocol_name must be str, not {type(protocol_name).__name__}")
    if len(protocol_name.encode("utf-8")) > 255:
        raise ValueError("Noise protocol name is longer than 255 bytes")
    parts = protocol_name.split("_")
    if len(parts) != 5 or parts[0] != "Noise":
        raise ValueError(
            f"malformed Noise protocol name {protocol_name!r}: expected "
            "'Noise_<pattern>_<dh>_<cipher>_<hash>', e.g. 'Noise_XX_25519_AESGCM_BLAKE2b'"
        )
    _, section, dh, cipher, hash_name = parts
    if dh != "25519":
        raise ValueError(f"unsupported Noise DH function {dh!r}: only '25519' is supported")
    if cipher not in CIPHERS:
        raise ValueError(
            f"unsupported Noise cipher {cipher!r}: expected one of {', '.join(CIPHERS)}"
        )
    if hash_name != "BLAKE2b":
        raise ValueError(
            f"unsupported Noise hash function {hash_name!r}: only 'BLAKE2b' is supported"
        )
    return _parse_pattern_section(section), cipher


# ---------------------------------------------------------------------------------------
# HandshakeState (section 5.3)
# ---------------------------------------------------------------------------------------


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

        self._s = _private_key(s, "s") if s is not None else None
        self._s_public = self._s.public_key().public_bytes_raw() if self._s is not None else None
        self._e = _private_key(e, "e") if e is not None else None
        self._e_public = self._e.public_key().public_bytes_raw() if self._e is not None else None
        self._rs = _check_public(rs, "rs") if rs is not None else None
        self._re = _check_public(re, "re") if re is not None else None

        self._check_key_material(pattern)

        psk_count = sum(m.count("psk") for m in pattern.messages)
        psk_list = [_check_key(p, "pre-shared key") for p in psks]
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
                if _is_low_order(value):
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
        self._ss.mix_key(_dh(local, remote))

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
