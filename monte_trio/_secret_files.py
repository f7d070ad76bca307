"""Secret files on disk: monte_trio's encrypted private-key format and safe file access.

The encrypted format (scrypt + AES-256-GCM in a PEM-like armour, versioned), atomic writes
with mode 0600 that never replace a file unasked, and :func:`read_secret_file`, which every
reader of a secret file (key, psk, passphrase) goes through: it refuses symbolic links,
non-regular files and files that their group or others may access.
:class:`~monte_trio.Identity` (in ``_keys``) builds its key files on this module; the
command line reads psk and passphrase files through it.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shlex
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ._exceptions import KeyFileError

__all__ = [
    "CREATE_HINT",
    "ENCRYPTED_BEGIN",
    "KEY_SIZE",
    "abbreviate",
    "decrypt_private_key",
    "encrypt_private_key",
    "passphrase_bytes",
    "read_named_secret_file",
    "read_secret_file",
    "write_private_file",
]

KEY_SIZE = 32
"""Bytes in an X25519 key, public or private."""

_MAX_SECRET_FILE_SIZE = 64 * 1024
"""The most :func:`read_secret_file` reads: keys, psks and passphrases are far smaller."""


CREATE_HINT = "create one with `monte-trio keygen FILE` or Identity.generate().save(FILE)"


def abbreviate(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def passphrase_bytes(passphrase: bytes | bytearray | memoryview | str | None) -> bytes | None:
    if passphrase is None:
        return None
    if isinstance(passphrase, str):
        return passphrase.encode("utf-8")
    if isinstance(passphrase, (bytes, bytearray, memoryview)):
        return bytes(passphrase)
    raise TypeError(f"a passphrase is bytes or str, not {type(passphrase).__name__}")


# -- monte_trio's encrypted key format ------------------------------------------------------
#
#   -----BEGIN MONTE_TRIO ENCRYPTED PRIVATE KEY-----
#   Format: 1
#   KDF: scrypt n=131072 r=8 p=1
#   Salt: <16 bytes, standard base64>
#   Cipher: AES-256-GCM
#   Nonce: <12 bytes, standard base64>
#
#   <AES-256-GCM(key = scrypt(passphrase, salt, n, r, p, 32), nonce,
#                plaintext = the 32-byte raw X25519 private key,
#                associated data = the header lines above, from "Format" to "Nonce",
#                each ending with "\n"), 48 bytes, standard base64>
#   -----END MONTE_TRIO ENCRYPTED PRIVATE KEY-----

SCRYPT_N = 2**17
"""scrypt's CPU/memory cost for new encrypted key files (128 MiB with ``r=8``)."""
SCRYPT_R = 8
"""scrypt's block size for new encrypted key files."""
SCRYPT_P = 1
"""scrypt's parallelism for new encrypted key files."""
_SCRYPT_MAX_N = 2**20
"""The largest ``n`` a key file may ask for (1 GiB with ``r=8``): bounds a hostile file."""
_SCRYPT_MAX_MEMORY = 1 << 30
_SCRYPT_MAX_P = 16
_FORMAT_VERSION = 1
ENCRYPTED_BEGIN = "-----BEGIN MONTE_TRIO ENCRYPTED PRIVATE KEY-----"
_END = "-----END MONTE_TRIO ENCRYPTED PRIVATE KEY-----"
_SALT_SIZE = 16
_NONCE_SIZE = 12
_CIPHER = "AES-256-GCM"


def _header(n: int, r: int, p: int, salt: bytes, nonce: bytes) -> str:
    return (
        f"Format: {_FORMAT_VERSION}\n"
        f"KDF: scrypt n={n} r={r} p={p}\n"
        f"Salt: {base64.b64encode(salt).decode()}\n"
        f"Cipher: {_CIPHER}\n"
        f"Nonce: {base64.b64encode(nonce).decode()}\n"
    )


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def encrypt_private_key(
    raw: bytes, passphrase: bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> bytes:
    """The content of an encrypted key file holding the raw private key ``raw``.

    :meth:`Identity.save` calls it with the default scrypt parameters; tests may pass
    cheaper ones, since the file records them.
    """
    _check_scrypt_parameters(n, r, p, where="scrypt parameters")
    salt, nonce = secrets.token_bytes(_SALT_SIZE), secrets.token_bytes(_NONCE_SIZE)
    header = _header(n, r, p, salt, nonce)
    sealed = AESGCM(_scrypt(passphrase, salt, n, r, p)).encrypt(nonce, raw, header.encode("ascii"))
    body = base64.b64encode(sealed).decode()
    wrapped = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"{ENCRYPTED_BEGIN}\n{header}\n{wrapped}\n{_END}\n".encode("ascii")


def _check_scrypt_parameters(n: int, r: int, p: int, *, where: str) -> None:
    if (
        n < 2
        or n & (n - 1)
        or n > _SCRYPT_MAX_N
        or not 1 <= r <= 64
        or not 1 <= p <= _SCRYPT_MAX_P
        or 128 * n * r > _SCRYPT_MAX_MEMORY
    ):
        raise KeyFileError(
            f"{where}: unsupported scrypt parameters n={n} r={r} p={p} (n must be a power "
            f"of 2 up to 2**20, 128*n*r at most 1 GiB, p at most {_SCRYPT_MAX_P})"
        )


def decrypt_private_key(name: str, data: bytes, passphrase: bytes) -> bytes:
    """The raw private key of an encrypted key file; KeyFileError if anything is wrong."""
    where = f"key file {name!r}"
    damaged = f"{where} is damaged (not monte_trio's encrypted key format)"
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(damaged) from None
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 4 or lines[0] != ENCRYPTED_BEGIN or lines[-1] != _END or "" not in lines:
        raise KeyFileError(damaged)
    blank = lines.index("")
    fields: dict[str, str] = {}
    for line in lines[1:blank]:
        field, sep, value = line.partition(":")
        if not sep or field in fields:
            raise KeyFileError(damaged)
        fields[field] = value.strip()
    if fields.get("Format") != str(_FORMAT_VERSION):
        raise KeyFileError(
            f"{where} uses encrypted key format {abbreviate(fields.get('Format', '?'))!r}; "
            f"this version of monte_trio reads format {_FORMAT_VERSION}: upgrade monte_trio"
        )
    match = re.fullmatch(r"scrypt n=(\d{1,8}) r=(\d{1,3}) p=(\d{1,3})", fields.get("KDF", ""))
    if match is None or fields.get("Cipher") != _CIPHER or len(fields) != 5:
        raise KeyFileError(
            f"{where} uses an encryption this version of monte_trio does not support "
            f"(KDF {abbreviate(fields.get('KDF', '?'))!r}, cipher "
            f"{abbreviate(fields.get('Cipher', '?'))!r})"
        )
    n, r, p = (int(group) for group in match.groups())
    _check_scrypt_parameters(n, r, p, where=where)
    try:
        salt = base64.b64decode(fields.get("Salt", ""), validate=True)
        nonce = base64.b64decode(fields.get("Nonce", ""), validate=True)
        sealed = base64.b64decode("".join(lines[blank + 1 : -1]), validate=True)
    except ValueError:
        raise KeyFileError(damaged) from None
    if len(salt) != _SALT_SIZE or len(nonce) != _NONCE_SIZE or len(sealed) != KEY_SIZE + 16:
        raise KeyFileError(damaged)
    header = _header(n, r, p, salt, nonce).encode("ascii")
    try:
        return AESGCM(_scrypt(passphrase, salt, n, r, p)).decrypt(nonce, sealed, header)
    except InvalidTag:
        raise KeyFileError(
            f"cannot decrypt {where}: wrong passphrase, or the file is damaged"
        ) from None


def write_private_file(path: str, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` atomically, with mode 0600.

    Raises:
        KeyFileError: ``path`` exists and ``overwrite`` is false, or writing failed.
    """
    if not overwrite and os.path.lexists(path):
        raise KeyFileError(
            f"key file {path!r} already exists; refusing to overwrite a key (pass "
            "overwrite=True to replace it, or choose another path)"
        )
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600
        )
    except OSError as exc:
        raise KeyFileError(
            f"cannot write key file {path!r}: cannot create a file in {directory!r}: "
            f"{exc.strerror or exc}"
        ) from exc
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
    except KeyFileError:
        _unlink_quietly(tmp)
        raise
    except OSError as exc:
        _unlink_quietly(tmp)
        raise KeyFileError(f"cannot write key file {path!r}: {exc.strerror or exc}") from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_directory(directory)


def _move_no_clobber(tmp: str, path: str) -> None:
    """Move ``tmp`` to ``path``, failing if ``path`` appeared meanwhile.

    A hard link fails atomically if the target exists; where hard links are not supported
    (some filesystems), fall back to a check followed by :func:`os.replace`.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(
            f"key file {path!r} already exists; refusing to overwrite a key (pass "
            "overwrite=True to replace it, or choose another path)"
        ) from None
    except OSError:
        if os.path.lexists(path):
            raise KeyFileError(
                f"key file {path!r} already exists; refusing to overwrite a key (pass "
                "overwrite=True to replace it, or choose another path)"
            ) from None
        os.replace(tmp, path)
    else:
        _unlink_quietly(tmp)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- secret files --------------------------------------------------------------------------


def read_secret_file(path: str | os.PathLike[str], *, what: str) -> bytes:
    """Read a small secret file (a private key, a psk, a passphrase) safely.

    The file must be a regular file, not a symbolic link, with no permission bits for its
    group or others (mode 0600 or 0400): a secret that others can read is no longer a
    secret, and one that others can write can be replaced. The file is opened without
    following a symbolic link and its mode is checked on the opened descriptor, so it
    cannot be swapped between the check and the read. On platforms without POSIX modes
    (Windows) only the symbolic link and regular file checks apply.

    Args:
        path: the file.
        what: what the file is, for error messages, e.g. ``"psk file"``.

    Returns:
        The file's content (at most 64 KiB).

    Raises:
        KeyFileError: the file is missing, unreadable, a symbolic link, not a regular
            file, accessible by its group or others, or larger than 64 KiB. The message
            says which and what to do.
    """
    return read_named_secret_file(os.fspath(path), what=what, missing_hint="check the path")


def read_named_secret_file(name: str, *, what: str, missing_hint: str) -> bytes:
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_NOCTTY", 0)
        # Opening a FIFO for reading would block until a writer appears: don't wait, the
        # fstat below refuses it anyway. No effect on regular files.
        | getattr(os, "O_NONBLOCK", 0)
    )
    if not hasattr(os, "O_NOFOLLOW") and os.path.islink(name):  # pragma: no cover
        raise KeyFileError(_symlink_message(name, what))
    try:
        fd = os.open(name, flags)
    except FileNotFoundError as exc:
        if os.path.islink(name):
            raise KeyFileError(_symlink_message(name, what)) from exc
        raise KeyFileError(f"{what} {name!r} does not exist; {missing_hint}") from exc
    except OSError as exc:
        # O_NOFOLLOW on a symbolic link fails with ELOOP (EMLINK or EFTYPE on some BSDs).
        if os.path.islink(name):
            raise KeyFileError(_symlink_message(name, what)) from exc
        raise KeyFileError(f"cannot read {what} {name!r}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(
                f"{what} {name!r} is not a regular file ({_file_kind(info.st_mode)}); "
                "give the path of the file itself"
            )
        _check_private_mode(name, what, info.st_mode)
        chunks: list[bytes] = []
        size = 0
        while size <= _MAX_SECRET_FILE_SIZE:
            chunk = os.read(fd, _MAX_SECRET_FILE_SIZE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {name!r}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if size > _MAX_SECRET_FILE_SIZE:
        raise KeyFileError(
            f"{what} {name!r} is larger than {_MAX_SECRET_FILE_SIZE} bytes, far too large "
            f"for a {what}; is it the right file?"
        )
    return b"".join(chunks)


def _symlink_message(name: str, what: str) -> str:
    return (
        f"{what} {name!r} is a symbolic link; secret files are not read through links "
        f"(a link can be pointed elsewhere): give the path of the file itself"
    )


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


def _check_private_mode(name: str, what: str, mode: int) -> None:
    """Refuse a mode with any permission bit for the group or others (POSIX only)."""
    if os.name != "posix":  # pragma: no cover - no POSIX permission bits to check
        return
    bits = stat.S_IMODE(mode)
    if not bits & 0o077:
        return

    def rights(shift: int) -> str:
        names = [
            right
            for right, bit in (("readable", 4), ("writable", 2), ("executable", 1))
            if bits >> shift & bit
        ]
        return " and ".join(names)

    group, others = rights(3), rights(0)
    if group == others:
        parts = [f"{group} by its group and others"]
    else:
        parts = [f"{r} by {who}" for r, who in ((group, "its group"), (others, "others")) if r]
    raise KeyFileError(
        f"{what} {name!r} has mode {bits:04o}: {'; '.join(parts)}; a secret must be "
        f"private to its owner: run chmod 600 {shlex.quote(name)}"
    )
