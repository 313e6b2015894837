"""Synthetic domain shards: Megatron's --mock-data for this trainer, and the tests' data.

Domain i is a Markov chain: from token t the next token is ``succ_i[t]`` with probability
``p_follow`` and otherwise uniform over the content tokens. Each domain has its own successor
table, so the domains' gradients point in different directions, and a mixture of domains is a
mixture of their chains (the planted setting of DGA's Theorem 1). The shards are written with
megatron-core's ``IndexedDatasetBuilder``, exactly like real ones, so everything downstream
(validation, ``GPTDataset``, the sampler) runs unchanged.

Megatron-LM's ``--mock-data`` swaps in ``MockGPTDataset`` (random documents, no files); we need
several *domains* for the mixing to act on, hence real shards in a temporary directory.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

MOCK_DOMAINS = 3
"""Domains written by :func:`write_mock_corpus` (``mock0``, ``mock1``, ``mock2``)."""
MOCK_DOCUMENTS = 64
"""Documents per mock domain: with the default --split 98,2, one or two are held out."""
MAX_CONTENT_TOKENS = 1024
"""Distinct token ids used by the chains (the smallest ids below the vocabulary, eod excluded)."""


def content_ids(vocab_size: int, eod: int) -> np.ndarray:
    """The token ids the chains use: the first ``MAX_CONTENT_TOKENS`` ids below ``vocab_size``, not ``eod``."""
    ids = np.arange(min(int(vocab_size), MAX_CONTENT_TOKENS + 1), dtype=np.int64)
    return ids[ids != eod][:MAX_CONTENT_TOKENS]


def domain_tables(k: int, num_tokens: int, seed: int = 0) -> np.ndarray:
    """(k, num_tokens): the successor of each content position, one permutation per domain."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(num_tokens) for _ in range(k)])


def sample_documents(
    table: np.ndarray,
    num_docs: int,
    doc_len: int,
    rng,
    eod: int,
    ids: Optional[np.ndarray] = None,
    p_follow: float = 0.9,
) -> List[np.ndarray]:
    """``num_docs`` documents of ``doc_len`` chain tokens followed by ``eod``.

    The chain runs over positions ``0..len(table)-1``; ``ids`` maps them to token ids
    (the identity when None).
    """
    n = len(table)
    docs = []
    for _ in range(num_docs):
        doc = np.empty(doc_len, dtype=np.int64)
        doc[0] = rng.integers(0, n)
        follow = rng.random(doc_len) < p_follow
        noise = rng.integers(0, n, size=doc_len)
        for t in range(1, doc_len):
            doc[t] = table[doc[t - 1]] if follow[t] else noise[t]
        docs.append(np.append(doc if ids is None else ids[doc], eod))
    return docs


def write_shard(prefix: str, docs: Sequence[np.ndarray], vocab_size: int, tokenizer_type: str = "NullTokenizer") -> str:
    """Write ``<prefix>.{bin,idx}`` and the sidecar ``<prefix>.json`` recording ``vocab_size``."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for doc in docs:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    with open(prefix + ".json", "w") as fh:
        json.dump({"vocab_size": int(vocab_size), "tokenizer_type": tokenizer_type}, fh)
    return prefix


def write_packed_shard(
    prefix: str, tokens: np.ndarray, doc_lengths: np.ndarray, vocab_size: int, tokenizer_type: str = "NullTokenizer"
) -> str:
    """Write ``<prefix>.{bin,idx}`` (+ sidecar) from all documents at once: ``tokens`` concatenated,
    ``doc_lengths`` per document (one sequence each).

    The same files as :func:`write_shard` (megatron-core's ``_IndexWriter`` writes the index), without
    a Python call per document: a million documents take about a second.
    """
    from megatron.core.datasets.indexed_dataset import DType, _IndexWriter

    lengths = np.asarray(doc_lengths, dtype=np.int32)
    if int(lengths.sum(dtype=np.int64)) != len(tokens):
        raise ValueError(f"doc_lengths sum to {int(lengths.sum(dtype=np.int64))}, tokens has {len(tokens)}")
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    dtype = DType.optimal_dtype(vocab_size)
    np.asarray(tokens).astype(dtype).tofile(prefix + ".bin")
    with _IndexWriter(prefix + ".idx", dtype) as writer:
        writer.write(lengths, None, np.arange(lengths.size + 1, dtype=np.int64))
    with open(prefix + ".json", "w") as fh:
        json.dump({"vocab_size": int(vocab_size), "tokenizer_type": tokenizer_type}, fh)
    return prefix


def write_domains(
    out_dir: str,
    *,
    vocab_size: int,
    eod: int,
    k: int = 4,
    docs_per_domain: int = 64,
    doc_len: int = 64,
    seed: int = 0,
    specific_mixture: Optional[Sequence[float]] = None,
    specific_docs: int = 32,
    name: str = "dom",
    tokenizer_type: str = "NullTokenizer",
    specific_splits: Sequence[str] = ("specific", "specific_eval"),
) -> Dict[str, object]:
    """Write k domain shards ``<out_dir>/<name><i>_text_document`` and, with ``specific_mixture``,
    one shard per name in ``specific_splits`` drawn from that mixture of the domains' chains.

    Returns:
        ``{"domains": [prefixes], <split>: prefix, ...}``.
    """
    rng = np.random.default_rng(seed)
    ids = content_ids(vocab_size, eod)
    tables = domain_tables(k, len(ids), seed)
    out: Dict[str, object] = {
        "domains": [
            write_shard(
                os.path.join(out_dir, f"{name}{i}_text_document"),
                sample_documents(tables[i], docs_per_domain, doc_len, rng, eod, ids),
                vocab_size,
                tokenizer_type,
            )
            for i in range(k)
        ]
    }
    if specific_mixture is not None:
        mix = np.asarray(specific_mixture, dtype=np.float64)
        for split in specific_splits:
            which = rng.choice(k, size=specific_docs, p=mix / mix.sum())
            docs = [sample_documents(tables[i], 1, doc_len, rng, eod, ids)[0] for i in which]
            out[split] = write_shard(os.path.join(out_dir, f"{split}_text_document"), docs, vocab_size, tokenizer_type)
    return out


def write_mock_corpus(
    out_dir: str, *, vocab_size: int, eod: int, seq_length: int, seed: int, tokenizer_type: str
) -> Dict[str, object]:
    """--mock-data: ``mock0..mock2`` and a specific set ``mock_specific`` (half mock0, half mock1).

    Every document is ``seq_length`` tokens plus eod, so any --split part of at least one
    document holds a sample. The same ``seed`` writes the same shards on every rank.
    """
    return write_domains(
        out_dir,
        vocab_size=vocab_size,
        eod=eod,
        k=MOCK_DOMAINS,
        docs_per_domain=MOCK_DOCUMENTS,
        doc_len=seq_length,
        seed=seed,
        specific_mixture=[0.5, 0.5, 0.0],
        specific_docs=MOCK_DOCUMENTS // 2,
        name="mock",
        tokenizer_type=tokenizer_type,
        specific_splits=("mock_specific",),
    )
