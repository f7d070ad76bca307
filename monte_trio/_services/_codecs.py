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
import json.encoder
from collections.abc import Callable
from typing import Annotated, Any

from ._errors import CodecError

__all__ = ["Codec", "get_codec"]


class Codec:
    """A codec: encode and decode values, convert a decoded value to an annotation."""

    name = ""
    typed = False
    """Whether :meth:`convert` converts (and validates) values to annotations."""
    null = b""
    """``None`` encoded (made once: a method that returns nothing replies with it)."""

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

    def typed_decoder(self, annotation: Any) -> Callable[[bytes], Any] | None:
        """A function that decodes straight to ``annotation`` (made once per annotation),
        or ``None`` if this codec has none for it.

        It raises :exc:`CodecError` (or the codec's own error) where :meth:`decode`
        followed by :meth:`convert` would fail; the caller then takes that slower path
        for the error's message. Untyped codecs have none.
        """
        return None

    def arguments_decoder(self, annotations: tuple[Any, ...]) -> Callable[[bytes], Any] | None:
        """A function that decodes the arguments ``[[a, b, ...], {}]`` of a method whose
        parameters are annotated ``annotations`` (positional, as many), converted to
        them, to ``(args, {})``; or ``None``. As :meth:`typed_decoder`, it fails where the
        general way would (and for keyword arguments, which it does not take)."""
        return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class JsonCodec(Codec):
    """The standard library's JSON, strict.

    It calls the standard library's C encoder and scanner directly when they exist (what
    :meth:`json.JSONEncoder.encode` and :meth:`json.JSONDecoder.decode` call, less the
    work they repeat on every call); the same bytes, values and errors.
    """

    name = "json"

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
        self._decoder = json.JSONDecoder(parse_constant=_no_constant)
        decoder: Any = self._decoder  # its scan_once is not in the stubs
        self._scan: Callable[[str, int], tuple[Any, int]] = decoder.scan_once
        self._iterencode = _c_encoder(self._encoder)
        self.null = self.encode(None)

    def encode(self, value: object) -> bytes:
        iterencode = self._iterencode
        if iterencode is not None:
            try:
                return "".join(iterencode(value, 0)).encode("utf-8", errors="surrogatepass")
            except (TypeError, ValueError, RecursionError, OverflowError):
                pass  # the standard library's encoder says why (a circular reference...)
        try:
            return self._encoder.encode(value).encode("utf-8", errors="surrogatepass")
        except (TypeError, ValueError, RecursionError, OverflowError) as exc:
            raise CodecError(f"cannot encode as JSON: {_reason(exc)}") from exc

    def decode(self, data: bytes) -> Any:
        try:
            text = data.decode("utf-8")
            if text and text[0] not in _WHITESPACE:
                try:
                    value, end = self._scan(text, 0)
                except StopIteration:
                    pass  # not a value: decode() says where
                else:
                    if end == len(text):
                        return value
            return self._decoder.decode(text)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise CodecError(f"not valid JSON: {_reason(exc)}") from exc


_WHITESPACE = frozenset(" \t\n\r")


def _c_encoder(encoder: json.JSONEncoder) -> Callable[[object, int], Any] | None:
    """The C encoder :meth:`json.JSONEncoder.encode` makes on every call, made once, with
    no circular-reference table (a circular value then fails with RecursionError, and
    :meth:`JsonCodec.encode` asks the standard library's encoder for its message); or
    ``None`` where the C accelerator is missing or encodes differently."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        iterencode: Callable[[object, int], Any] = make(
            None,
            encoder.default,
            json.encoder.encode_basestring,
            None,
            encoder.key_separator,
            encoder.item_separator,
            encoder.sort_keys,
            encoder.skipkeys,
            encoder.allow_nan,
        )
        probe = [[1, 2.5, "\u00e9\x00", None, True, 10**30], {"k": [{}]}]
        if "".join(iterencode(probe, 0)) != encoder.encode(probe):
            return None
    except Exception:
        return None
    return iterencode


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
        self._typed: dict[Any, Callable[[bytes], Any] | None] = {}
        self.null = self.encode(None)

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

    def typed_decoder(self, annotation: Any) -> Callable[[bytes], Any] | None:
        try:
            return self._typed[annotation]
        except KeyError:
            pass
        except TypeError:  # an annotation that cannot be a key
            return None
        try:
            decoder: Callable[[bytes], Any] | None = self._msgspec.msgpack.Decoder(
                annotation
            ).decode
        except Exception:  # a type msgspec does not decode to: convert() says why
            decoder = None
        if len(self._typed) < _TYPED_CACHED:
            self._typed[annotation] = decoder
        return decoder

    def arguments_decoder(self, annotations: tuple[Any, ...]) -> Callable[[bytes], Any] | None:
        msgspec = self._msgspec
        no_keywords = Annotated[dict[str, Any], msgspec.Meta(max_length=0)]
        try:
            decoder: Callable[[bytes], Any] = msgspec.msgpack.Decoder(
                tuple[tuple[annotations], no_keywords]  # type: ignore[valid-type]
            ).decode
        except Exception:  # a type msgspec does not decode to: convert() says why
            return None
        return decoder


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


_TYPED_CACHED = 1024

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
