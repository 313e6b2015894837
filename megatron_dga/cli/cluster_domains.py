"""Split a corpus into k-means domains (flat or hierarchical): jsonl files per domain, or a
fine-domain map over Megatron shards already on disk.

Two modes:

``--input-shards PREFIX [PREFIX ...] --output-map FILE`` (corpora of any size, up to 2^31 fine
domains). The documents of the shards are embedded straight from their token ids (TF-IDF over
token ids + truncated SVD, ``--embedding token-tfidf``, the default: no detokenisation and no
second tokenisation pass), clustered with faiss k-means (scikit-learn's MiniBatchKMeans when
faiss is missing) level by level, and every document's fine-domain id is written to a domain
map (``megatron_dga/data/domain_map.py``, docs/DESIGN.md) that the trainer reads with
``--data-path <the same shards> --domain-map FILE``. Memory is the embeddings (documents x dim
float32: 256 MB for 1M documents at dim 64) plus bounded chunks; the shards are memory-mapped.

    python tools/cluster_domains.py --input-shards shards/part0_text_document shards/part1_text_document \
        --output-map fine.npz --num-clusters 64 64 64          # 262,144 fine domains
    python tools/cluster_domains.py --input-shards $(ls shards/*.idx | sed 's/\\.idx$//') \
        --output-map flat.npz --num-clusters 1024 --workers 16

    fine.npz            the map: fine id of every document (row-major over the levels:
                        ((c1 * k2) + c2) * k3 + c3, named c03_05_01), the shards' identities
                        (document counts, SHA-256 of each .idx), levels, provenance
    fine.clusters/      centroid_tree.npz (centroids and document counts per level) and the
                        embedder state (embedder.json + its arrays): tools/importance_weights.py
                        --domain-map assigns new documents with them

A node with fewer distinct documents than its k children leaves children empty: the map then
has empty fine domains (the trainer never samples them). ``--embedding sentence-transformers``
or ``tfidf`` (words) embed detokenised text instead, and need the tokenizer flags of
tools/preprocess_data.py. Shards must share one tokenizer (their .json sidecars are compared).

``--input FILES --output DIR`` (small corpora): embeds jsonl documents (TF-IDF over words by
default) and writes one jsonl per domain, ready for ``tools/preprocess_data.py`` (the shard
prefix's basename becomes the domain name the trainer matches weights by).

    python tools/cluster_domains.py --input corpus/*.jsonl --output domains/ --num-clusters 64
    python tools/cluster_domains.py --input corpus/ --output fine/ --num-clusters 8 8 8   # 512 domains

Output directory:
    <domain>.jsonl      the input lines of that domain, unchanged, in input order
                        (c03 flat; c03_05_01 hierarchical = child 1 of child 5 of cluster 3)
    centroids.npy       (K, d) float32 mean embedding of each domain, in manifest domain order
    embedder.json (+ embedder_tfidf.npz)   the fitted embedder (tools/importance_weights.py reuses it)
    manifest.json       method, parameters, domain names, doc counts, hierarchy, empty clusters;
                        written last, so a directory without it is an interrupted run
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_dga.errors import DGAError
from megatron_dga.logging_setup import setup_logging
from megatron_dga.prep.cluster_domains import run_jsonl, run_shards
from megatron_dga.prep.clustering import KMEANS_BACKENDS
from megatron_dga.prep.embeddings import add_embedding_args, add_tokenizer_args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="jsonl files, globs or directories (writes --output DIR)")
    src.add_argument(
        "--input-shards",
        nargs="+",
        metavar="PREFIX",
        help="Megatron shard prefixes <dir>/<name>_text_document (writes --output-map FILE)",
    )
    p.add_argument("--output", default=None, help="with --input: output directory of per-domain jsonl files")
    p.add_argument("--output-map", default=None, help="with --input-shards: the fine-domain map (.npz) to write")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose values are embedded (joined)")
    p.add_argument(
        "--num-clusters",
        type=int,
        nargs="+",
        default=[64],
        help="clusters per level: 64 = flat; 8 8 8 = 512 hierarchical leaves",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("--input (jsonl) mode")
    g.add_argument("--kmeans-algorithm", choices=["auto", "kmeans", "minibatch"], default="auto")
    g.add_argument("--kmeans-n-init", type=int, default=3)
    g.add_argument(
        "--minibatch-threshold",
        type=int,
        default=50_000,
        help="auto: use MiniBatchKMeans on sub-problems with more points than this",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run's output in --output (only files its manifest lists)",
    )
    g.add_argument("--write-buffer-mb", type=int, default=256, help="buffered output before flushing domain files")
    g = p.add_argument_group("--input-shards mode")
    g.add_argument(
        "--kmeans-backend",
        choices=KMEANS_BACKENDS,
        default="auto",
        help="auto: faiss when installed, else scikit-learn's MiniBatchKMeans",
    )
    g.add_argument("--kmeans-iters", type=int, default=20, help="k-means iterations per node")
    g.add_argument(
        "--kmeans-max-points-per-centroid",
        type=int,
        default=256,
        help="a node trains on at most k * this many of its documents (all are assigned)",
    )
    g.add_argument(
        "--workers", type=int, default=None, help="threads for BLAS and faiss (default: the CPUs this process may use)"
    )
    add_embedding_args(p)
    add_tokenizer_args(p)
    args = p.parse_args(argv)
    if args.input is not None and args.output is None:
        p.error("--input needs --output (the directory of per-domain jsonl files)")
    if args.input_shards is not None and args.output_map is None:
        p.error("--input-shards needs --output-map (the fine-domain map file to write)")
    if args.input is not None and args.output_map is not None:
        p.error("--output-map is written from --input-shards; with --input (jsonl) use --output DIR")
    if args.input_shards is not None and args.output is not None:
        p.error("--output DIR is the jsonl mode's; with --input-shards use --output-map FILE")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers {args.workers}: must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(logging.INFO, "%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.input_shards is not None:
            run_shards(args)
        else:
            run_jsonl(args)
    except DGAError as e:
        print(f"cluster_domains: error: {e}", file=sys.stderr)
        return 2
    return 0
