"""Offline data preparation: what the tools run before training, never the trainer.

* :mod:`~megatron_dga.prep.inputs`: which jsonl files an ``--input`` names, and reading them.
* :mod:`~megatron_dga.prep.preprocess`: jsonl -> megatron-core indexed shards.
* :mod:`~megatron_dga.prep.embeddings`, :mod:`~megatron_dga.prep.clustering`: document
  embeddings and k-means for domain clustering and importance sampling.
* :mod:`~megatron_dga.prep.shard_corpus`: documents of Megatron shards on disk as token ids
  (fine-domain maps are clustered from them); :mod:`~megatron_dga.prep.progress`: progress
  bars / log lines of long jobs.
* :mod:`~megatron_dga.prep.default_corpus`: the embedded default corpus.

What the trainer uses at run time (shards, the sampler, the torch glue) is
:mod:`megatron_dga.data`.
"""
