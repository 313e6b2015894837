"""Synthetic domain shards with clearly different, learnable token statistics.

Domain i is a Markov chain: from token t the next token is ``succ_i[t]`` with
probability ``p_follow`` and otherwise uniform over the vocabulary. Each domain has its
own successor table, so the domains' gradients point in different directions, and a
mixture of domains is a mixture of their chains (the planted setting of DGA's
Theorem 1). Written with megatron-core's IndexedDatasetBuilder, like real shards.
"""
from __future__ import annotations

import json
import os
from typing import List, Sequence

import numpy as np

VOCAB = 128
"""Model vocabulary: NullTokenizer --vocab-size 127 gives ids 0..126 plus eod = 127."""
EOD = VOCAB - 1
NULL_TOKENIZER_ARGS = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1)]
TINY_GPT_ARGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                 "--make-vocab-size-divisible-by", "64"]
"""A 2-layer GPT that trains in seconds on 2 CPU cores (trainer-level tests)."""


def three_domain_shards(out_dir: str) -> dict:
    """Three domains and a specific set mixing the first two: the trainer tests' default data."""
    return write_domains(out_dir, k=3, docs_per_domain=48, doc_len=64, specific_mixture=[0.5, 0.5, 0.0])


def domain_tables(k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(EOD) for _ in range(k)])  # (k, EOD): successor of each token 0..EOD-1


def sample_documents(table: np.ndarray, num_docs: int, doc_len: int, rng, p_follow: float = 0.9) -> List[np.ndarray]:
    docs = []
    for _ in range(num_docs):
        doc = np.empty(doc_len, dtype=np.int64)
        doc[0] = rng.integers(0, EOD)
        follow = rng.random(doc_len) < p_follow
        noise = rng.integers(0, EOD, size=doc_len)
        for t in range(1, doc_len):
            doc[t] = table[doc[t - 1]] if follow[t] else noise[t]
        docs.append(np.append(doc, EOD))
    return docs


def write_shard(prefix: str, docs: Sequence[np.ndarray], vocab_size: int = VOCAB) -> str:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for doc in docs:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    with open(prefix + ".json", "w") as fh:
        json.dump({"vocab_size": vocab_size, "tokenizer_type": "NullTokenizer"}, fh)
    return prefix


def write_domains(out_dir: str, k: int = 4, docs_per_domain: int = 64, doc_len: int = 64, seed: int = 0,
                  specific_mixture: Sequence[float] | None = None, specific_docs: int = 32) -> dict:
    """Write k domain shards (and, if specific_mixture is given, specific train/eval shards
    drawn from that mixture of the domains' chains). Returns the prefixes."""
    rng = np.random.default_rng(seed)
    tables = domain_tables(k, seed)
    prefixes = [
        write_shard(os.path.join(out_dir, f"dom{i}_text_document"), sample_documents(tables[i], docs_per_domain, doc_len, rng))
        for i in range(k)
    ]
    out = {"domains": prefixes}
    if specific_mixture is not None:
        mix = np.asarray(specific_mixture, dtype=np.float64)
        for split in ("specific", "specific_eval"):
            which = rng.choice(k, size=specific_docs, p=mix / mix.sum())
            docs = [sample_documents(tables[i], 1, doc_len, rng)[0] for i in which]
            out[split] = write_shard(os.path.join(out_dir, f"{split}_text_document"), docs)
    return out
