"""Tokenizers for preprocessing and training: one small interface, four backends.

``build_tokenizer(tokenizer_type, ...)`` returns an object with

* ``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``,
* ``vocab_size`` (the embedding rows the model needs),
* ``eod`` (appended after every document by ``tools/preprocess_data.py --append-eod``),
* ``pad`` (the id megatron-core's ``GPTDataset`` uses to mask padded labels; ``-1``,
  megatron-core's own "no pad token" sentinel, where the vocabulary has none, so it never
  collides with ``eod``),
* ``bos`` (``None`` where the vocabulary has none),
* ``fingerprint()`` (type, model path, SHA-256 of the model files, vocab size, special ids),
  written into every shard's sidecar so the trainer can refuse a tokenizer/shard mismatch.

These are the attributes megatron-core's ``GPTDatasetConfig``/``GPTDataset`` read
(``tokenizer.vocab_size``, ``tokenizer.eod``, ``tokenizer.pad``).

Backends (``--tokenizer-type``):

* ``SentencePieceTokenizer``: a ``.model`` file (``--tokenizer-model``); ``eod`` is the
  model's ``</s>`` (eos) piece, ``pad`` its pad piece. :func:`megatron_dga.prep.train_tokenizer.train_sentencepiece` trains one
  with the settings the rest of the project assumes (lossless on code: identity
  normalisation, whitespace kept, newline a piece, byte fallback).
* ``GPT2BPETokenizer``: a local GPT-2 ``vocab.json`` + ``merges.txt`` (``--vocab-file``,
  ``--merge-file``); byte-level BPE implemented here, no network, no ``transformers``.
* ``HuggingFaceTokenizer``: a local directory (``--tokenizer-model``) holding
  ``tokenizer.json``; needs the optional ``tokenizers`` (or ``transformers``) package.
* ``NullTokenizer``: text of whitespace-separated ints in ``[0, --vocab-size)``;
  ``eod = --vocab-size`` and ``vocab_size = --vocab-size + 1`` (Megatron's convention).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from megatron_dga.errors import ConfigError, DataError
from megatron_dga.fileio import sha256_files

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)

# megatron-core's GPTDataset treats -1 as "no pad token": it never occurs in a shard.
NO_PAD = -1


class BaseTokenizer:
    """Interface shared by every backend (see the module docstring)."""

    tokenizer_type: str = ""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no eod appended)."""
        raise NotImplementedError

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the inverse of ``tokenize`` for lossless backends."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of ids the embedding table needs (all ids are ``< vocab_size``)."""
        raise NotImplementedError

    # Backends set these in __init__; the properties below expose them read-only.
    _eod: Optional[int] = None
    _pad: int = NO_PAD
    _bos: Optional[int] = None

    @property
    def eod(self) -> int:
        """End-of-document id appended by ``--append-eod``."""
        if self._eod is None:
            raise NotImplementedError(f"{type(self).__name__} sets no eod id")
        return self._eod

    @property
    def pad(self) -> int:
        """Pad id, or ``-1`` (megatron-core's sentinel) where the vocabulary has none."""
        return self._pad

    @property
    def bos(self) -> Optional[int]:
        """Beginning-of-sequence id, or ``None``."""
        return self._bos

    def _model_files(self) -> list[str]:
        return []

    def _model_path(self) -> Optional[str]:
        return None

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """What megatron-core hashes into its dataset cache keys (``MegatronDataset``)."""
        fp = self.fingerprint()
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("tokenizer_path", [fp["tokenizer_model"]]),
                ("tokenizer_sha256", fp["tokenizer_sha256"]),
                ("vocab_size", fp["vocab_size"]),
            ]
        )

    @property
    def unique_description(self) -> str:
        """JSON of ``unique_identifiers`` (megatron-core's tokenizer convention)."""
        return json.dumps(self.unique_identifiers, indent=4)

    def fingerprint(self) -> dict:
        """Identity of this tokenizer, stored in shard sidecars and checked by the trainer.

        Computed once (the model files are hashed on first use).

        Returns:
            dict with ``tokenizer_type``, ``tokenizer_model`` (path or ``None``),
            ``tokenizer_sha256`` (of the model files; for ``NullTokenizer`` of its vocab
            size), ``vocab_size``, ``eod``, ``pad``, ``bos``.
        """
        cached = getattr(self, "_fingerprint", None)
        if cached is not None:
            return dict(cached)
        files = self._model_files()
        if files:
            digest = sha256_files(*files)
        else:
            digest = hashlib.sha256(f"{self.tokenizer_type}:{self.vocab_size}".encode()).hexdigest()
        self._fingerprint = {
            "tokenizer_type": self.tokenizer_type,
            "tokenizer_model": self._model_path(),
            "tokenizer_sha256": digest,
            "vocab_size": int(self.vocab_size),
            "eod": int(self.eod),
            "pad": int(self.pad),
            "bos": None if self.bos is None else int(self.bos),
        }
        return dict(self._fingerprint)


# --------------------------------------------------------------------------- SentencePiece
class SentencePieceTokenizer(BaseTokenizer):
    """A SentencePiece model file.

    Args:
        model_path: the ``.model`` file (``--tokenizer-model``).
    """

    tokenizer_type = "SentencePieceTokenizer"

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not model_path:
            raise ConfigError(
                "--tokenizer-type SentencePieceTokenizer needs --tokenizer-model PATH "
                "(a SentencePiece .model file; train one with tools/train_tokenizer.py)."
            )
        if not os.path.isfile(model_path):
            raise DataError(
                f"--tokenizer-model {model_path!r}: no such file. Pass the SentencePiece .model "
                "file (tools/train_tokenizer.py writes <model-prefix>.model)."
            )
        self._path = os.path.abspath(model_path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self._path)
        except (OSError, RuntimeError) as exc:
            raise DataError(
                f"--tokenizer-model {model_path!r} is not a valid SentencePiece model ({exc}). "
                "Pass a .model file written by SentencePiece."
            ) from None
        eos = self._sp.eos_id()
        if eos < 0:
            # Models trained without eos: accept an explicit <eod>/<|endoftext|> piece.
            for piece in ("<eod>", "<|endoftext|>", "</s>"):
                pid = self._sp.piece_to_id(piece)
                if pid != self._sp.unk_id():
                    eos = pid
                    break
        if eos < 0:
            raise DataError(
                f"--tokenizer-model {model_path!r} has no end-of-document piece (no eos id, no "
                "'<eod>' piece). Retrain it with tools/train_tokenizer.py, which reserves eos=2."
            )
        self._eod = int(eos)
        pad = self._sp.pad_id()
        self._pad = int(pad) if pad >= 0 and pad != self._eod else NO_PAD
        bos = self._sp.bos_id()
        self._bos = int(bos) if bos >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def _model_files(self) -> list[str]:
        return [self._path]

    def _model_path(self) -> Optional[str]:
        return self._path


# --------------------------------------------------------------------------- GPT-2 BPE
@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control chars, space, ...) are
    shifted to code points from 256 upwards so that no BPE symbol is whitespace/control.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    mapping = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _gpt2_pretokenize_pattern() -> "re.Pattern":
    """GPT-2's pre-tokenisation regex.

    With the optional ``regex`` package this is GPT-2's exact pattern. With the stdlib ``re``
    (no ``\\p{..}`` classes) letters are ``[^\\W\\d_]`` and numbers ``\\d``: identical on
    ASCII and on ordinary text; only rare non-decimal numerals (e.g. superscripts) are grouped
    with letters. Every character is matched by some branch, so tokenisation stays lossless.
    """
    contractions = r"'s|'t|'re|'ve|'m|'ll|'d"
    try:
        import regex  # type: ignore

        return regex.compile(contractions + r"| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    except ImportError:
        return re.compile(contractions + r"| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


class GPT2BPETokenizer(BaseTokenizer):
    """Byte-level BPE from a local GPT-2 ``vocab.json`` and ``merges.txt``.

    Args:
        vocab_file: JSON object token -> id (``--vocab-file``).
        merge_file: one merge ``"a b"`` per line, highest priority first; a leading
            ``#version`` line is skipped (``--merge-file``).
        eod_token: the end-of-document token; must be in the vocabulary.
    """

    tokenizer_type = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str, eod_token: str = "<|endoftext|>"):
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path:
                raise ConfigError(
                    f"--tokenizer-type GPT2BPETokenizer needs {flag} PATH (GPT-2's vocab.json and merges.txt)."
                )
            if not os.path.isfile(path):
                raise DataError(f"{flag} {path!r}: no such file. Pass the local GPT-2 {flag[2:]}.")
        self._vocab_path = os.path.abspath(vocab_file)
        self._merge_path = os.path.abspath(merge_file)
        try:
            with open(vocab_file, encoding="utf-8") as f:
                self.encoder: dict[str, int] = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"--vocab-file {vocab_file!r} is not valid JSON ({exc}).") from None
        self._check_vocab(vocab_file)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = self._read_merges(merge_file)
        if eod_token not in self.encoder:
            raise DataError(
                f"--vocab-file {vocab_file!r} has no {eod_token!r} token, which is used as the "
                "end-of-document id. Add it to the vocabulary."
            )
        self._eod = self.encoder[eod_token]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self._pattern = _gpt2_pretokenize_pattern()
        self._cache: dict[str, tuple[str, ...]] = {}

    def _check_vocab(self, vocab_file: str) -> None:
        """DataError unless the vocabulary maps tokens to distinct int ids >= 0 (the embedding rows)."""
        if not isinstance(self.encoder, dict):
            raise DataError(
                f"--vocab-file {vocab_file!r} holds a JSON {type(self.encoder).__name__}; it must be a JSON "
                "object mapping token -> int id (GPT-2's vocab.json)."
            )
        bad = next(
            ((k, v) for k, v in self.encoder.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0), None
        )
        if bad is not None:
            raise DataError(
                f"--vocab-file {vocab_file!r}: token {bad[0]!r} has id {bad[1]!r}; every id must be an int >= 0 "
                "(GPT-2's vocab.json maps token -> id)."
            )
        if len(set(self.encoder.values())) != len(self.encoder):
            seen: dict[int, str] = {}
            dup = next((k, seen[v]) for k, v in self.encoder.items() if seen.setdefault(v, k) != k)
            raise DataError(
                f"--vocab-file {vocab_file!r}: tokens {dup[1]!r} and {dup[0]!r} share id {self.encoder[dup[0]]}; "
                "ids must be unique (the file is corrupt or hand-edited)."
            )

    def _read_merges(self, merge_file: str) -> dict[tuple[str, str], int]:
        """Merge ranks from merges.txt; every merge must produce a symbol of the vocabulary.

        Checked here, not when a merge first fires, so a vocab/merges pair that do not
        belong together fails before preprocessing or training starts.
        """
        ranks: dict[tuple[str, str], int] = {}
        try:
            with open(merge_file, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.rstrip("\n")
                    if not line or (lineno == 1 and line.startswith("#version")):
                        continue
                    parts = line.split(" ")
                    if len(parts) != 2:
                        raise DataError(
                            f"--merge-file {merge_file!r} line {lineno}: expected two symbols "
                            f"separated by one space, got {line!r}."
                        )
                    if parts[0] + parts[1] not in self.encoder:
                        raise DataError(
                            f"--merge-file {merge_file!r} line {lineno}: merge {line!r} makes "
                            f"{parts[0] + parts[1]!r}, which --vocab-file {self._vocab_path!r} lacks: the two "
                            "files do not belong together; pass the vocab.json and merges.txt of one tokenizer."
                        )
                    ranks.setdefault((parts[0], parts[1]), len(ranks))
        except UnicodeDecodeError as exc:
            raise DataError(
                f"--merge-file {merge_file!r} is not UTF-8 text ({exc}); pass GPT-2's merges.txt."
            ) from None
        return ranks

    def bpe(self, word: str) -> tuple[str, ...]:
        """Apply the merges to one pre-token (already mapped to byte-unicode symbols).

        Repeatedly merge every occurrence of the lowest-ranked adjacent pair, left to right,
        until no adjacent pair has a rank.
        """
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word)
        while len(symbols) > 1:
            best = min((self.bpe_ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
            if best[0] == float("inf"):
                break
            first, second = symbols[best[1]], symbols[best[1] + 1]
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        result = tuple(symbols)
        if len(self._cache) < 100_000:
            self._cache[word] = result
        return result

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pattern.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for sym in self.bpe(mapped):
                try:
                    ids.append(self.encoder[sym])
                except KeyError:
                    raise DataError(
                        f"--vocab-file {self._vocab_path!r} lacks the BPE symbol {sym!r} produced "
                        "by --merge-file: the two files do not belong together."
                    ) from None
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return max(len(self.encoder), max(self.encoder.values(), default=-1) + 1)

    def _model_files(self) -> list[str]:
        return [self._vocab_path, self._merge_path]

    def _model_path(self) -> Optional[str]:
        return self._vocab_path


# --------------------------------------------------------------------------- HuggingFace
class HuggingFaceTokenizer(BaseTokenizer):
    """A local HuggingFace tokenizer directory (``tokenizer.json``).

    Uses the ``tokenizers`` package when importable, else ``transformers``.

    Args:
        path: the directory (or a ``tokenizer.json`` file) given as ``--tokenizer-model``.
    """

    tokenizer_type = "HuggingFaceTokenizer"

    def __init__(self, path: str):
        if not path:
            raise ConfigError(
                "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR "
                "(a local directory with tokenizer.json)."
            )
        if not os.path.exists(path):
            raise DataError(f"--tokenizer-model {path!r}: no such file or directory.")
        self._dir = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
        json_path = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
        self._tok = None
        self._hf = None
        try:
            from tokenizers import Tokenizer  # type: ignore

            if not os.path.isfile(json_path):
                raise DataError(
                    f"--tokenizer-model {path!r} has no tokenizer.json. Save the tokenizer with "
                    "tokenizer.save_pretrained(DIR) first."
                )
            try:
                self._tok = Tokenizer.from_file(json_path)
            except Exception as exc:
                raise DataError(
                    f"--tokenizer-model {path!r}: {json_path} is not a valid tokenizer.json ({exc}). Save the "
                    "tokenizer again with tokenizer.save_pretrained(DIR)."
                ) from None
        except ImportError:
            try:
                from transformers import AutoTokenizer  # type: ignore
            except ImportError:
                raise ConfigError(
                    "--tokenizer-type HuggingFaceTokenizer needs the 'tokenizers' package "
                    "(or 'transformers'), which is not installed. Install it with "
                    "`pip install tokenizers`, or use --tokenizer-type SentencePieceTokenizer."
                ) from None
            try:
                self._hf = AutoTokenizer.from_pretrained(self._dir, local_files_only=True)
            except (OSError, ValueError) as exc:  # missing or malformed tokenizer files
                raise DataError(
                    f"--tokenizer-model {path!r} is not a loadable HuggingFace tokenizer directory ({exc}). "
                    "Save the tokenizer again with tokenizer.save_pretrained(DIR)."
                ) from None
        self._eod = self._find_special(("<|endoftext|>", "</s>", "<eos>", "<eod>", "<|end_of_text|>"))
        if self._eod is None:
            raise DataError(
                f"--tokenizer-model {path!r}: no end-of-document token (looked for "
                "<|endoftext|>, </s>, <eos>, <eod>). Add one to the tokenizer."
            )
        pad = self._find_special(("<pad>", "[PAD]", "<|pad|>"))
        self._pad = pad if pad is not None and pad != self._eod else NO_PAD
        self._bos = self._find_special(("<s>", "<bos>", "<|begin_of_text|>"))

    def _find_special(self, names: Sequence[str]) -> Optional[int]:
        for name in names:
            tid = self._tok.token_to_id(name) if self._tok is not None else self._hf.convert_tokens_to_ids(name)
            if tid is not None and (self._hf is None or tid != self._hf.unk_token_id):
                return int(tid)
        return None

    def tokenize(self, text: str) -> list[int]:
        if self._tok is not None:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        return list(self._hf.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._hf.decode(ids)

    @property
    def vocab_size(self) -> int:
        if self._tok is not None:
            return int(self._tok.get_vocab_size(with_added_tokens=True))
        return int(len(self._hf))

    def _model_files(self) -> list[str]:
        return sorted(
            os.path.join(self._dir, n) for n in os.listdir(self._dir) if n.endswith((".json", ".model", ".txt"))
        )

    def _model_path(self) -> Optional[str]:
        return self._dir


# --------------------------------------------------------------------------- Null
class NullTokenizer(BaseTokenizer):
    """Text made of whitespace-separated integers; for tests and synthetic data.

    Args:
        vocab_size: ids must lie in ``[0, vocab_size)``; ``eod = vocab_size`` so the model
            vocabulary is ``vocab_size + 1``.
    """

    tokenizer_type = "NullTokenizer"

    def __init__(self, vocab_size: Optional[int]):
        if vocab_size is None or int(vocab_size) < 1:
            raise ConfigError(f"--tokenizer-type NullTokenizer needs --vocab-size N >= 1, got {vocab_size!r}.")
        self._n = int(vocab_size)
        self._eod = self._n  # Megatron's convention: one id past the data ids

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(tok) for tok in text.split()]
        except ValueError:
            raise DataError(f"NullTokenizer expects whitespace-separated integers, got {text[:60]!r}.") from None
        bad = [i for i in ids if not 0 <= i < self._n]
        if bad:
            raise DataError(f"NullTokenizer: id {bad[0]} is outside [0, --vocab-size={self._n}). Raise --vocab-size.")
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._n + 1


# --------------------------------------------------------------------------- factory
@dataclass(frozen=True)
class TokenizerSpec:
    """The arguments of ``build_tokenizer``; picklable, so worker processes rebuild from it."""

    tokenizer_type: str
    """One of ``TOKENIZER_TYPES`` (``--tokenizer-type``)."""
    tokenizer_model: Optional[str] = None
    """SentencePiece ``.model`` file or HuggingFace directory (``--tokenizer-model``)."""
    vocab_file: Optional[str] = None
    """GPT-2 ``vocab.json`` (``--vocab-file``)."""
    merge_file: Optional[str] = None
    """GPT-2 ``merges.txt`` (``--merge-file``)."""
    vocab_size: Optional[int] = None
    """``NullTokenizer`` vocabulary size (``--vocab-size``)."""

    def __post_init__(self):
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(
                f"--tokenizer-type {self.tokenizer_type!r} is not supported; choose one of "
                f"{', '.join(TOKENIZER_TYPES)}."
            )

    def build(self) -> BaseTokenizer:
        """Construct the tokenizer."""
        return build_tokenizer(
            self.tokenizer_type,
            tokenizer_model=self.tokenizer_model,
            vocab_file=self.vocab_file,
            merge_file=self.merge_file,
            vocab_size=self.vocab_size,
        )


def build_tokenizer(
    tokenizer_type: str,
    *,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    vocab_size: Optional[int] = None,
) -> BaseTokenizer:
    """Build a tokenizer by its Megatron ``--tokenizer-type`` name.

    Args:
        tokenizer_type: one of ``SentencePieceTokenizer``, ``GPT2BPETokenizer``,
            ``HuggingFaceTokenizer``, ``NullTokenizer``.
        tokenizer_model: SentencePiece model file / HuggingFace directory.
        vocab_file: GPT-2 ``vocab.json``.
        merge_file: GPT-2 ``merges.txt``.
        vocab_size: ``NullTokenizer`` vocabulary size (without the eod id).

    Returns:
        A ``BaseTokenizer``.

    Raises:
        ConfigError: unknown type or a missing flag.
        DataError: a model file is missing or malformed.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ConfigError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {', '.join(TOKENIZER_TYPES)}."
    )
