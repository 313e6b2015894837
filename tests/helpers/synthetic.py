"""The tests' data: synthetic Markov-chain domain shards (``megatron_dga.data.mock``, which
--mock-data also uses), at the tests' vocabulary, and the tiny model's flags.
"""

from __future__ import annotations

from typing import Sequence

from megatron_dga.data import mock

VOCAB = 128
"""Model vocabulary: NullTokenizer --vocab-size 127 gives ids 0..126 plus eod = 127."""
EOD = VOCAB - 1
NULL_TOKENIZER_ARGS = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1)]
TINY_GPT_ARGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--make-vocab-size-divisible-by",
    "64",
]
"""A 2-layer GPT that trains in seconds on 2 CPU cores (trainer-level tests)."""
PIPELINE_GPT_ARGS = [*TINY_GPT_ARGS[:1], "4", *TINY_GPT_ARGS[2:]]
"""The same GPT with 4 layers: two per stage at PP=2, one per model chunk with virtual stages."""


def three_domain_shards(out_dir: str) -> dict:
    """Three domains and a specific set mixing the first two: the trainer tests' default data."""
    return write_domains(out_dir, k=3, docs_per_domain=48, doc_len=64, specific_mixture=[0.5, 0.5, 0.0])


def write_domains(
    out_dir: str,
    k: int = 4,
    docs_per_domain: int = 64,
    doc_len: int = 64,
    seed: int = 0,
    specific_mixture: Sequence[float] | None = None,
    specific_docs: int = 32,
) -> dict:
    """Write k domain shards ``dom<i>`` (and, if specific_mixture is given, specific train/eval shards
    drawn from that mixture of the domains' chains). Returns the prefixes."""
    return mock.write_domains(
        out_dir,
        vocab_size=VOCAB,
        eod=EOD,
        k=k,
        docs_per_domain=docs_per_domain,
        doc_len=doc_len,
        seed=seed,
        specific_mixture=specific_mixture,
        specific_docs=specific_docs,
    )


def write_shard(prefix: str, docs) -> str:
    """One shard of the given documents at the tests' vocabulary (its sidecar records it)."""
    return mock.write_shard(prefix, docs, VOCAB)
