"""Noise's key schedule: :class:`CipherState` (section 5.1) and :class:`SymmetricState`
(section 5.2).

A :class:`CipherState` holds a key and a nonce counter and encrypts with the cipher
function of ``_noise_crypto.py`` (its nonce layout and ``REKEY`` are the ones the record
layer uses too). A :class:`SymmetricState` adds the chaining key and the handshake hash:
it is what a handshake mixes keys and messages into, and what :meth:`SymmetricState.split`
turns into the two transport cipher states. Neither knows about patterns or messages:
``_noise.py`` drives them.

Errors: authentication failures raise :class:`~monte_trio._exceptions.DecryptionError`
(opaque, translated from :class:`cryptography.exceptions.InvalidTag`); nonce exhaustion
and rekeying without a key raise :class:`~monte_trio._exceptions.LocalProtocolError`;
an unsupported cipher or a key that is not 32 bytes raises :class:`ValueError`.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from .._exceptions import DecryptionError, LocalProtocolError
from ._noise_crypto import (
    HASHLEN,
    KEYLEN,
    MAX_NONCE,
    AEADCipher,
    check_cipher,
    check_key,
    hkdf2,
    hkdf3,
    noise_hash,
)

__all__ = ["CipherState", "SymmetricState"]


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

    __slots__ = ("_aead", "_format", "_k", "_n", "cipher_name")

    def __init__(self, cipher: str = "AESGCM", key: bytes | None = None) -> None:
        self._format = check_cipher(cipher)
        self.cipher_name: str = cipher
        self._k: bytes | None = None
        self._aead: AEADCipher | None = None
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
            self._k = check_key(key)
            self._aead = self._format.aead(self._k)
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
        return self._format.pack(self._n)

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
        self.initialize_key(self._format.rekey(self._k))
        self._n = n


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
        h = name.ljust(HASHLEN, b"\x00") if len(name) <= HASHLEN else noise_hash(name)
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
        self._ck, temp_k = hkdf2(self._ck, input_key_material)
        self._cs.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        """``MixHash(data)``: ``h = HASH(h || data)``."""
        self._h = noise_hash(self._h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """``MixKeyAndHash(ikm)``: mix a pre-shared key into both ``ck`` and ``h``
        (section 9)."""
        self._ck, temp_h, temp_k = hkdf3(self._ck, input_key_material)
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
        temp_k1, temp_k2 = hkdf2(self._ck, b"")
        cipher = self._cs.cipher_name
        return CipherState(cipher, temp_k1[:KEYLEN]), CipherState(cipher, temp_k2[:KEYLEN])
