"""How arguments, results and error details are encoded: the connection's codec.

* ``json``: the standard library's :mod:`json`, strict (no ``NaN`` or infinities, which
  JSON does not have). Values are JSON's types: ``None``, ``bool``, ``int``, ``float``,
  ``str``, lists (tuples encode as lists) and dicts with string keys. No conversion
  against annotations: a method gets what JSON decodes.
* ``msgpack``: MessagePack through msgspec (the ``msgspec`` extra), typed: besides the
  MessagePack types (``bytes`` included), msgspec Structs, dataclasses and attrs classes
  encode; on decode every argument is converted to, and validated against, the method's
  annotation (and a proxy's result against the Protocol's return annotation).

Either way, one ``bytes`` argument and a ``bytes`` result travel untouched (the envelope
marks them raw), never through the codec.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from ._errors import CodecError

__all__ = ["Codec", "get_codec"]


class Codec:
    """A codec: encode and decode values, convert a decoded value to an annotation."""

    name = ""
    typed = False
    """Whether :meth:`convert` converts (and validates) values to annotations."""

    def encode(self, value: object) -> bytes:
        """Encode ``value``.

        Raises:
            CodecError: it cannot be encoded (the message says why).
        """
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        """Decode ``data`` (untyped).

        Raises:
            CodecError: it does not decode.
        """
        raise NotImplementedError

    def convert(self, value: Any, annotation: Any) -> Any:
        """``value`` converted to ``annotation`` (typed codecs); else ``value`` itself.

        Raises:
            CodecError: it does not match the annotation.
        """
        return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class JsonCodec(Codec):
    """The standard library's JSON, strict."""

    name = "json"

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
        self._decoder = json.JSONDecoder(parse_constant=_no_constant)

    def encode(self, value: object) -> bytes:
        try:
            return self._encoder.encode(value).encode("utf-8", errors="surrogatepass")
        except (TypeError, ValueError, RecursionError, OverflowError) as exc:
            raise CodecError(f"cannot encode as JSON: {_reason(exc)}") from exc

    def decode(self, data: bytes) -> Any:
        try:
            return self._decoder.decode(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise CodecError(f"not valid JSON: {_reason(exc)}") from exc


class MsgpackCodec(Codec):
    """MessagePack through msgspec, with conversion to annotations."""

    name = "msgpack"
    typed = True

    def __init__(self) -> None:
        try:
            msgspec: Any = importlib.import_module("msgspec")
        except ImportError:
            raise CodecError(
                "codec 'msgpack' needs msgspec: pip install monte_trio[msgspec]"
            ) from None
        self._msgspec = msgspec
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder().decode
        self._errors = (msgspec.MsgspecError, TypeError, ValueError, OverflowError, RecursionError)

    def encode(self, value: object) -> bytes:
        try:
            data: bytes = self._encode(value)
        except self._errors as exc:
            raise CodecError(f"cannot encode as MessagePack: {_reason(exc)}") from exc
        return data

    def decode(self, data: bytes) -> Any:
        try:
            return self._decode(data)
        except self._errors as exc:
            raise CodecError(f"not valid MessagePack: {_reason(exc)}") from exc

    def convert(self, value: Any, annotation: Any) -> Any:
        if annotation is Any:
            return value
        try:
            return self._msgspec.convert(value, annotation)
        except self._errors as exc:
            raise CodecError(_reason(exc)) from exc


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


_CODECS: dict[str, Codec] = {}


def get_codec(name: str) -> Codec:
    """The codec called ``name`` (``"json"`` or ``"msgpack"``), made once.

    Raises:
        CodecError: ``msgpack`` without msgspec installed.
    """
    codec = _CODECS.get(name)
    if codec is None:
        codec = _CODECS[name] = JsonCodec() if name == "json" else MsgpackCodec()
    return codec
