"""Atomic file writes, and one-line reasons when an output cannot be written.

One mechanism for every small output of the project (weights files, manifests, tokenizer
models, checkpoint files, run info): write a temporary file beside the target, flush and
fsync it, ``os.replace`` it over the target, fsync the directory; on any failure (Ctrl-C
included) the temporary file is removed and the target is untouched.

Writes never follow a symbolic link: the temporary file is created anew (``O_EXCL |
O_NOFOLLOW``) and the final rename replaces whatever is at the target, a planted link included,
instead of writing through it (:func:`atomic_write`, :func:`atomic_write_path`,
:func:`atomic_copy`). Relative paths read from input files (an index's file names, a
checkpoint's file list) are accepted only when they stay inside their directory
(:func:`is_relative_inside`).

Every output location is checked once at start-up with :func:`ensure_writable_dir` (the
trainer's --save/--log-dir/--tensorboard-dir, every tool's output), so a read-only or full
destination fails before any work is done. A write that fails later (the disk filled up
during the run) is reported by :func:`describe_os_error` in one line that names the path and
the cause ("no space left on device writing <path>; free space or point --save elsewhere"),
never as a library's internal message.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
import zipfile
from pathlib import PurePosixPath
from typing import Any, Callable, IO, Iterator, Optional

from megatron_dga.errors import ConfigError, OutputError

NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)
"""What ``np.load`` raises for a missing, truncated or damaged ``.npz``/``.npy`` (a missing member's KeyError is
the caller's to add): every reader of the project's arrays catches this one tuple."""


class NotNpzError(ValueError):
    """The file :func:`load_npz` was given is not an ``.npz`` archive (a text file, a ``.npy``, a pickle)."""


def sha256_files(*paths: str | os.PathLike) -> str:
    """SHA-256 of the contents of ``paths`` one after the other (read in 1 MiB blocks), hex."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_npz(path: str | os.PathLike):
    """``np.load(path, allow_pickle=False)`` of an ``.npz`` archive, for every reader of the project's arrays.

    The zip signature is checked first: numpy would take any other file for a pickle and answer with advice to
    allow pickles (which can run code; never follow it here). Raises :class:`NotNpzError` saying what the file
    starts with instead, or what ``np.load`` raises (:data:`NPZ_READ_ERRORS`).
    """
    import numpy as np

    with open(path, "rb") as fh:
        head = fh.read(6)
    if not head.startswith(b"PK"):
        kind = (
            "it is empty"
            if not head
            else "it is a single .npy array"
            if head.startswith(b"\x93NUMPY")
            else "it is a pickle"
            if head[:1] == b"\x80"
            else f"it starts with {head!r}, not a zip archive"
        )
        raise NotNpzError(f"not an .npz archive ({kind})")
    return np.load(path, allow_pickle=False)


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM}
_NOT_A_DIR = {errno.ENOTDIR, errno.EEXIST}  # EEXIST: makedirs found a file where the directory goes
_EXPLAINED = _NO_SPACE | _DENIED | _NOT_A_DIR | {errno.EROFS}
_LOW_SPACE_BYTES = 16 << 20
"""Below this many free bytes, a writer's short write is taken for a full disk (see describe_os_error)."""
_SHORT_WRITE_MARKERS = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
"""torch's zip writer (torch.save, megatron's async checkpoint writer) reports a full disk with
these words and drops the errno: "[enforce fail at inline_container.cc:...] unexpected pos"."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the per-rank failures of a torch.distributed.checkpoint CheckpointException, and
    the chained causes of each, breadth first."""
    queue, seen = [exc], set()
    while queue:
        e = queue.pop(0)
        if e is None or id(e) in seen or len(seen) > 32:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            queue.extend(f[0] for f in failures.values() if isinstance(f, tuple) and f)
        queue.extend([e.__cause__, e.__context__])


def _file_in_the_way(path: str) -> Optional[str]:
    """The first component of ``path`` that exists and is not a directory (ENOTDIR, EEXIST)."""
    parts = os.path.abspath(path)
    while True:
        if os.path.exists(parts):
            return parts if not os.path.isdir(parts) else None
        parent = os.path.dirname(parts)
        if parent == parts:
            return None
        parts = parent


def _free_bytes(path: str) -> Optional[int]:
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def describe_os_error(exc: BaseException, path: str | os.PathLike, flag: Optional[str] = None) -> str:
    """One line saying why writing ``path`` failed and what to do, for ``exc`` raised by a write.

    Out of space (ENOSPC, EDQUOT), permission (EACCES, EPERM), read-only file system (EROFS)
    and a file where a directory should be (ENOTDIR, EEXIST) are named as such, with the path
    from the OSError itself when it has one. torch's zip writer drops the errno of a full disk
    ("unexpected pos"); such a failure is reported as out of space when the file system holding
    ``path`` has under 16 MiB free. Anything else keeps its type and message (the per-rank
    failures of a torch.distributed.checkpoint CheckpointException without their tracebacks).

    Args:
        exc: the exception the write raised (its causes are searched too).
        path: what was being written (a file or a directory).
        flag: the option that chose the location, e.g. ``--save``; named in the fix.
    """
    path = os.fspath(path)
    elsewhere = f"point {flag} elsewhere" if flag else "write it elsewhere"
    oserrors = [e for e in _causes(exc) if isinstance(e, OSError) and e.errno is not None]
    known = [e for e in oserrors if e.errno in _EXPLAINED]
    if known or oserrors:
        e = (known or oserrors)[0]
        target = e.filename if isinstance(e.filename, str) and e.filename else path
        if e.errno in _NO_SPACE:
            return f"no space left on device writing {target}; free space or {elsewhere}"
        if e.errno in _DENIED:
            return f"permission denied writing {target}; make it writable or {elsewhere}"
        if e.errno == errno.EROFS:
            return f"read-only file system writing {target}; {elsewhere}"
        blocker = _file_in_the_way(target) if e.errno in _NOT_A_DIR else None
        if blocker:
            return f"cannot write {target}: {blocker} is a file, not a directory; {elsewhere}"
        return f"cannot write {target}: {e.strerror or e}; {elsewhere}"
    inner = [e for e in _causes(exc) if e is not exc] if getattr(exc, "failures", None) else []
    text = (
        "; ".join(
            dict.fromkeys(
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}" for e in inner
            )
        )
        or f"{type(exc).__name__}: {exc}"
    )
    if any(marker in text for marker in _SHORT_WRITE_MARKERS):
        free = _free_bytes(path)
        if free is not None and free < _LOW_SPACE_BYTES:
            return (
                f"no space left on device writing {path} ({free} bytes free on its file system; "
                f"the writer said: {text}); free space or {elsewhere}"
            )
    return text


def output_error(
    exc: OSError, path: str | os.PathLike, flag: Optional[str] = None, *, explained_only: bool = True
) -> OSError:
    """``exc`` as an :class:`OutputError` with :func:`describe_os_error`'s message.

    With ``explained_only`` (the default) only the explained errnos (no space, permission,
    read-only, not a directory) are translated and any other ``exc`` is returned as it is, so a
    caller's ``except FileNotFoundError`` keeps working; otherwise every OSError is translated.
    """
    if isinstance(exc, OutputError) or (explained_only and exc.errno not in _EXPLAINED):
        return exc
    err = OutputError(describe_os_error(exc, path, flag))
    err.errno, err.filename = exc.errno, exc.filename or os.fspath(path)
    return err


def ensure_writable_dir(directory: str | os.PathLike, flag: str) -> str:
    """Create ``directory`` if missing and prove a file can be created, written and removed in it.

    Called at start-up for every output location, before any work whose result would be lost.

    Returns:
        ``directory`` as a string.

    Raises:
        ConfigError: naming ``flag``, the directory and the cause (no space, permission,
            read-only file system, a file in the way).
    """
    directory = os.fspath(directory)
    probe = os.path.join(directory, f".megatron-dga-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"0")  # creating an inode can succeed on a full disk; a data block cannot
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag} {directory}: {describe_os_error(exc, directory, flag)}") from None
    return directory


def ensure_writable_parent(path: str | os.PathLike, flag: str) -> str:
    """:func:`ensure_writable_dir` for the directory an output FILE ``path`` goes into; returns ``path``."""
    ensure_writable_dir(os.path.dirname(os.path.abspath(os.fspath(path))), flag)
    return os.fspath(path)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and creations in ``path`` durable (a no-op where the OS/FS refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_exclusive(path: str) -> int:
    """A new file at ``path`` for writing; fails if anything (a symbolic link included) is there."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)


def atomic_write_path(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """:func:`atomic_write` for writers that take a file name: ``write(tmp_path)`` fills a new temporary
    file beside ``path`` (created empty first, so nothing is written through a link), which is then
    fsynced and renamed over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    created = False
    try:
        os.close(_create_exclusive(tmp))
        created = True
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        if created and os.path.lexists(tmp):
            os.unlink(tmp)
        translated = output_error(exc, path) if isinstance(exc, OSError) else exc
        if translated is not exc:
            raise translated from exc
        raise
    fsync_dir(directory)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], *, binary: bool = True) -> None:
    """Write through ``write(fileobj)`` to a temporary file beside ``path``, then rename it over ``path``.

    Text mode is UTF-8 with "\\n" line endings on every platform (deterministic bytes).

    Raises:
        OutputError: no space left, permission denied, read-only file system or a file in the
            way (an ``OSError`` with the original errno, and a message naming ``path``).
    """

    def fill(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            write(f)
            f.flush()

    atomic_write_path(path, fill)


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy ``source``'s bytes (a symbolic link there is followed: it is an input) to ``path`` atomically,
    keeping its permission bits; a link at ``path`` is replaced, never written through."""

    def copy(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        shutil.copymode(source, tmp)

    atomic_write_path(path, copy)


def is_relative_inside(rel: Any) -> bool:
    """True for a relative POSIX path read from an input file that stays inside its directory: not empty,
    not absolute, no ``..`` component, no backslash or NUL (what a file list or an index may name)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel or os.path.isabs(rel):
        return False
    parts = PurePosixPath(rel).parts
    return bool(parts) and not PurePosixPath(rel).is_absolute() and ".." not in parts and parts != (".",)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """JSON with a trailing newline; ``dump_kwargs`` go to ``json.dump`` (indent, sort_keys, default)."""

    def write(f):
        json.dump(obj, f, **dump_kwargs)
        f.write("\n")

    atomic_write(path, write, binary=False)
