"""The tests' data: synthetic Markov-chain domain shards (``megatron_dga.data.mock``, which
--mock-data also uses), at the tests' vocabulary, the tiny model's flags, and a test run's argv
(:func:`run_argv`, one place for the schedule and logging flags every trainer test passes).
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


def data_flags(shards: dict, specific: bool = True, specific_eval: bool = False) -> list:
    """--data-path over a :func:`write_domains` result's domains, with its specific (and eval) set."""
    out = ["--data-path", *shards["domains"]]
    if specific:
        out += ["--specific-data-path", shards["specific"]]
    if specific_eval:
        out += ["--specific-eval-data-path", shards["specific_eval"]]
    return out


def run_argv(
    log_dir,
    extra: Sequence[str] = (),
    *,
    data: Sequence[str] = (),
    model: Sequence[str] = TINY_GPT_ARGS,
    micro_batch=2,
    global_batch=8,
    iters=4,
    lr="3e-3",
    log_interval=1,
) -> list:
    """A test run's argv: ``data`` flags, the null tokenizer, ``model``, Megatron's batch and schedule flags
    (``micro_batch`` None: megatron's default), a log line every ``log_interval`` steps into ``log_dir``,
    no evaluation, then ``extra`` (last: a flag given twice takes its last value)."""
    batch = [] if micro_batch is None else ["--micro-batch-size", str(micro_batch)]
    return [
        *data,
        *NULL_TOKENIZER_ARGS,
        *model,
        *batch,
        *("--global-batch-size", str(global_batch), "--train-iters", str(iters)),
        *("--log-interval", str(log_interval), "--eval-interval", "0", "--lr", str(lr), "--log-dir", str(log_dir)),
        *extra,
    ]


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
