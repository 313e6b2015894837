"""Fine domains inside ordinary shards: every group of documents packed like one GPTDataset.

A domain map (``domain_map.py``) gives every document of a list of shards a group id (its
fine domain, or its top-level cluster). Here all groups are indexed at once, with one
vectorised numpy pass over all documents and no per-group Python object, so that K =
262,144 fine domains over millions of documents start in seconds:

1. every document gets a seeded 64-bit key; one stable argsort of ``(group, key)`` lists each
   group's documents in a seeded order (so a group's samples mix its shards);
2. ``--split`` applies per group: the first ``round(f * n_g)`` of group g's ``n_g`` documents
   in that order train, the rest is held out (the ``documents`` range selects the part);
3. the selected documents, concatenated group after group, get their cumulative token offsets;
   group g holds ``T_g`` tokens and ``(T_g - 1) // seq_length`` samples (megatron's
   ``GPTDataset`` packing, one epoch: sample s of group g is the ``seq_length + 1`` tokens
   starting at token ``s * seq_length`` of the group's concatenation, crossing document
   boundaries, and the last partial sample is dropped). A group without a full sample has
   ``num_samples = 0``: the sampler never draws it.

Reading sample ``(g, s)`` finds the document holding its first token by binary search
(``O(log D)``) and reads each spanned document with megatron-core's
``IndexedDataset.get(sequence, offset, length)`` (one ``IndexedDataset`` per shard, opened
once). The tokens become the sample dict exactly as ``GPTDataset.__getitem__`` builds it
(tokens, labels, loss_mask, position_ids, optional attention_mask; megatron-core's own
``_get_ltor_masks_and_position_ids`` for the masks and positions).

GPTDataset also shuffles its samples; the mixture sampler already visits each domain's samples
in a fresh keyed order every epoch, so the index keeps them in order.

The index is identical on every rank (integer arithmetic only) and, with ``--data-cache-path``,
saved as ``<hash>-FineDomains-index.npz`` there, the hash covering the group ids, the shards'
``.idx`` SHA-256, ``seq_length``, the seed, the document range and the extra-token option:
rank 0 writes it (atomically) before the other ranks read it, like megatron's own indices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from megatron_dga.data.domains import (
    DomainDatasetConfig,
    ShardInfo,
    _TokenizerView,
    _build_on_rank0_first,
    _check_vocab,
    _index_arrays,
    inspect_shard,
)
from megatron_dga.data.mixture import MultiSource
from megatron_dga.errors import ConfigError, DataError
from megatron_dga.fileio import NPZ_READ_ERRORS, load_npz, atomic_write

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
"""Bumped whenever the index layout or its construction changes (part of the cache key)."""

_KEY_SALT = 0x6A09E667F3BCC908  # seeds the per-document keys apart from the sampler's streams


@dataclass
class FineIndex:
    """Where the samples of every group are (all arrays; nothing per group but numbers)."""

    doc_shard: np.ndarray
    """int32 (D,): shard of each selected document, in packing order (group by group)."""
    doc_sequence: np.ndarray
    """int64 (D,): the document's first sequence in its shard (megatron's ``IndexedDataset.get`` index)."""
    doc_token_offsets: np.ndarray
    """int64 (D + 1,): cumulative tokens of the selected documents in packing order."""
    group_doc_offsets: np.ndarray
    """int64 (G + 1,): group g owns selected documents ``[group_doc_offsets[g], group_doc_offsets[g + 1])``."""
    num_samples: np.ndarray
    """int64 (G,): samples of each group (0 when it holds fewer than ``seq_length + 1`` tokens)."""

    ARRAYS = ("doc_shard", "doc_sequence", "doc_token_offsets", "group_doc_offsets", "num_samples")

    @property
    def num_tokens(self) -> np.ndarray:
        """int64 (G,): tokens of each group's selected documents."""
        return self.doc_token_offsets[self.group_doc_offsets[1:]] - self.doc_token_offsets[self.group_doc_offsets[:-1]]


def document_keys(seed: int, num_documents: int) -> np.ndarray:
    """uint64 (num_documents,): a seeded pseudo-random key per document (splitmix64 of its position).

    Integer arithmetic only, so every rank, platform and numpy version gets the same keys.
    """
    base = np.uint64((int(seed) * 0x9E3779B97F4A7C15 + _KEY_SALT) & 0xFFFFFFFFFFFFFFFF)
    z = np.arange(num_documents, dtype=np.uint64) + base
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def build_fine_index(
    doc_shard: np.ndarray,
    doc_sequence: np.ndarray,
    doc_length: np.ndarray,
    group_ids: np.ndarray,
    num_groups: int,
    seq_length: int,
    seed: int,
    documents: Tuple[float, float] = (0.0, 1.0),
    add_extra_token: bool = True,
) -> FineIndex:
    """The :class:`FineIndex` of all groups, in one vectorised pass (see the module docstring).

    Args:
        doc_shard, doc_sequence, doc_length: per document of all shards (concatenated in map
            order): its shard, its first sequence there, its tokens.
        group_ids: int (D,) group of every document, in ``[0, num_groups)``.
        num_groups: G.
        seq_length: tokens per sample (each sample reads ``seq_length + add_extra_token``).
        seed: seeds the order of the documents inside each group.
        documents: the fraction range of each group's documents (in that order) to use:
            ``(0, f)`` trains, ``(f, 1)`` is the held-out part of ``--split``.
        add_extra_token: megatron's ``add_extra_token_to_sequence`` (labels are the next tokens).
    """
    n = int(group_ids.shape[0])
    groups = np.asarray(group_ids).astype(np.uint64, copy=False)
    # One sort: by group, then by a seeded key (its top 32 bits; ties keep document order).
    combined = (groups << np.uint64(32)) | (document_keys(seed, n) >> np.uint64(32))
    order = np.argsort(combined, kind="stable")
    del combined
    counts = np.bincount(np.asarray(group_ids), minlength=num_groups).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    lo_frac, hi_frac = documents
    # round() like build_domain_datasets (numpy and Python both round half to even).
    lo = np.round(lo_frac * counts).astype(np.int64)
    hi = np.round(hi_frac * counts).astype(np.int64)
    sorted_groups = np.asarray(group_ids)[order]
    rank = np.arange(n, dtype=np.int64) - starts[sorted_groups]
    keep = (rank >= lo[sorted_groups]) & (rank < hi[sorted_groups])
    selected = order[keep]
    del order, rank, keep, sorted_groups
    lengths = np.asarray(doc_length, dtype=np.int64)[selected]
    doc_token_offsets = np.zeros(selected.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=doc_token_offsets[1:])
    group_doc_offsets = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(hi - lo, out=group_doc_offsets[1:])
    tokens = doc_token_offsets[group_doc_offsets[1:]] - doc_token_offsets[group_doc_offsets[:-1]]
    extra = int(bool(add_extra_token))
    num_samples = np.maximum(tokens - extra, 0) // int(seq_length)
    return FineIndex(
        doc_shard=np.asarray(doc_shard, dtype=np.int32)[selected],
        doc_sequence=np.asarray(doc_sequence, dtype=np.int64)[selected],
        doc_token_offsets=doc_token_offsets,
        group_doc_offsets=group_doc_offsets,
        num_samples=num_samples.astype(np.int64),
    )


def shard_documents(shards: Sequence[ShardInfo]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document of all shards (concatenated): shard number, first sequence, tokens.

    Read from each validated ``.idx`` (documents are contiguous token ranges there).
    """
    shard_ids, sequences, lengths = [], [], []
    for s, info in enumerate(shards):
        seq_lengths, _, doc_idx = _index_arrays(info.prefix + ".idx", info.num_sequences, info.num_documents + 1)
        cum = np.zeros(seq_lengths.size + 1, dtype=np.int64)
        np.cumsum(seq_lengths, out=cum[1:])
        doc_idx = np.asarray(doc_idx, dtype=np.int64)
        shard_ids.append(np.full(info.num_documents, s, dtype=np.int32))
        sequences.append(doc_idx[:-1].copy())
        lengths.append(cum[doc_idx[1:]] - cum[doc_idx[:-1]])
    return np.concatenate(shard_ids), np.concatenate(sequences), np.concatenate(lengths)


def pad_token_id(view: _TokenizerView) -> int:
    """megatron's ``MegatronDataset._pad_token_id`` for our tokenizer view: its pad, unless that is
    a special token (eod), in which case megatron uses -1."""
    return -1 if view.pad == view.eod else int(view.pad)


def sample_from_tokens(
    text: np.ndarray, eod: int, pad: int, config: DomainDatasetConfig, add_extra_token: bool = True
) -> Dict[str, Any]:
    """The sample dict ``GPTDataset.__getitem__`` returns for the token window ``text``.

    ``text`` holds ``seq_length + 1`` tokens (``seq_length`` without the extra token). The steps
    are megatron-core 0.16's, with its own ``_get_ltor_masks_and_position_ids``.
    """
    import torch
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    text = torch.from_numpy(np.asarray(text)).long()
    if add_extra_token:
        tokens = text[:-1].contiguous()
        labels = text[1:].contiguous()
    else:
        tokens = text
        labels = torch.roll(text, shifts=-1, dims=0)
        labels[-1] = pad
    attention_mask, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
        tokens,
        eod,
        config.reset_position_ids,
        config.reset_attention_mask,
        config.eod_mask_loss,
        config.create_attention_mask,
    )
    loss_mask[labels == pad] = 0.0
    tokens[tokens == pad] = 0
    labels[labels == pad] = 0
    out = {"tokens": tokens, "labels": labels}
    if config.create_attention_mask:
        out["attention_mask"] = attention_mask
    out.update(loss_mask=loss_mask, position_ids=position_ids)
    return out


class FineDomains(MultiSource):
    """The samples of every group of a domain map, as one :class:`~megatron_dga.data.mixture.MultiSource`.

    Built by :func:`build_fine_domains`. ``get(g, s)`` is sample s of group g; ``num_samples``
    and ``num_tokens`` are per group. :meth:`select` gives a view over some groups (e.g. the
    non-empty ones, for evaluation) without copying the index.
    """

    def __init__(
        self,
        index: FineIndex,
        prefixes: Sequence[str],
        indexed: Sequence[Any],
        config: DomainDatasetConfig,
        eod: int,
        pad: int,
        names: Optional[Sequence[str]] = None,
        add_extra_token: bool = True,
        groups: Optional[np.ndarray] = None,
    ) -> None:
        self.index = index
        self.prefixes = list(prefixes)
        self._indexed = list(indexed)
        self.config = config
        self.eod, self.pad = int(eod), int(pad)
        self._names = names
        self.add_extra_token = bool(add_extra_token)
        self.groups = np.arange(index.num_samples.size, dtype=np.int64) if groups is None else np.asarray(groups)
        self.num_samples = index.num_samples[self.groups]
        self.num_tokens = index.num_tokens[self.groups]

    @property
    def sequence_length(self) -> int:
        return int(self.config.sequence_length)

    def select(self, groups: np.ndarray) -> "FineDomains":
        """A view whose local source i is group ``groups[i]`` (same index, same open shards)."""
        return FineDomains(
            self.index,
            self.prefixes,
            self._indexed,
            self.config,
            self.eod,
            self.pad,
            self._names,
            self.add_extra_token,
            self.groups[np.asarray(groups, dtype=np.int64)],
        )

    def source_name(self, source: int) -> str:
        group = int(self.groups[source])
        return f"fine domain {self._names[group]!r}" if self._names is not None else f"fine domain {group}"

    def _start(self, source: int, index: int) -> Tuple[int, int]:
        """(document, offset in it) of the first token of sample ``index`` of local ``source``."""
        group = int(self.groups[source])
        if not 0 <= index < self.index.num_samples[group]:
            raise IndexError(
                f"sample {index} is outside {self.source_name(source)} of {int(self.index.num_samples[group])} samples"
            )
        offsets = self.index.doc_token_offsets
        position = int(offsets[self.index.group_doc_offsets[group]]) + index * self.sequence_length
        doc = int(np.searchsorted(offsets, position, side="right")) - 1  # skips empty documents
        return doc, position - int(offsets[doc])

    def source_path(self, source: int, index: int) -> Optional[str]:
        doc, _ = self._start(source, index)
        return self.prefixes[int(self.index.doc_shard[doc])]

    def tokens(self, source: int, index: int) -> np.ndarray:
        """int64: the ``seq_length + 1`` tokens (``seq_length`` without the extra token) of the sample."""
        doc, offset = self._start(source, index)
        need = self.sequence_length + int(self.add_extra_token)
        offsets, parts = self.index.doc_token_offsets, []
        while need > 0:
            take = min(int(offsets[doc + 1] - offsets[doc]) - offset, need)
            if take > 0:
                shard = self._indexed[int(self.index.doc_shard[doc])]
                parts.append(shard.get(int(self.index.doc_sequence[doc]), offset=offset, length=take))
                need -= take
            doc, offset = doc + 1, 0
        return np.concatenate(parts).astype(np.int64, copy=False)

    def get(self, source: int, index: int) -> Dict[str, Any]:
        return sample_from_tokens(self.tokens(source, index), self.eod, self.pad, self.config, self.add_extra_token)


def _cache_description(
    shard_names: Sequence[str],
    shard_sha256: Sequence[str],
    group_ids: np.ndarray,
    num_groups: int,
    seq_length: int,
    seed: int,
    documents: Tuple[float, float],
    add_extra_token: bool,
) -> str:
    ids = np.ascontiguousarray(group_ids, dtype=np.int32)
    return json.dumps(
        {
            "class": "FineDomains",
            "version": INDEX_VERSION,
            "shards": [{"name": n, "idx_sha256": h} for n, h in zip(shard_names, shard_sha256)],
            "group_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
            "num_groups": int(num_groups),
            "sequence_length": int(seq_length),
            "seed": int(seed),
            "documents": [float(documents[0]), float(documents[1])],
            "add_extra_token_to_sequence": bool(add_extra_token),
        },
        indent=1,
        sort_keys=True,
    )


def _load_cached(path: str, description: str) -> Optional[FineIndex]:
    """The index saved at ``path`` if it exists and was built from ``description``, else None."""
    if not os.path.isfile(path):
        return None
    try:
        with load_npz(path) as npz:
            if str(npz["description"][()]) != description:
                logger.warning("%s was built for other data (hash collision?); rebuilding it", path)
                return None
            return FineIndex(**{name: npz[name] for name in FineIndex.ARRAYS})
    except (*NPZ_READ_ERRORS, KeyError) as exc:
        logger.warning("fine-domain index cache %s is unreadable (%s); rebuilding it", path, exc)
        return None


def _save_cached(path: str, description: str, index: FineIndex) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {name: getattr(index, name) for name in FineIndex.ARRAYS}
    atomic_write(path, lambda fh: np.savez(fh, description=np.array(description), **arrays))


def build_fine_domains(
    prefixes: Sequence[str],
    group_ids: np.ndarray,
    num_groups: int,
    tokenizer: Any,
    config: DomainDatasetConfig,
    *,
    documents: Tuple[float, float] = (0.0, 1.0),
    shard_sha256: Optional[Sequence[str]] = None,
    names: Optional[Sequence[str]] = None,
    add_extra_token: bool = True,
    shards: Optional[Sequence[ShardInfo]] = None,
) -> FineDomains:
    """Validate the shards, build (or load from ``config.path_to_cache``) the index, open the shards.

    Args:
        prefixes: shard prefixes in the order of ``group_ids`` (the map's order).
        group_ids: int (total documents,): every document's group, in ``[0, num_groups)``.
        num_groups: G, the number of groups (empty ones included).
        tokenizer: any object with ``.eod`` and ``.vocab_size`` (``.pad`` optional).
        config: sequence length, seed, mask options, cache directory, vocabulary checks.
        documents: fraction range of each group's documents to use (per-group --split).
        shard_sha256: the shards' ``.idx`` SHA-256 (the map's identities), for the cache key;
            computed when a cache is used and they are not given.
        names: the groups' names, for error messages (a list: the object goes to DataLoader workers).
        add_extra_token: megatron's ``add_extra_token_to_sequence``.
        shards: the shards' :func:`inspect_shard` results, if already validated.

    Raises:
        DataError: a missing/corrupt shard, shards with different token dtypes, a vocabulary
            mismatch, or ``group_ids`` not covering the shards' documents.
        ConfigError: an invalid document range.
    """
    import torch  # noqa: F401 - IndexedDataset and the samples need it
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lo_frac, hi_frac = documents
    if not 0.0 <= lo_frac < hi_frac <= 1.0:
        raise ConfigError(f"document range {documents} must satisfy 0 <= start < end <= 1")
    prefixes = [str(p) for p in prefixes]
    shards = list(shards) if shards is not None else [inspect_shard(p) for p in prefixes]
    dtypes = {s.dtype.name for s in shards}
    if len(dtypes) > 1:
        listing = ", ".join(f"{os.path.basename(s.prefix)}: {s.dtype.name}" for s in shards)
        raise DataError(
            f"shards have different token dtypes ({listing}); they were probably tokenized with different "
            "tokenizers: re-run preprocessing of all shards with the same tokenizer"
        )
    total = sum(s.num_documents for s in shards)
    group_ids = np.asarray(group_ids)
    if group_ids.shape != (total,):
        raise DataError(
            f"{group_ids.shape[0] if group_ids.ndim == 1 else group_ids.shape} group ids for the "
            f"{total} documents of {len(shards)} shards; the domain map does not fit the shards"
        )
    if group_ids.size and (int(group_ids.min()) < 0 or int(group_ids.max()) >= num_groups):
        raise DataError(
            f"group ids range over [{int(group_ids.min())}, {int(group_ids.max())}], outside [0, "
            f"{num_groups}); the domain map is corrupt"
        )
    view = _TokenizerView(tokenizer)
    for shard in shards:
        _check_vocab(os.path.basename(shard.prefix), shard, (0, shard.num_documents), view.vocab_size, config)

    def build() -> FineIndex:
        start = time.perf_counter()
        path = description = None
        if config.path_to_cache is not None:
            hashes = shard_sha256
            if hashes is None:
                from megatron_dga.data.domain_map import shard_identity

                hashes = [shard_identity(p).idx_sha256 for p in prefixes]
            description = _cache_description(
                [os.path.basename(p) for p in prefixes],
                hashes,
                group_ids,
                num_groups,
                config.sequence_length,
                config.seed,
                documents,
                add_extra_token,
            )
            digest = hashlib.md5(description.encode("utf-8"), usedforsecurity=False).hexdigest()
            path = os.path.join(config.path_to_cache, f"{digest}-FineDomains-index.npz")
            cached = _load_cached(path, description)
            if cached is not None:
                logger.info(
                    "loaded the fine-domain index of %d groups from %s (%.2f s)",
                    num_groups,
                    path,
                    time.perf_counter() - start,
                )
                return cached
        doc_shard, doc_sequence, doc_length = shard_documents(shards)
        index = build_fine_index(
            doc_shard,
            doc_sequence,
            doc_length,
            group_ids,
            num_groups,
            config.sequence_length,
            config.seed,
            documents,
            add_extra_token,
        )
        if path is not None:
            _save_cached(path, description, index)
        logger.info(
            "built the fine-domain index: %d groups over %d documents of %d shards, %d samples "
            "(documents %s) in %.2f s%s",
            num_groups,
            total,
            len(shards),
            int(index.num_samples.sum()),
            list(documents),
            time.perf_counter() - start,
            f", saved to {path}" if path else "",
        )
        return index

    index = _build_on_rank0_first(build, config.path_to_cache is not None)
    indexed = [IndexedDataset(p, multimodal=False, mmap=config.mmap) for p in prefixes]
    return FineDomains(index, prefixes, indexed, config, view.eod, pad_token_id(view), names, add_extra_token)
