"""Per-domain megatron-core datasets built from Megatron shard prefixes, with validation.

One *domain* is one shard prefix ``<dir>/<name>_text_document`` (files ``.bin`` and
``.idx`` written by megatron-core's ``IndexedDatasetBuilder`` / Megatron's
``tools/preprocess_data.py``). For every domain we open megatron-core's
``IndexedDataset`` and wrap it in one ``GPTDataset`` holding exactly one epoch of
``sequence_length``-token samples (megatron's own document/sample/shuffle indices), so
``GPTDataset[i]`` for ``0 <= i < num_samples`` is the i-th sample of the domain. The
blending level (megatron's ``BlendedDataset``) is replaced by
:class:`megatron_dga.data.sampler.DynamicMixtureSampler`, which picks
``(domain_id, sample_index)`` pairs.

Megatron-core reads the ``.idx`` header with bare asserts and maps the files without
checking their sizes, so a truncated or foreign file fails deep inside numpy. We check
every shard *before* megatron opens it (:func:`inspect_shard`) and raise
:class:`~megatron_dga.errors.DataError` naming the file, the problem and the fix.

Typical use::

    names, prefixes, weights = parse_data_path("0.3 data/web_text_document 0.7 data/code_text_document")
    domains = build_domain_datasets(prefixes, tokenizer, DomainDatasetConfig(sequence_length=1024))
    domains.num_samples   # per-domain samples (sequences) in one epoch
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_dga.errors import ConfigError, DataError

_TEXT_DOCUMENT_SUFFIX = "_text_document"

# Layout of megatron-core's MMIDIDX index (indexed_dataset._IndexWriter):
# magic (9 bytes) | version <Q | dtype code <B | sequence count <Q | document count <Q |
# int32 sequence lengths | int64 sequence pointers | int64 document indices | [int8 modes].
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# The dtype codes megatron-core understands (indexed_dataset.DType).
_DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


# --------------------------------------------------------------------------------------
# --data-path parsing
# --------------------------------------------------------------------------------------
def domain_name(prefix: str) -> str:
    """The domain name of a shard prefix: its basename without a trailing ``_text_document``.

    Args:
        prefix: shard prefix such as ``data/web_text_document``.

    Returns:
        The name, e.g. ``web``.
    """
    base = os.path.basename(os.path.normpath(prefix))
    if base.endswith(_TEXT_DOCUMENT_SUFFIX) and len(base) > len(_TEXT_DOCUMENT_SUFFIX):
        base = base[: -len(_TEXT_DOCUMENT_SUFFIX)]
    return base


def parse_data_path(
    data_path: Union[str, Sequence[str]],
) -> Tuple[List[str], List[str], Optional[List[float]]]:
    """Parse Megatron's ``--data-path`` into domain names, prefixes and weights.

    Two forms are accepted, as in Megatron: ``W1 P1 W2 P2 ...`` (weights need not sum to
    one; they are normalised) or plain prefixes ``P1 P2 ...`` (weights ``None``: the
    caller decides, e.g. natural or uniform mixing).

    Args:
        data_path: one whitespace-separated string or the list of tokens argparse gives
            for ``--data-path`` with ``nargs='*'``.

    Returns:
        ``(names, prefixes, weights)``; ``weights`` is ``None`` for the plain form,
        otherwise floats summing to one.

    Raises:
        DataError: an odd number of tokens in the weighted form, a weight that is not a
            finite number >= 0, all weights zero, or two prefixes with the same name.
    """
    tokens = data_path.split() if isinstance(data_path, str) else [str(t) for t in data_path]
    if not tokens:
        raise DataError("--data-path is empty: give shard prefixes, e.g. 'data/web_text_document'")

    def _is_number(tok: str) -> bool:
        try:
            float(tok)
        except ValueError:
            return False
        return True

    weights: Optional[List[float]]
    if _is_number(tokens[0]):
        if len(tokens) % 2:
            raise DataError(
                f"--data-path {' '.join(tokens)!r}: the weighted form needs pairs 'W1 P1 W2 P2 ...', "
                f"got {len(tokens)} tokens"
            )
        raw_weights, prefixes = tokens[0::2], tokens[1::2]
        weights = []
        for tok, prefix in zip(raw_weights, prefixes):
            if not _is_number(tok):
                raise DataError(
                    f"--data-path: expected a weight before {prefix!r}, got {tok!r}; use 'W1 P1 W2 P2 ...' "
                    "or prefixes only"
                )
            w = float(tok)
            if not math.isfinite(w) or w < 0:
                raise DataError(f"--data-path: weight {tok!r} of {prefix!r} must be a finite number >= 0")
            weights.append(w)
        total = sum(weights)
        if total <= 0:
            raise DataError(f"--data-path: all weights are zero ({raw_weights}); give at least one positive weight")
        weights = [w / total for w in weights]
    else:
        prefixes = tokens
        for tok in prefixes:
            if _is_number(tok):
                raise DataError(
                    f"--data-path: {tok!r} looks like a weight in the prefix-only form; either give a weight "
                    "before every prefix or none"
                )
        weights = None
    names = [domain_name(p) for p in prefixes]
    _check_unique_names(names, prefixes)
    return names, list(prefixes), weights


def read_data_args_file(path: str) -> List[str]:
    """The --data-path value stored in ``path`` (--data-args-path), as tokens, validated.

    Megatron's format: the file's whitespace-separated text is the flag's value
    (``W1 P1 W2 P2 ...`` or prefixes), on one line or many.

    Raises:
        ConfigError: the file cannot be read, is empty, or is not a valid --data-path value.
    """
    where = f"--data-args-path {path}"
    try:
        with open(path, encoding="utf-8") as fh:
            tokens = fh.read().split()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{where}: not a text file; it should hold the --data-path value, "
            "e.g. '0.3 data/web_text_document 0.7 data/code_text_document'"
        ) from None
    if not tokens:
        raise ConfigError(
            f"{where}: the file is empty; it should hold the --data-path value, "
            "e.g. '0.3 data/web_text_document 0.7 data/code_text_document'"
        )
    _parse_as(tokens, where)
    return tokens


_PER_SPLIT_KEYS = ("train", "valid", "test")


def read_per_split_data_args(path: str) -> Dict[str, Optional[List[str]]]:
    """Megatron's --per-split-data-args-path JSON: {"train": [...], "valid": [...], "test": [...]}.

    Each value is a --data-path value: a list of tokens or one whitespace-separated string;
    "valid" and "test" may be missing, null or empty.

    Returns:
        ``{"train": tokens, "valid": tokens or None, "test": tokens or None}``, each parsed once.

    Raises:
        ConfigError: unreadable file, not a JSON object, unknown keys, no "train", or a value
            that is not a valid --data-path value.
    """
    where = f"--per-split-data-args-path {path}"
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{where}: not valid JSON ({exc})") from None
    example = '{"train": ["0.7", "data/web_text_document", "0.3", "data/code_text_document"], "valid": [...]}'
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object like {example}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_PER_SPLIT_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; Megatron's keys are {list(_PER_SPLIT_KEYS)}")
    out: Dict[str, Optional[List[str]]] = {}
    for key in _PER_SPLIT_KEYS:
        value = raw.get(key)
        if isinstance(value, str):
            value = value.split()
        if value is not None and (
            not isinstance(value, list)
            or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise ConfigError(
                f"{where}: \"{key}\" must be a list of weights and prefixes (or one string), got {value!r:.80}"
            )
        tokens = [str(v) for v in value] if value else None
        if tokens:
            _parse_as(tokens, f'{where}: "{key}"')
        out[key] = tokens
    if not out["train"]:
        raise ConfigError(f"{where}: \"train\" is missing or empty; it gives the training domains, e.g. {example}")
    return out


def _parse_as(tokens: List[str], where: str) -> None:
    """parse_data_path(tokens), its errors naming ``where`` instead of --data-path."""
    try:
        parse_data_path(tokens)
    except DataError as exc:
        message = str(exc)
        if message.startswith("--data-path"):
            message = message[len("--data-path") :].lstrip(": ")
        raise ConfigError(f"{where}: {message}") from None


def _check_unique_names(names: Sequence[str], prefixes: Sequence[str]) -> None:
    seen: Dict[str, str] = {}
    for name, prefix in zip(names, prefixes):
        if name in seen:
            raise DataError(
                f"duplicate domain name {name!r}: prefixes {seen[name]!r} and {prefix!r} have the same basename; "
                "rename one shard (a domain's name is its basename without '_text_document')"
            )
        seen[name] = prefix


# --------------------------------------------------------------------------------------
# Shard inspection (before megatron-core touches the files)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    """What the ``.idx`` header of one shard says, after validation."""

    prefix: str
    """The shard prefix (without ``.bin``/``.idx``)."""
    dtype: Any
    """numpy dtype of the token ids in the ``.bin`` file."""
    num_sequences: int
    """Number of sequences (megatron's 'sequence' = one ``add_document`` length entry)."""
    num_documents: int
    """Number of documents."""
    num_tokens: int
    """Total tokens stored in the ``.bin`` file."""


def inspect_shard(prefix: str) -> ShardInfo:
    """Validate a shard's ``.idx``/``.bin`` pair and return its header.

    Checks, each failing with a :class:`DataError` naming the file: both files exist;
    magic and version; a known dtype code; the ``.idx`` size equals what its header
    implies (truncated or padded files); and the body megatron-core indexes with (all
    vectorised, a few passes over the index even for millions of sequences): lengths
    >= 0; the first pointer 0 and every other one the previous pointer + previous length
    * itemsize (``IndexedDatasetBuilder`` writes sequences back to back, so anything
    else is corruption); document indices non-decreasing from 0 to the sequence count;
    the ``.bin`` holds every byte the index points to.

    Args:
        prefix: shard prefix, e.g. ``data/web_text_document``.

    Returns:
        The validated :class:`ShardInfo`.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            other = bin_path if path == idx_path else idx_path
            hint = (
                f" ({other} exists: the pair is incomplete, re-run preprocessing)"
                if os.path.isfile(other)
                else " (neither file exists: check the prefix; Megatron shards are '<prefix>_text_document.{bin,idx}')"
            )
            raise DataError(f"shard file {path} is missing{hint}")
    idx_size = os.path.getsize(idx_path)
    if idx_size < _IDX_HEADER_BYTES:
        raise DataError(
            f"{idx_path} is truncated: {idx_size} bytes, shorter than the {_IDX_HEADER_BYTES}-byte MMIDIDX header; "
            "re-run preprocessing"
        )
    with open(idx_path, "rb") as f:
        header = f.read(_IDX_HEADER_BYTES)
    magic = header[:9]
    if magic != _IDX_MAGIC:
        raise DataError(
            f"{idx_path} is not a megatron MMIDIDX index (magic {magic!r}, expected {_IDX_MAGIC!r}); "
            "regenerate it with megatron's IndexedDatasetBuilder / tools/preprocess_data.py"
        )
    (version,) = struct.unpack("<Q", header[9:17])
    if version != 1:
        raise DataError(f"{idx_path}: unsupported index version {version} (megatron-core reads version 1)")
    code = header[17]
    if code not in _DTYPE_CODES:
        raise DataError(f"{idx_path}: unknown token dtype code {code} (known: {sorted(_DTYPE_CODES)})")
    dtype = np.dtype(_DTYPE_CODES[code])
    num_seq, num_doc_idx = struct.unpack("<QQ", header[18:34])
    expected = _IDX_HEADER_BYTES + num_seq * (4 + 8) + num_doc_idx * 8
    # The optional trailing int8 mode array (multimodal shards) adds num_seq bytes.
    if idx_size not in (expected, expected + num_seq):
        state = "truncated" if idx_size < expected else "longer than its header says"
        raise DataError(
            f"{idx_path} is {state}: header declares {num_seq} sequences and {num_doc_idx} document boundaries "
            f"= {expected} bytes, file has {idx_size}; the index is corrupt, re-run preprocessing"
        )
    if num_doc_idx == 0:
        raise DataError(f"{idx_path}: document index is empty (corrupt index); re-run preprocessing")
    lengths, pointers, doc_idx = _index_arrays(idx_path, num_seq, num_doc_idx)
    _check_index_body(idx_path, dtype, lengths, pointers, doc_idx)
    num_tokens = int(lengths.sum(dtype=np.int64))
    # Pointers are contiguous from 0 (checked above), so this is where the last sequence ends.
    needed = num_tokens * dtype.itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size < needed:
        raise DataError(
            f"{bin_path} is truncated: {idx_path} points to {needed} bytes of {dtype.name} tokens, "
            f"the file has {bin_size}; re-run preprocessing"
        )
    return ShardInfo(prefix, dtype, int(num_seq), int(num_doc_idx) - 1, num_tokens)


def _index_arrays(idx_path: str, num_seq: int, num_doc_idx: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read-only views of an ``.idx`` body: int32 lengths, int64 pointers, int64 document indices.

    The views keep the file mapped while they live; call only once the file size matches
    the header (:func:`inspect_shard` checks it first).
    """
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    off = _IDX_HEADER_BYTES
    lengths = np.frombuffer(mm, dtype=np.int32, count=num_seq, offset=off)
    pointers = np.frombuffer(mm, dtype=np.int64, count=num_seq, offset=off + 4 * num_seq)
    doc_idx = np.frombuffer(mm, dtype=np.int64, count=num_doc_idx, offset=off + 12 * num_seq)
    return lengths, pointers, doc_idx


def _check_index_body(
    idx_path: str, dtype: np.dtype, lengths: np.ndarray, pointers: np.ndarray, doc_idx: np.ndarray
) -> None:
    """DataError for the first inconsistency in an ``.idx`` body (see :func:`inspect_shard`).

    A garbled pointer or length otherwise surfaces mid-training as a numpy error or as
    silently wrong tokens, since megatron-core trusts these arrays as they are.
    """
    fix = "the index is corrupt, re-run preprocessing"
    num_seq = lengths.size
    bad = np.flatnonzero(lengths < 0)
    if bad.size:
        raise DataError(
            f"{idx_path}: sequence {int(bad[0])} has negative length {int(lengths[bad[0]])} "
            f"({bad.size} negative lengths in all); {fix}"
        )
    if num_seq and pointers[0] != 0:
        raise DataError(f"{idx_path}: the first sequence starts at byte {int(pointers[0])}, expected 0; {fix}")
    if num_seq > 1:
        # megatron's _IndexWriter stores pointers = exclusive cumsum(lengths) * itemsize.
        expected = pointers[:-1] + lengths[:-1].astype(np.int64) * dtype.itemsize
        bad = np.flatnonzero(pointers[1:] != expected)
        if bad.size:
            i = int(bad[0]) + 1
            raise DataError(
                f"{idx_path}: sequence {i} starts at byte {int(pointers[i])}, expected {int(expected[i - 1])} "
                f"(sequence {i - 1} starts at byte {int(pointers[i - 1])} and holds {int(lengths[i - 1])} "
                f"{dtype.name} tokens; sequences are stored back to back); {fix}"
            )
    if doc_idx[0] != 0 or doc_idx[-1] != num_seq:
        raise DataError(
            f"{idx_path}: document indices run from {int(doc_idx[0])} to {int(doc_idx[-1])}, expected 0 to the "
            f"{num_seq} sequences; {fix}"
        )
    # Non-decreasing from 0 to num_seq also keeps every index within [0, num_seq].
    bad = np.flatnonzero(np.diff(doc_idx) < 0)
    if bad.size:
        i = int(bad[0]) + 1
        raise DataError(
            f"{idx_path}: document {i} starts at sequence {int(doc_idx[i])}, before document {i - 1} "
            f"(sequence {int(doc_idx[i - 1])}); document indices must not decrease; {fix}"
        )


def read_sidecar_vocab_size(prefix: str) -> Optional[int]:
    """The ``vocab_size`` recorded next to a shard by ``tools/preprocess_data.py``, if any.

    Looked up at ``<prefix>.json`` and, for ``<x>_text_document`` prefixes, ``<x>.json``.
    The second name is also what Megatron-LM's own inputs are often called (a jsonl corpus
    ``<x>.json`` beside its shards), so there a file that is not one JSON object is skipped,
    not an error.

    Returns:
        The vocabulary size, or ``None`` when no sidecar exists or it has no ``vocab_size``.

    Raises:
        DataError: ``<prefix>.json`` is unreadable, not a JSON object, or either sidecar's
            vocab_size is not a positive int.
    """
    candidates = [prefix + ".json"]
    if prefix.endswith(_TEXT_DOCUMENT_SUFFIX):
        candidates.append(prefix[: -len(_TEXT_DOCUMENT_SUFFIX)] + ".json")
    for path in candidates:
        if not os.path.isfile(path):
            continue
        fallback = path != candidates[0]
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
            if fallback:
                continue
            raise DataError(f"shard sidecar {path} is not valid JSON ({exc}); fix or delete it") from None
        if not isinstance(meta, dict):
            if fallback:
                continue
            raise DataError(
                f"shard sidecar {path} holds a JSON {type(meta).__name__}, expected an object with vocab_size "
                "(tools/preprocess_data.py writes one); fix or delete it"
            )
        if "vocab_size" not in meta:
            return None
        value = meta["vocab_size"]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DataError(
                f"shard sidecar {path}: vocab_size must be a positive int, got {value!r}; fix it or delete the "
                "sidecar (the shard's token ids are then checked against the tokenizer instead)"
            )
        return value
    return None


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------
@dataclass
class DomainDatasetConfig:
    """How each domain's megatron-core ``GPTDataset`` is built."""

    sequence_length: int
    """Tokens per sample (--seq-length). Each sample reads sequence_length + 1 tokens (inputs + shifted labels)."""
    seed: int = 1234
    """Seed of megatron's per-domain document shuffle and sample shuffle (--seed)."""
    reset_position_ids: bool = False
    """Restart position ids after every end-of-document token (--reset-position-ids)."""
    reset_attention_mask: bool = False
    """Block attention across documents (--reset-attention-mask); needs create_attention_mask."""
    eod_mask_loss: bool = False
    """Zero the loss on end-of-document tokens (--eod-mask-loss)."""
    create_attention_mask: bool = False
    """Return a per-sample (1, S, S) attention mask. Off by default: the trainer builds one causal mask."""
    path_to_cache: Optional[str] = None
    """Directory of megatron's index cache (--data-cache-path): each GPTDataset's document, sample and
    shuffle indices are saved there on first use and loaded by later runs on the same data. None
    builds them in memory at every start-up."""
    check_vocab: bool = True
    """Compare the sidecar ``<prefix>.json`` vocab_size (when present) with the tokenizer's vocab size."""
    check_token_ids: bool = False
    """Scan every .bin for its largest token id and require it < vocab size (reads all data once)."""
    token_id_sample_bytes: int = 8 << 20
    """Bytes of each shard scanned at start-up for ids outside [0, vocab size) when no sidecar vouches for
    the vocabulary (its head and tail, and documents drawn at random); 0 skips it. Bounded so start-up stays
    fast; every batch is checked again when collated (``MixtureDataset``). check_token_ids scans everything."""
    mmap: bool = True
    """Memory-map the .bin files (megatron's --mmap-bin-files)."""

    def __post_init__(self) -> None:
        if not isinstance(self.sequence_length, int) or self.sequence_length < 1:
            raise ConfigError(f"--seq-length must be a positive integer, got {self.sequence_length!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"--seed must be an integer, got {self.seed!r}")
        if not isinstance(self.token_id_sample_bytes, int) or self.token_id_sample_bytes < 0:
            raise ConfigError(
                f"token_id_sample_bytes must be an integer >= 0 (0 skips the sample), got {self.token_id_sample_bytes!r}"
            )
        if self.reset_attention_mask and not self.create_attention_mask:
            raise ConfigError("--reset-attention-mask needs per-sample attention masks: set create_attention_mask=True")


class _TokenizerView:
    """The slice of a tokenizer megatron's GPTDatasetConfig reads, for any tokenizer-like object.

    megatron-core hashes ``config.tokenizer.unique_identifiers`` into its dataset
    description and reads ``.eod``, ``.pad`` and ``.vocab_size``; our tokenizers (and
    test doubles) need only provide ``eod`` and ``vocab_size`` (``pad`` optional).
    """

    def __init__(self, tokenizer: Any) -> None:
        for attr in ("eod", "vocab_size"):
            if not hasattr(tokenizer, attr):
                raise ConfigError(
                    f"tokenizer {type(tokenizer).__name__} has no .{attr}; GPT datasets need .eod and .vocab_size"
                )
        self.eod = int(tokenizer.eod)
        self.vocab_size = int(tokenizer.vocab_size)
        pad = getattr(tokenizer, "pad", None)
        try:
            self.pad = int(pad) if pad is not None else -1
        except (TypeError, ValueError, NotImplementedError):
            self.pad = -1
        self.unique_identifiers = {
            "class": type(tokenizer).__name__,
            "eod": self.eod,
            "pad": self.pad,
            "vocab_size": self.vocab_size,
        }


@dataclass
class DomainDatasets:
    """The training domains: one megatron-core ``GPTDataset`` per shard prefix."""

    names: List[str]
    """Domain names (basename without ``_text_document``), in --data-path order."""
    prefixes: List[str]
    """Shard prefixes, same order."""
    datasets: List[Any]
    """megatron-core ``GPTDataset`` per domain; ``datasets[i][j]`` is sample j of domain i."""
    shards: List[ShardInfo]
    """Validated header of each shard."""
    sequence_length: int
    """Tokens per sample."""
    num_samples: np.ndarray = field(init=False)
    """int64 (k,): samples (sequences) per domain in one epoch."""
    num_tokens: np.ndarray = field(init=False)
    """int64 (k,): tokens stored per domain."""

    def __post_init__(self) -> None:
        self.num_samples = np.array([len(d) for d in self.datasets], dtype=np.int64)
        self.num_tokens = np.array([s.num_tokens for s in self.shards], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.datasets)


def build_domain_datasets(
    prefixes: Sequence[str],
    tokenizer: Any,
    config: DomainDatasetConfig,
    names: Optional[Sequence[str]] = None,
    documents: Tuple[float, float] = (0.0, 1.0),
) -> DomainDatasets:
    """Validate the shards and build one megatron-core ``GPTDataset`` (one epoch) per domain.

    Args:
        prefixes: shard prefixes, one per domain.
        tokenizer: any object with ``.eod`` and ``.vocab_size`` (``.pad`` optional).
        config: dataset options.
        names: domain names; default: derived from the prefixes by :func:`domain_name`.
        documents: the fraction range of each shard's documents to use, e.g. (0, 0.98)
            for training and (0.98, 1) for a held-out validation part (Megatron's
            --split, applied per domain, contiguous in document order).

    Returns:
        The :class:`DomainDatasets`.

    Raises:
        DataError: a missing/corrupt/truncated shard, an empty domain (no documents or
            fewer than ``sequence_length + 1`` tokens), shards with different token
            dtypes, duplicate names, or a vocabulary mismatch.
    """
    # Imported here so that parsing and validation work without importing megatron/torch.
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes = [str(p) for p in prefixes]
    if not prefixes:
        raise DataError("no training domains: give at least one shard prefix")
    names = [domain_name(p) for p in prefixes] if names is None else list(names)
    if len(names) != len(prefixes):
        raise ConfigError(f"{len(names)} domain names for {len(prefixes)} prefixes")
    _check_unique_names(names, prefixes)
    view = _TokenizerView(tokenizer)

    shards = [inspect_shard(p) for p in prefixes]
    dtypes = {s.dtype.name for s in shards}
    if len(dtypes) > 1:
        listing = ", ".join(f"{n}: {s.dtype.name}" for n, s in zip(names, shards))
        raise DataError(
            f"shards have different token dtypes ({listing}); they were probably tokenized with different "
            "tokenizers: re-run preprocessing of all domains with the same tokenizer"
        )
    need = config.sequence_length + 1
    lo_frac, hi_frac = documents
    if not 0.0 <= lo_frac < hi_frac <= 1.0:
        raise ConfigError(f"document range {documents} must satisfy 0 <= start < end <= 1")
    doc_ranges = []
    for name, shard in zip(names, shards):
        if shard.num_documents == 0 or shard.num_sequences == 0:
            raise DataError(f"domain {name!r} ({shard.prefix}.idx) is empty: 0 documents; drop it from --data-path")
        lo, hi = round(lo_frac * shard.num_documents), round(hi_frac * shard.num_documents)
        tokens = shard.num_tokens if (lo, hi) == (0, shard.num_documents) else _tokens_in_documents(shard, lo, hi)
        part = (
            "" if (lo_frac, hi_frac) == (0.0, 1.0) else f" in documents [{lo}, {hi}) of {shard.num_documents} (--split)"
        )
        if tokens < need:
            raise DataError(
                f"domain {name!r} ({shard.prefix}.bin) has {tokens} tokens{part}, fewer than one sample of "
                f"--seq-length {config.sequence_length} + 1; add data, drop the domain, or change --split"
            )
        doc_ranges.append((lo, hi))
        _check_vocab(name, shard, (lo, hi), view.vocab_size, config)

    gpt_config = GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.sequence_length,
        tokenizer=view,
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=config.reset_attention_mask,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=config.create_attention_mask,
        path_to_cache=config.path_to_cache,
        mmap_bin_files=config.mmap,
    )
    index_split = _key_document_range(gpt_config, documents)
    datasets = []
    for prefix, (lo, hi) in zip(prefixes, doc_ranges):
        indexed = IndexedDataset(prefix, multimodal=False, mmap=config.mmap)
        doc_ids = np.arange(lo, hi, dtype=np.int32)
        datasets.append(
            _build_on_rank0_first(
                lambda: GPTDataset(indexed, prefix, doc_ids, None, index_split, gpt_config),
                config.path_to_cache is not None,
            )
        )
    for name, shard, ds in zip(names, shards, datasets):
        if len(ds) < 1:
            raise DataError(
                f"domain {name!r} ({shard.prefix}) yields 0 samples of --seq-length {config.sequence_length}; "
                "add data or drop the domain"
            )
    return DomainDatasets(names, prefixes, datasets, shards, config.sequence_length)


def _key_document_range(gpt_config, documents: Tuple[float, float]):
    """Put the document range into megatron's index-cache key; returns the Split to build with.

    megatron-core names a GPTDataset's cached indices (--data-cache-path) after a hash of its
    description: shard path, Split name, seed, sequence length, tokenizer, ``split`` and
    ``split_matrix``, but not the document ids it is handed. Megatron's own builder derives those
    ids from ``split_matrix``; we pass them directly, so without this the training part and the
    held-out part of a domain (or the same domain under another --split) would share one cache
    entry and load each other's indices. The range is described as Megatron would describe it:
    the training part ``(0, f)`` is ``Split.train`` of split ``f,1-f,0``, any other part ``(a, b)``
    ``Split.valid`` of ``a,b-a,1-b``. Both fields only key the cache here (no blend is given,
    so megatron never splits by them), and a validation Split builds the same indices (megatron
    drops the last partial sequence of both).
    """
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix
    from megatron.core.datasets.utils import Split

    lo, hi = documents
    vector, index_split = ([hi, 1.0 - hi, 0.0], Split.train) if lo == 0.0 else ([lo, hi - lo, 1.0 - hi], Split.valid)
    gpt_config.split = ",".join(repr(v) for v in vector)
    gpt_config.split_matrix = convert_split_vector_to_split_matrix(vector)
    return index_split


def _tokens_in_documents(shard: ShardInfo, lo: int, hi: int) -> int:
    """Tokens stored in documents [lo, hi) of a validated shard (read from its .idx)."""
    lengths, _, doc_idx = _index_arrays(shard.prefix + ".idx", shard.num_sequences, shard.num_documents + 1)
    return int(lengths[doc_idx[lo] : doc_idx[hi]].sum(dtype=np.int64)) if hi > lo else 0


def _check_vocab(
    name: str, shard: ShardInfo, documents: Tuple[int, int], vocab_size: int, config: DomainDatasetConfig
) -> None:
    """The shard's vocabulary against the tokenizer's: its sidecar, then its token ids.

    Ids >= vocab size otherwise fail as an IndexError inside the embedding, mid-training.
    With a sidecar recording the same vocab_size only ``check_token_ids`` scans; without
    one (a Megatron-LM shard) a bounded sample is scanned (``token_id_sample_bytes``).
    """
    recorded = read_sidecar_vocab_size(shard.prefix) if config.check_vocab else None
    if recorded is not None and recorded != vocab_size:
        raise DataError(
            f"domain {name!r}: shard sidecar records vocab_size {recorded} but the tokenizer has {vocab_size}; "
            "use the tokenizer the shards were made with, or re-run preprocessing"
        )
    if config.check_token_ids:
        budget, scanned = None, "all of"
    elif recorded is None and config.token_id_sample_bytes > 0:
        budget, scanned = config.token_id_sample_bytes, "a sample of"
    else:
        return
    low, top = _token_id_range(shard, documents, budget)
    if low < 0 or top >= vocab_size:
        bad = low if low < 0 else top
        vouch = "" if recorded is not None else f" (no sidecar {shard.prefix}.json records the shard's vocab_size)"
        raise DataError(
            f"domain {name!r}: {shard.prefix}.bin contains token id {bad}, outside the tokenizer's vocabulary "
            f"[0, {vocab_size}){vouch}, found scanning {scanned} its documents {list(documents)}; the shard was "
            "tokenized with another tokenizer: train with the tokenizer the shards were made with "
            "(--tokenizer-type/--tokenizer-model/--vocab-file, or a --vocab-size above the largest id for "
            "NullTokenizer), or re-run preprocessing with this one"
        )


def _token_id_range(shard: ShardInfo, documents: Tuple[int, int], max_bytes: Optional[int]) -> Tuple[int, int]:
    """Smallest and largest token id in documents [lo, hi) of a validated shard.

    ``max_bytes=None`` reads them all; otherwise at most ``max_bytes`` (rounded down to
    whole tokens) are read: the first and last quarter of the budget at the two ends of
    the range (where a bad append or a foreign shard's head shows) and the rest in
    windows at the starts of sequences drawn with a fixed seed (same on every rank).
    """
    lo, hi = documents
    lengths, pointers, doc_idx = _index_arrays(shard.prefix + ".idx", shard.num_sequences, shard.num_documents + 1)
    first_seq, end_seq = int(doc_idx[lo]), int(doc_idx[hi])
    itemsize = shard.dtype.itemsize
    # Contiguous pointers (inspect_shard) make documents [lo, hi) one token range [start, stop).
    start = int(pointers[first_seq]) // itemsize if end_seq > first_seq else 0
    stop = start + int(lengths[first_seq:end_seq].sum(dtype=np.int64))
    if stop == start:
        return 0, 0
    budget = stop - start if max_bytes is None else max(1, max_bytes // itemsize)
    if budget >= stop - start:
        windows = [(start, stop)]
    else:
        edge, draws = budget // 4, 64
        width = max(1, (budget - 2 * edge) // draws)
        seqs = np.random.default_rng(0).integers(first_seq, end_seq, size=draws)
        heads = pointers[seqs] // itemsize
        windows = [(start, start + edge), (stop - edge, stop)]
        windows += [(int(a), min(int(a) + width, stop)) for a in heads]
    data = np.memmap(shard.prefix + ".bin", mode="r", dtype=shard.dtype, shape=(stop,))
    chunk = 1 << 24  # a full scan in bounded pieces: no multi-GiB temporaries
    low, top = None, None
    for a, b in windows:
        for i in range(a, b, chunk):
            piece = data[i : min(b, i + chunk)]
            if piece.size:
                lo_i, hi_i = int(piece.min()), int(piece.max())
                low = lo_i if low is None else min(low, lo_i)
                top = hi_i if top is None else max(top, hi_i)
    del data
    return (0, 0) if low is None else (low, top)


def _build_on_rank0_first(build, uses_cache: bool):
    """With an index cache under torch.distributed, rank 0 writes it before the others read it."""
    from megatron_dga import comm

    if not uses_cache or comm.size() == 1:
        return build()
    if comm.rank() == 0:
        result = build()
        comm.barrier()
        return result
    comm.barrier()
    return build()
