"""jsonl -> megatron-core indexed shards (the library behind ``tools/preprocess_data.py``).

Inputs (``PreprocessConfig.input``): a ``.jsonl`` file, a ``.jsonl.gz`` file, a glob of such
files (all concatenated into one shard, in sorted path order), or a DIRECTORY of per-domain
``*.jsonl``/``*.jsonl.gz`` files. In directory mode every file becomes its own shard, named by
the file stem (``web.jsonl.gz`` -> ``web``), and ``output_prefix`` is a directory:
``<output_prefix>/<stem>_<key>_document.{bin,idx,json}``. Otherwise the outputs are
``<output_prefix>_<key>_document.{bin,idx,json}`` (Megatron's naming; ``key`` is each of
``json_keys``, ``text`` by default).

Each shard is written with megatron-core's ``IndexedDatasetBuilder`` and
``DType.optimal_dtype(vocab_size)``, one document per accepted jsonl line, and is readable by
``megatron.core.datasets.indexed_dataset.IndexedDataset``. :func:`copy_documents` writes the
first documents of an existing shard as a shard of their own, the same way.

Bad lines never stop a run (``megatron_dga.prep.inputs``' skip-and-count reading). They are
skipped, counted per reason and reported at the end with the first few ``file:line`` locations.
Reasons: ``invalid_utf8``, ``invalid_json``,
``not_object`` (valid JSON that is not an object), ``missing_key``, ``not_string``,
``empty_text`` (empty/whitespace-only text, or text that tokenizes to nothing),
``untokenizable`` (the tokenizer refused the text, e.g. NullTokenizer given a non-integer
token; the location comes with the tokenizer's message) and ``blank_line``. A line bad for
one json key is skipped for every key, so the shards of different keys stay document-aligned.

Outputs: every output directory is created and probed (a file written and removed) before
any input is read, so an unwritable or full destination fails at once in one line naming
``--output-prefix``; a write that fails later (the disk filled up) is reported the same way.

Atomicity: each shard is built into ``<final>.tmp-<pid>`` files next to the target. When
complete, the old ``.idx`` is removed, then the ``.bin`` and finally the ``.idx`` are moved
into place with ``os.replace``, and the sidecar last; a reader never sees a complete ``.idx``
beside a partial ``.bin``. On any exception (Ctrl-C and, through ``tools/preprocess_data.py``,
SIGTERM included) the temp files are removed and previous outputs stay untouched. Temp files
left by a process that could not clean up (SIGKILL, a power cut) are removed by the next run
writing into the same directory, once their ``<pid>`` is no longer alive.

Sidecar ``<prefix>_<key>_document.json`` (format ``megatron-dga/shard-v1``), fields:

* ``format``: ``"megatron-dga/shard-v1"``.
* ``tokenizer_type``, ``tokenizer_model`` (absolute path or null), ``tokenizer_sha256``
  (SHA-256 of the tokenizer files), ``vocab_size``, ``eod``, ``pad``, ``bos``: the
  tokenizer's ``fingerprint()``; the trainer compares them with its own tokenizer.
* ``dtype``: numpy dtype name of the token ids in the ``.bin`` (``uint16``/``int32``).
* ``append_eod``: whether ``eod`` ends every document.
* ``json_key``: the jsonl field tokenized.
* ``num_documents``, ``num_tokens`` (eod included), ``num_bytes`` (UTF-8 bytes of the text).
* ``sources``: the input files (absolute paths), ``bad_lines``: ``{reason: count}``.
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megatron_dga.data.tokenizers import BaseTokenizer, TokenizerSpec
from megatron_dga.errors import ConfigError, DataError, DGAError
from megatron_dga.fileio import ensure_writable_dir, output_error
from megatron_dga.prep.inputs import iter_line_batches, jsonl_files_in, jsonl_stem, parse_line, total_bytes
from megatron_dga.prep.progress import Progress

logger = logging.getLogger(__name__)

SHARD_FORMAT = "megatron-dga/shard-v1"
BAD_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "not_object",
    "missing_key",
    "not_string",
    "empty_text",
    "untokenizable",
    "blank_line",
)
"""Why a line is skipped: :func:`megatron_dga.prep.inputs.parse_line`'s reasons, and ``untokenizable``."""
_FIRST_BAD_KEPT = 5


@dataclass
class PreprocessConfig:
    """What to tokenize, how, and where to write it."""

    input: str
    """A jsonl(.gz) file, a glob of them, or a directory of per-domain ``*.jsonl[.gz]``."""
    output_prefix: str
    """Output prefix; a directory in directory mode (see the module docstring)."""
    tokenizer: TokenizerSpec
    """How to build the tokenizer (also rebuilt in every worker)."""
    json_keys: Sequence[str] = ("text",)
    """jsonl fields to tokenize; one shard per key (``<prefix>_<key>_document``)."""
    append_eod: bool = False
    """Append the tokenizer's ``eod`` after every document."""
    workers: int = 1
    """Tokenizer processes (``--workers``); 1 tokenizes in this process. Order is preserved."""
    log_interval: int = 10000
    """Documents between progress log lines when no progress bar is shown."""
    progress: Optional[bool] = None
    """``None``: a tqdm bar when stderr is a terminal, log lines otherwise; ``True``: always the bar;
    ``False``: neither (``--no-progress``). See :class:`megatron_dga.prep.progress.Progress`."""

    def __post_init__(self):
        if not self.input:
            raise ConfigError("--input is required: a jsonl file, a glob or a directory.")
        if not self.output_prefix:
            raise ConfigError("--output-prefix is required.")
        keys = list(self.json_keys)
        if not keys or any(not isinstance(k, str) or not k.strip() for k in keys):
            raise ConfigError(f"--json-keys {keys!r}: give one or more non-empty field names, e.g. --json-keys text.")
        if len(set(keys)) != len(keys):
            raise ConfigError(f"--json-keys {keys!r} repeats a key; list each key once.")
        self.json_keys = tuple(keys)
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers} must be >= 1.")
        if self.log_interval < 1:
            raise ConfigError(f"--log-interval {self.log_interval} must be >= 1.")


@dataclass
class ShardResult:
    """One written shard (one input group x one json key)."""

    prefix: str
    """Path prefix of ``.bin``/``.idx``/``.json`` (``..._<key>_document``)."""
    json_key: str
    """The tokenized field."""
    num_documents: int
    """Documents written."""
    num_tokens: int
    """Tokens written (eod included)."""
    sources: list[str]
    """Input files of this shard."""
    bad_lines: dict[str, int] = field(default_factory=dict)
    """Skipped lines per reason."""
    first_bad: list[str] = field(default_factory=list)
    """``file:line reason`` of the first few skipped lines."""


# --------------------------------------------------------------------------- input discovery
def resolve_inputs(input_spec: str, output_prefix: str) -> list[tuple[str, list[str]]]:
    """Map ``--input`` to ``[(shard_prefix_without_key, [files])]``.

    Raises:
        DataError: nothing matches, or a directory holds no jsonl file.
    """
    if os.path.isdir(input_spec):
        files = jsonl_files_in(input_spec)
        if not files:
            raise DataError(
                f"--input {input_spec!r} is a directory without *.jsonl or *.jsonl.gz files. "
                "Put one jsonl file per domain in it."
            )
        names = [jsonl_stem(f) for f in files]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DataError(
                f"--input {input_spec!r}: several files map to the domain name(s) {dupes} "
                "(e.g. a.jsonl and a.jsonl.gz). Keep one file per domain."
            )
        return [(os.path.join(output_prefix, n), [f]) for n, f in zip(names, files)]
    if os.path.isfile(input_spec):
        return [(output_prefix, [input_spec])]
    matches = sorted(p for p in glob.glob(input_spec) if os.path.isfile(p))
    if not matches:
        raise DataError(
            f"--input {input_spec!r}: no such file or directory, and no file matches it as a "
            "glob. Check the path (quote globs so the shell does not expand them)."
        )
    return [(output_prefix, matches)]


# --------------------------------------------------------------------------- tokenisation
_WORKER_TOKENIZER: Optional[BaseTokenizer] = None
_WORKER_KEYS: tuple[str, ...] = ()
_WORKER_EOD: bool = False


def _init_worker(spec: TokenizerSpec, keys: tuple[str, ...], append_eod: bool, ignore_sigint: bool):
    global _WORKER_TOKENIZER, _WORKER_KEYS, _WORKER_EOD
    if ignore_sigint:
        # Only the parent handles Ctrl-C, so it can clean up its temp files.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the tool's SIGTERM handler (unwind and clean up); the parent owns
    # the files, and Pool.terminate() ends workers with SIGTERM, so workers just die.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER_TOKENIZER = spec.build()
    _WORKER_KEYS = keys
    _WORKER_EOD = append_eod


def _set_local_tokenizer(tok: BaseTokenizer, keys: tuple[str, ...], append_eod: bool):
    global _WORKER_TOKENIZER, _WORKER_KEYS, _WORKER_EOD
    _WORKER_TOKENIZER, _WORKER_KEYS, _WORKER_EOD = tok, keys, append_eod


def _encode_line(raw: bytes):
    """``("ok", [ids per key], nbytes)`` or ``("bad", reason, detail or None)``."""
    status, texts = parse_line(raw, _WORKER_KEYS)
    if status != "ok":
        return ("bad", status, None)
    tok = _WORKER_TOKENIZER
    out = []
    nbytes = 0
    for text in texts:
        try:
            ids = tok.tokenize(text)
        except DGAError as exc:  # the tokenizer refused this text (e.g. NullTokenizer: not integers)
            return ("bad", "untokenizable", str(exc))
        if not ids:
            return ("bad", "empty_text", None)
        if _WORKER_EOD:
            ids.append(tok.eod)
        out.append(np.asarray(ids, dtype=np.int64))
        nbytes += len(text.encode("utf-8"))
    return ("ok", out, nbytes)


def _encode_batch(batch: list[tuple[int, int, bytes]]):
    return [(fi, ln, len(raw), _encode_line(raw)) for fi, ln, raw in batch]


# --------------------------------------------------------------------------- writing
class _ShardWriter:
    """Builds one shard into temp files; ``commit`` moves them into place."""

    def __init__(self, prefix: str, dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        tag = f".tmp-{os.getpid()}"
        self.bin_tmp = prefix + ".bin" + tag
        self.idx_tmp = prefix + ".idx" + tag
        self.json_tmp = prefix + ".json" + tag
        self.dtype = dtype
        self.builder = IndexedDatasetBuilder(self.bin_tmp, dtype=dtype)
        self.num_documents = 0
        self.num_tokens = 0
        self.num_bytes = 0
        self._finalized = False

    def add(self, ids: np.ndarray, nbytes: int) -> None:
        self.builder.add_document(ids, [len(ids)])
        self.num_documents += 1
        self.num_tokens += len(ids)
        self.num_bytes += nbytes

    def finalize(self, sidecar: dict) -> None:
        self.builder.finalize(self.idx_tmp)
        self._finalized = True
        with open(self.json_tmp, "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2, sort_keys=True)
            f.write("\n")

    def commit(self) -> None:
        if not self._finalized:
            raise RuntimeError("commit() before finalize()")
        idx, bin_, js = self.prefix + ".idx", self.prefix + ".bin", self.prefix + ".json"
        # Drop the old index first: between the two renames a reader finds no dataset
        # rather than an old index pointing into a new .bin.
        if os.path.exists(idx):
            os.unlink(idx)
        os.replace(self.bin_tmp, bin_)
        os.replace(self.idx_tmp, idx)
        os.replace(self.json_tmp, js)

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
        except Exception:  # already closed or never opened
            pass
        for path in (self.bin_tmp, self.idx_tmp, self.json_tmp):
            if os.path.exists(path):
                os.unlink(path)


def _process_group(
    base_prefix: str,
    files: list[str],
    config: PreprocessConfig,
    tokenizer: BaseTokenizer,
    pool,
) -> list[ShardResult]:
    from megatron.core.datasets.indexed_dataset import DType

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefixes = [f"{base_prefix}_{key}_document" for key in config.json_keys]
    writers: list[_ShardWriter] = []
    bad: dict[str, int] = {}
    first_bad: list[str] = []
    progress = Progress(
        total_bytes(files),
        os.path.basename(base_prefix) or base_prefix,
        unit="B",
        enabled=config.progress,
        log_every=config.log_interval,
    )
    try:
        for prefix in prefixes:
            writers.append(_ShardWriter(prefix, dtype))
        batches = iter_line_batches(files)
        results = pool.imap(_encode_batch, batches) if pool is not None else map(_encode_batch, batches)
        for batch in results:
            docs = 0
            nbytes = 0
            for fi, lineno, rawlen, (status, payload, textbytes) in batch:
                nbytes += rawlen
                if status == "bad":  # textbytes: the tokenizer's message for "untokenizable"
                    bad[payload] = bad.get(payload, 0) + 1
                    if len(first_bad) < _FIRST_BAD_KEPT:
                        detail = f" ({textbytes})" if textbytes else ""
                        first_bad.append(f"{files[fi]}:{lineno} {payload}{detail}")
                    continue
                for writer, ids in zip(writers, payload):
                    writer.add(ids, textbytes)
                docs += 1
            progress.update(nbytes, docs=docs)
        fingerprint = tokenizer.fingerprint()
        for writer, key in zip(writers, config.json_keys):
            if writer.num_documents == 0:
                raise DataError(
                    f"--input {config.input!r}: no valid document for --json-keys {key!r} in "
                    f"{files} (skipped lines: {bad or 'none'}; first: {first_bad}). Check the "
                    "key name and the file contents."
                )
            sidecar = dict(fingerprint)
            sidecar.update(
                format=SHARD_FORMAT,
                dtype=np.dtype(dtype).name,
                append_eod=bool(config.append_eod),
                json_key=key,
                num_documents=writer.num_documents,
                num_tokens=writer.num_tokens,
                num_bytes=writer.num_bytes,
                sources=[os.path.abspath(f) for f in files],
                bad_lines=dict(sorted(bad.items())),
            )
            writer.finalize(sidecar)
        for writer in writers:
            writer.commit()
    except BaseException as exc:
        for writer in writers:
            writer.abort()
        if isinstance(exc, OSError) and not isinstance(exc, DGAError):  # e.g. the disk filled up
            raise output_error(exc, base_prefix, "--output-prefix", explained_only=False) from exc
        raise
    finally:
        progress.close()
    return [
        ShardResult(p, k, w.num_documents, w.num_tokens, list(files), dict(bad), list(first_bad))
        for p, k, w in zip(prefixes, config.json_keys, writers)
    ]


def preprocess(config: PreprocessConfig, tokenizer: Optional[BaseTokenizer] = None) -> list[ShardResult]:
    """Tokenize the inputs of ``config`` into megatron-core shards.

    Args:
        config: what to read and write.
        tokenizer: an already built tokenizer for in-process work (``workers == 1``);
            built from ``config.tokenizer`` when omitted.

    Returns:
        One ``ShardResult`` per shard written, in input order then ``json_keys`` order.

    Raises:
        ConfigError / DataError: bad flags, missing input, no valid document.
    """
    groups = resolve_inputs(config.input, config.output_prefix)
    for out_dir in sorted({os.path.dirname(os.path.abspath(prefix)) for prefix, _ in groups}):
        ensure_writable_dir(out_dir, "--output-prefix")
        remove_stale_temp_files(out_dir)
    if tokenizer is None:
        tokenizer = config.tokenizer.build()
    keys = tuple(config.json_keys)
    results: list[ShardResult] = []
    pool = None
    try:
        if config.workers > 1:
            pool = multiprocessing.get_context().Pool(
                config.workers,
                initializer=_init_worker,
                initargs=(config.tokenizer, keys, config.append_eod, True),
            )
        else:
            _set_local_tokenizer(tokenizer, keys, config.append_eod)
        for base_prefix, files in groups:
            results.extend(_process_group(base_prefix, files, config, tokenizer, pool))
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        _set_local_tokenizer(None, (), False)
    return results


def copy_documents(source: str, prefix: str, count: int) -> ShardResult:
    """The first ``count`` documents of the shard ``source`` as a shard of their own at ``prefix``
    (e.g. a little specific set cut from a target's shard: the same documents as the first
    ``count`` lines of its jsonl, without tokenising again).

    Written like every shard here (temp files moved into place, previous outputs untouched on
    failure). The sidecar is ``source``'s (so the trainer's tokenizer check holds) with the copy's
    ``num_documents`` and ``num_tokens``, ``num_bytes`` null and ``subset_of``: ``{"shard",
    "documents"}``.

    Raises:
        DataError: ``source`` is missing or corrupt (naming it); ``count`` < 1.
    """
    from megatron_dga.prep.shard_corpus import ShardCorpus

    if count < 1:
        raise DataError(f"copy_documents: count {count} must be >= 1")
    corpus = ShardCorpus([source], "shard")
    n = min(int(count), corpus.num_documents)
    docs = corpus.gather(np.arange(n))
    sidecar: dict = {}
    if os.path.isfile(source + ".json"):
        with open(source + ".json", encoding="utf-8") as fh:
            sidecar = json.load(fh)
    sidecar.update(
        num_documents=n,
        num_tokens=int(docs.offsets[-1]),
        num_bytes=None,
        subset_of={"shard": os.path.abspath(source), "documents": [0, n]},
    )
    out_dir = os.path.dirname(os.path.abspath(prefix))
    ensure_writable_dir(out_dir, "output prefix")
    remove_stale_temp_files(out_dir)
    writer = None
    try:
        writer = _ShardWriter(prefix, corpus.infos[0].dtype.type)  # (megatron wants the numpy type)
        for i in range(n):
            writer.add(docs.tokens[docs.offsets[i] : docs.offsets[i + 1]], 0)
        writer.finalize(sidecar)
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return ShardResult(
        prefix, str(sidecar.get("json_key", "text")), n, int(docs.offsets[-1]), [os.path.abspath(source)]
    )


_TEMP_FILE = re.compile(r"_document\.(bin|idx|json)\.tmp-(\d+)$")
"""A shard temp file of _ShardWriter: ``<prefix>_<key>_document.{bin,idx,json}.tmp-<pid>``."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temp_files(directory: str) -> list[str]:
    """Remove the shard temp files in ``directory`` whose writing process is gone (SIGKILL, a crash).

    Only names :class:`_ShardWriter` produces are considered, and only when ``<pid>`` is not a
    live process here: a concurrent run's files are left alone. Returns the removed paths.
    """
    removed = []
    for name in sorted(os.listdir(directory)):
        match = _TEMP_FILE.search(name)
        if match is None or int(match.group(2)) == os.getpid() or _pid_alive(int(match.group(2))):
            continue
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
        except FileNotFoundError:  # another run cleaned it up first
            continue
        removed.append(path)
    if removed:
        logger.warning(
            "removed %d temporary file(s) of interrupted earlier runs in %s (e.g. %s)",
            len(removed),
            directory,
            os.path.basename(removed[0]),
        )
    return removed


def format_report(results: Sequence[ShardResult]) -> str:
    """Human-readable summary: shards, documents, tokens and skipped lines per reason."""
    lines = []
    for r in results:
        lines.append(f"{r.prefix}: {r.num_documents} documents, {r.num_tokens} tokens")
        if r.bad_lines:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(r.bad_lines.items()))
            lines.append(f"  skipped {sum(r.bad_lines.values())} lines ({counts}); first:")
            lines.extend(f"    {loc}" for loc in r.first_bad)
    return "\n".join(lines)
