"""Noise handshake patterns (sections 7.4, 7.5, 9 and 18.1) and protocol names (section 8).

This module owns the table of supported patterns, copied from the specification (one-way,
fundamental interactive and deferred), the ``pskN`` modifiers, and
:func:`parse_protocol_name`, which turns ``"Noise_XXpsk3_25519_AESGCM_BLAKE2b"`` into a
:class:`Pattern` and a cipher name. It is pure data and parsing: ``_noise.py`` interprets
the patterns.
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias

from ._noise_crypto import CIPHERS

__all__ = ["PATTERNS", "Pattern", "Tokens", "parse_protocol_name"]

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
