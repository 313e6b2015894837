"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

One mechanism for every small output of the project (weights files, manifests, tokenizer
models, checkpoint files, run info): write a temporary file beside the target, flush and
fsync it, ``os.replace`` it over the target, fsync the directory; on any failure (Ctrl-C
included) the temporary file is removed and the target is untouched.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable, IO


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


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], *, binary: bool = True) -> None:
    """Write through ``write(fileobj)`` to a temporary file beside ``path``, then rename it over ``path``.

    Text mode is UTF-8 with "\\n" line endings on every platform (deterministic bytes).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="\n") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


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
