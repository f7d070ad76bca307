"""The errors of a method call: codes, the exceptions a caller gets, the registry of
remote errors (:func:`remote_error`)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

from .._exceptions import MonteError, RemoteError

__all__ = [
    "CodecError",
    "InvalidArguments",
    "MethodErrorCode",
    "MethodNotFound",
    "RemoteMethodError",
    "error_class",
    "registered_name",
    "remote_error",
]

_E = TypeVar("_E", bound=type[BaseException])


class MethodErrorCode(enum.IntEnum):
    """Why a method call failed: the code an error reply carries (docs/services.rst)."""

    APPLICATION = 1
    """The method raised an exception registered with :func:`remote_error`; its
    registered name says which."""
    INTERNAL = 2
    """The method raised an unregistered exception (a bug), or its result could not be
    encoded."""
    NOT_FOUND = 3
    """No method of that name is registered."""
    INVALID_ARGUMENTS = 4
    """The arguments did not decode, or did not fit the method's parameters (count,
    names, or, with a typed codec, their annotations). The method did not run."""
    DEADLINE_EXCEEDED = 5
    """The caller's deadline passed before the method ran, or while it ran (it was
    cancelled)."""
    NOT_IDEMPOTENT = 6
    """The call was marked idempotent by the caller, but the method is not declared
    idempotent here. The method did not run."""
    INVALID_CALL = 7
    """The message was not a valid call envelope. Nothing ran."""


class RemoteMethodError(RemoteError):
    """A method call failed at the peer: the error reply's code, name, message and details.

    Raised for every error reply whose registered name is not known here (see
    :func:`remote_error`), and as the ``__cause__`` of a registered exception raised in
    its place. The connection is still usable.

    Attributes:
        code: why it failed: a :class:`MethodErrorCode` (or the plain number of a code
            unknown to this version).
        name: the exception's registered name (``""`` if it has none).
        message: the text the peer sent (escaped: no control characters).
        details: the structured details the peer sent, decoded, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        code: MethodErrorCode | int = MethodErrorCode.INTERNAL,
        name: str = "",
        details: Any = None,
    ) -> None:
        super().__init__(message)
        try:
            code = MethodErrorCode(code)
        except ValueError:
            pass
        self.code = code
        self.name = name
        self.details = details

    def __str__(self) -> str:
        label = self.code.name if isinstance(self.code, MethodErrorCode) else f"code {self.code}"
        what = f"{self.name}, {label}" if self.name else label
        return f"{self.message} ({what})"


class MethodNotFound(RemoteMethodError):
    """The peer has no method of that name (code :attr:`MethodErrorCode.NOT_FOUND`)."""


class InvalidArguments(RemoteMethodError):
    """The peer refused the arguments (code :attr:`MethodErrorCode.INVALID_ARGUMENTS`):
    the method did not run."""


class CodecError(MonteError):
    """A value could not be encoded or decoded by the connection's codec.

    Raised by a call whose arguments do not encode (nothing was sent), or whose reply
    does not decode or, with a typed codec, does not match the annotated result type.
    """


_BY_NAME: dict[str, type[BaseException]] = {}
_BY_CLASS: dict[type[BaseException], str] = {}
_CODE_CLASSES: dict[int, type[RemoteMethodError]] = {
    MethodErrorCode.NOT_FOUND: MethodNotFound,
    MethodErrorCode.INVALID_ARGUMENTS: InvalidArguments,
}


def remote_error(name: str) -> Callable[[_E], _E]:
    """Register an exception class under ``name``, on both sides of a call.

    A method that raises it (or a subclass not registered itself) sends an error reply
    with code :attr:`MethodErrorCode.APPLICATION`, the name, ``str(exc)`` as the message
    and the exception's ``details`` attribute, if it has one, as the details. The caller,
    if it registered the same name, raises the class, built as ``cls(message)``, with
    ``details`` set and the :class:`RemoteMethodError` as its ``__cause__``; otherwise
    the :class:`RemoteMethodError` itself::

        @monte_trio.remote_error("kv.NotFound")
        class NotFound(Exception):
            pass

    Args:
        name: the name on the wire (UTF-8, 1 to 65,535 bytes): the same on both sides.

    Raises:
        ValueError: the name is empty or too long, or already names another class.
        TypeError: what is decorated is not an exception class.
    """
    encoded = name.encode("utf-8", errors="surrogatepass")
    if not 0 < len(encoded) <= 0xFFFF:
        raise ValueError("a remote error's name is 1 to 65,535 bytes of UTF-8")

    def register(cls: _E) -> _E:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"remote_error() registers exception classes, not {cls!r}")
        known = _BY_NAME.get(name)
        if known is not None and known is not cls:
            if (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(
                    f"the remote error name {name!r} already names {known.__qualname__}"
                )
            _BY_CLASS.pop(known, None)  # the same class defined again (a module reload)
        _BY_NAME[name] = cls
        _BY_CLASS[cls] = name
        return cls

    return register


def registered_name(exc: BaseException) -> str | None:
    """The name ``exc``'s class (or its nearest registered base) was registered under."""
    for cls in type(exc).__mro__:
        name = _BY_CLASS.get(cls)
        if name is not None:
            return name
    return None


def error_class(code: int, name: str) -> type[BaseException] | None:
    """The class registered under ``name`` for an APPLICATION error, else ``None``."""
    if code == MethodErrorCode.APPLICATION and name:
        return _BY_NAME.get(name)
    return None


def library_error(code: int, message: str, name: str, details: Any) -> RemoteMethodError:
    """The :class:`RemoteMethodError` (or its subclass for ``code``) for an error reply."""
    cls = _CODE_CLASSES.get(code, RemoteMethodError)
    return cls(message, code=code, name=name, details=details)
