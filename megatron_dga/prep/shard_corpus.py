"""Documents of Megatron shards already on disk, read as token ids for the offline tools.

``tools/cluster_domains.py --input-shards`` and ``tools/importance_weights.py
--specific-shards/--basis-shards`` embed the documents of ``<prefix>.{bin,idx}`` shards
straight from their token ids: no jsonl, no second tokenisation pass. Each shard is
validated first (``megatron_dga.data.domains.inspect_shard``: a missing, truncated or
corrupt pair is one DataError naming the file), its index is read with megatron-core's
``IndexedDataset``, and its ``.bin`` is memory-mapped, so a run of documents is a view of
the file (:class:`~megatron_dga.prep.embeddings.TokenDocuments`), never a copy of the corpus.

Shards clustered together must share one tokenizer (token-id embeddings compare ids): the
sidecars ``<prefix>.json`` written by ``tools/preprocess_data.py`` are compared on
:data:`TOKENIZER_KEYS` and a mismatch is refused before any work.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_dga.errors import DataError
from megatron_dga.prep.embeddings import TokenDocuments, token_batches

logger = logging.getLogger(__name__)

TOKENIZER_KEYS = ("tokenizer_type", "tokenizer_sha256", "vocab_size", "eod")
"""Sidecar fields that identify the tokenizer a shard was built with (``BaseTokenizer.fingerprint``)."""


def read_tokenizer_sidecar(prefix: str) -> Optional[Dict[str, Any]]:
    """The tokenizer fields of ``<prefix>.json`` (``tools/preprocess_data.py``'s sidecar), or None without one.

    Raises:
        DataError: the sidecar exists but is not a JSON object.
    """
    path = prefix + ".json"
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"shard sidecar {path} is not valid JSON ({exc}); fix or delete it") from None
    if not isinstance(meta, dict):
        raise DataError(
            f"shard sidecar {path} holds a JSON {type(meta).__name__}, expected an object; fix or delete it"
        )
    return {k: meta[k] for k in TOKENIZER_KEYS if k in meta}


def tokenizer_mismatch(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """``"key: a vs b"`` for every tokenizer field both records hold and that differs."""
    return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in TOKENIZER_KEYS if k in a and k in b and a[k] != b[k]]


@dataclass
class _Shard:
    prefix: str
    tokens: np.ndarray
    """The whole ``.bin`` as a read-only memory-mapped token array."""
    doc_offsets: np.ndarray
    """int64 ``(num_documents + 1,)``: document ``i`` is ``tokens[doc_offsets[i]:doc_offsets[i + 1]]``."""


class ShardCorpus:
    """The documents of several shards, in order (shard 0's documents first), as token ids.

    Args:
        prefixes: shard prefixes (``<dir>/<name>_text_document``).
        flag: the option that named them, for error messages.

    Raises:
        DataError: a missing/corrupt shard, two shards with the same basename (maps match shards
            by basename), different token dtypes or tokenizers (sidecars), or no document at all.
    """

    def __init__(self, prefixes: Sequence[str], flag: str = "--input-shards"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megatron_dga.data.domains import inspect_shard

        self.prefixes = [str(p) for p in prefixes]
        if not self.prefixes:
            raise DataError(f"{flag}: no shard given; pass Megatron shard prefixes such as data/web_text_document")
        seen: Dict[str, str] = {}
        for p in self.prefixes:
            base = os.path.basename(os.path.normpath(p))
            if base in seen:
                raise DataError(
                    f"{flag}: {seen[base]} and {p} have the same basename {base!r}; a domain map "
                    "matches shards by basename, so rename one"
                )
            seen[base] = p
        self.infos = [inspect_shard(p) for p in self.prefixes]
        dtypes = {info.dtype.name for info in self.infos}
        if len(dtypes) > 1:
            listing = ", ".join(f"{p}: {i.dtype.name}" for p, i in zip(self.prefixes, self.infos))
            raise DataError(
                f"{flag}: the shards have different token dtypes ({listing}), so different tokenizers; "
                "re-run tools/preprocess_data.py on all of them with one tokenizer"
            )
        self.tokenizer = self._check_tokenizers(flag)
        self._shards: List[_Shard] = []
        for prefix, info in zip(self.prefixes, self.infos):
            index = IndexedDataset(prefix, mmap=True).index
            seq_starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(index.sequence_lengths, dtype=np.int64)])
            doc_offsets = seq_starts[np.asarray(index.document_indices, dtype=np.int64)]
            tokens = (
                np.memmap(prefix + ".bin", dtype=info.dtype, mode="r", shape=(info.num_tokens,))
                if info.num_tokens
                else np.zeros(0, dtype=info.dtype)
            )
            self._shards.append(_Shard(prefix, tokens, doc_offsets))
        counts = np.array([info.num_documents for info in self.infos], dtype=np.int64)
        self.document_offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
        """int64 ``(S + 1,)``: shard ``s`` owns documents ``[document_offsets[s], document_offsets[s + 1])``."""
        if self.num_documents == 0:
            raise DataError(f"{flag} {' '.join(self.prefixes)}: the shards hold no document")

    def _check_tokenizers(self, flag: str) -> Optional[Dict[str, Any]]:
        """The shared tokenizer record of the sidecars (None when no shard has one); DataError on a mismatch."""
        reference, ref_prefix, missing = None, None, []
        for prefix in self.prefixes:
            record = read_tokenizer_sidecar(prefix)
            if not record:
                missing.append(prefix)
                continue
            if reference is None:
                reference, ref_prefix = record, prefix
                continue
            diff = tokenizer_mismatch(reference, record)
            if diff:
                raise DataError(
                    f"{flag}: {prefix} and {ref_prefix} were tokenized with different tokenizers ({'; '.join(diff)}, "
                    f"from their .json sidecars); shards embedded together must share one tokenizer: re-run "
                    "tools/preprocess_data.py on all of them with the same --tokenizer-type/--tokenizer-model"
                )
        if missing and reference is not None:
            logger.warning(
                "%d of %d shards have no tokenizer sidecar (<prefix>.json), e.g. %s: their tokenizer "
                "cannot be checked against the others'",
                len(missing),
                len(self.prefixes),
                missing[0],
            )
        return reference

    @property
    def num_documents(self) -> int:
        return int(self.document_offsets[-1])

    @property
    def num_tokens(self) -> int:
        return int(sum(info.num_tokens for info in self.infos))

    def iter_chunks(self, max_docs: int, max_tokens: int) -> Iterator[Tuple[int, TokenDocuments]]:
        """``(first global document index, documents)`` runs of at most ``max_docs`` documents and
        ``max_tokens`` tokens (a longer single document alone), in corpus order; views of the files."""
        for s, shard in enumerate(self._shards):
            whole = TokenDocuments(shard.tokens, shard.doc_offsets - shard.doc_offsets[0])
            for a, b in token_batches(whole, max_docs, max_tokens):
                yield int(self.document_offsets[s]) + a, whole.slice(a, b)

    def gather(self, doc_ids: np.ndarray) -> TokenDocuments:
        """The documents with global indices ``doc_ids`` (in that order), copied, without a loop over documents."""
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        if doc_ids.size and (doc_ids.min() < 0 or doc_ids.max() >= self.num_documents):
            raise IndexError(f"document ids outside [0, {self.num_documents})")
        shard_of = np.searchsorted(self.document_offsets, doc_ids, side="right") - 1
        lengths = np.empty(doc_ids.size, dtype=np.int64)
        parts = []
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            shard = self._shards[s]
            local = doc_ids[rows] - self.document_offsets[s]
            starts, ends = shard.doc_offsets[local], shard.doc_offsets[local + 1]
            lengths[rows] = ends - starts
            parts.append((rows, starts, ends - starts, shard.tokens))
        offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
        tokens = np.empty(int(offsets[-1]), dtype=np.int64)
        for rows, starts, lens, source in parts:
            # Destination and source position of every token of these documents.
            dest = np.repeat(offsets[rows] - np.cumsum(np.concatenate([[0], lens[:-1]])), lens)
            src = np.repeat(starts - np.cumsum(np.concatenate([[0], lens[:-1]])), lens)
            ramp = np.arange(int(lens.sum()), dtype=np.int64)
            tokens[dest + ramp] = source[src + ramp]
        return TokenDocuments(tokens, offsets)

    def eod(self) -> Optional[int]:
        """The end-of-document id recorded in the sidecars, if any (left out when detokenising)."""
        value = (self.tokenizer or {}).get("eod")
        return int(value) if isinstance(value, int) else None
