"""The jsonl inputs every tool reads: one rule for which files an ``--input`` names, one reader.

``--input`` (and ``--specific``, ``--basis-sets``, ...) take files, quoted globs and
directories. A directory contributes its ``*.jsonl`` and ``*.jsonl.gz`` files, not
recursively; ``*.json`` is left out on purpose, because directories of domains often hold a
``manifest.json`` beside the data (name a ``.json`` file explicitly to read it). A file
named explicitly is read whatever its suffix; a glob takes every file it matches.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from typing import Iterator, Sequence

from megatron_dga.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def is_jsonl_name(name: str) -> bool:
    """Whether a directory entry counts as a jsonl input (see the module docstring)."""
    return name.endswith(JSONL_SUFFIXES)


def jsonl_files_in(directory: str) -> list[str]:
    """The jsonl files directly inside ``directory``, sorted."""
    return sorted(
        os.path.join(directory, n) for n in os.listdir(directory)
        if is_jsonl_name(n) and os.path.isfile(os.path.join(directory, n))
    )


def expand_jsonl_inputs(specs: Sequence[str], flag: str = "--input") -> list[str]:
    """Turn files, globs and directories into a de-duplicated file list.

    Order: the specs in the order given, each expanded in sorted order; a file named twice
    is kept at its first place.

    Raises:
        DataError: a spec matches nothing (the message names ``flag`` and the spec).
    """
    out: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        if os.path.isdir(spec):
            found = jsonl_files_in(spec)
        elif os.path.isfile(spec):
            found = [spec]
        else:
            found = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not found:
            raise DataError(
                f"{flag} {spec!r} matches no jsonl file: pass existing files, a quoted glob, or a directory "
                "of *.jsonl / *.jsonl.gz files"
            )
        for p in found:
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def open_text(path: str):
    """A text handle on a ``.jsonl`` or ``.jsonl.gz`` file (UTF-8)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(paths: Sequence[str]) -> Iterator[tuple[str, int, str]]:
    """Yield ``(path, line_number, raw_line)`` for every non-blank line, in order.

    The raw line has its trailing newline removed. Blank lines are skipped so
    that two passes over the same files enumerate the same documents.
    """
    for path in paths:
        try:
            with open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield path, lineno, line
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e}); convert the file to UTF-8 jsonl") from None
        except (OSError, EOFError) as e:
            raise DataError(f"cannot read '{path}': {e}") from None


def parse_text(raw: str, json_keys: Sequence[str], path: str, lineno: int) -> str:
    """Extract the text of one jsonl line (values of ``json_keys`` joined by a blank line)."""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); every line must be one JSON object") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}:{lineno}: line is a JSON {type(doc).__name__}, expected an object with keys {list(json_keys)}")
    parts = []
    for key in json_keys:
        if key not in doc:
            raise DataError(
                f"{path}:{lineno}: key {key!r} missing (keys present: {sorted(doc)[:10]}); "
                "set --json-keys to the field holding the text"
            )
        value = doc[key]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: value of {key!r} is a {type(value).__name__}, expected a string")
        parts.append(value)
    return "\n\n".join(parts)


def read_jsonl_texts(paths: Sequence[str], json_keys: Sequence[str] = ("text",)) -> list[str]:
    """Read every document's text from jsonl files (see :func:`parse_text`)."""
    return [parse_text(raw, json_keys, p, n) for p, n, raw in iter_jsonl(paths)]
