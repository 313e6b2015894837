"""The jsonl inputs every tool reads: one rule for which files an ``--input`` names, and the readers.

``--input`` (and ``--specific``, ``--basis-sets``, ...) take files, quoted globs and
directories. A directory contributes its ``*.jsonl`` and ``*.jsonl.gz`` files, not
recursively; ``*.json`` is left out on purpose, because directories of domains often hold a
``manifest.json`` beside the data (name a ``.json`` file explicitly to read it). A file
named explicitly is read whatever its suffix; a glob takes every file it matches.

Two reading policies, for two kinds of tools:

* strict (:func:`iter_jsonl`, :func:`parse_text`, :func:`read_jsonl_texts`): every non-blank
  line is a document and a bad one is a DataError naming ``file:line``; the clustering and
  importance tools need it, since their outputs are aligned line by line with the inputs;
* skip and count (:func:`iter_line_batches`, :func:`parse_line`, :func:`sample_documents`): a
  bad line is skipped and counted by reason (``blank_line``, ``invalid_utf8``, ``invalid_json``,
  ``not_object``, ``missing_key``, ``not_string``, ``empty_text``), so one broken line in a
  large crawl never stops tokenizer training or preprocessing (tools/train_tokenizer.py,
  tools/preprocess_data.py report the counts at the end).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
from typing import Iterator, Optional, Sequence

from megatron_dga.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
LINE_BATCH = 256
"""Lines per batch of :func:`iter_line_batches` (the unit handed to tokenizer worker processes)."""


def is_jsonl_name(name: str) -> bool:
    """Whether a directory entry counts as a jsonl input (see the module docstring)."""
    return name.endswith(JSONL_SUFFIXES)


def jsonl_stem(path: str) -> str:
    """What a jsonl file stands for, by name (a domain, a shard, a basis set): its basename without
    ``.jsonl.gz``, ``.jsonl`` (or ``.json.gz``, ``.json``). ``data/law.jsonl.gz`` -> ``law``."""
    base = os.path.basename(os.path.normpath(path))
    for suffix in (".jsonl.gz", ".jsonl", ".json.gz", ".json"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def jsonl_files_in(directory: str) -> list[str]:
    """The jsonl files directly inside ``directory``, sorted."""
    return sorted(
        os.path.join(directory, n)
        for n in os.listdir(directory)
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
        raise DataError(
            f"{path}:{lineno}: line is a JSON {type(doc).__name__}, expected an object with keys {list(json_keys)}"
        )
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


# --------------------------------------------------------------------------- skip and count
def total_bytes(files: Sequence[str]) -> Optional[int]:
    """Bytes the files hold, for a progress bar's total; None when one is gzipped (its size on disk
    is not what is read)."""
    if any(f.endswith(".gz") for f in files):
        return None
    return sum(os.path.getsize(f) for f in files)


def iter_line_batches(files: Sequence[str], batch_lines: int = LINE_BATCH) -> Iterator[list[tuple[int, int, bytes]]]:
    """Every raw line of ``files`` (blank ones included), in order, in batches of ``batch_lines``
    ``(file index, line number, raw bytes)``; undecoded, so a worker process decodes and a bad
    encoding is one skipped line (:func:`parse_line`).

    Raises:
        DataError: a file cannot be read (naming it).
    """
    batch: list[tuple[int, int, bytes]] = []
    for fi, path in enumerate(files):
        try:
            with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    batch.append((fi, lineno, raw))
                    if len(batch) >= batch_lines:
                        yield batch
                        batch = []
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
            raise DataError(f"--input file {path!r} could not be read: {exc}.") from None
    if batch:
        yield batch


def parse_line(raw: bytes, keys: Sequence[str]) -> tuple[str, Optional[list[str]]]:
    """``("ok", [text of each key])``, or ``(reason, None)`` for a line to skip (module docstring)."""
    if not raw.strip():
        return ("blank_line", None)
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ("invalid_utf8", None)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return ("invalid_json", None)
    if not isinstance(obj, dict):
        return ("not_object", None)
    texts = []
    for key in keys:
        if key not in obj:
            return ("missing_key", None)
        text = obj[key]
        if not isinstance(text, str):
            return ("not_string", None)
        if not text.strip():
            return ("empty_text", None)
        texts.append(text)
    return ("ok", texts)


def sample_documents(
    files: Sequence[str],
    json_keys: Sequence[str],
    sample_docs: Optional[int],
    seed: int,
) -> tuple[list[str], dict[str, int]]:
    """A deterministic uniform sample of texts from jsonl files (reservoir sampling).

    Args:
        files: jsonl(.gz) files, read in the given order.
        json_keys: fields to take; every key of an accepted line contributes one text.
        sample_docs: number of texts to keep; ``None`` keeps all.
        seed: seed of the reservoir.

    Returns:
        ``(texts in input order, {skipped reason: count})``.
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    bad: dict[str, int] = {}
    seen = 0
    keys = tuple(json_keys)
    for batch in iter_line_batches(files):
        for _, _, raw in batch:
            status, texts = parse_line(raw, keys)
            if status != "ok":
                bad[status] = bad.get(status, 0) + 1
                continue
            for text in texts:
                if sample_docs is None or len(reservoir) < sample_docs:
                    reservoir.append((seen, text))
                else:
                    j = rng.randrange(seen + 1)
                    if j < sample_docs:
                        reservoir[j] = (seen, text)
                seen += 1
    reservoir.sort(key=lambda item: item[0])
    return [t for _, t in reservoir], bad
