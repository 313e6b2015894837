#!/usr/bin/env python
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
import json
import logging
import os
import sys
import time
import uuid

import numpy as np

from megatron_dga.prep.clustering import (
    CENTROIDS_FILE,
    CLUSTERS_FORMAT,
    MANIFEST_FILE,
    CentroidTreeConfig,
    KMEANS_BACKENDS,
    KMeansConfig,
    build_centroid_tree,
    hierarchical_kmeans,
    limit_threads,
    resolve_kmeans_backend,
)
from megatron_dga.prep.embeddings import (
    EMBEDDER_STATE_FILE,
    EMBEDDERS,
    TFIDF_PAYLOAD_FILE,
    TokenTfidfEmbedder,
    add_embedding_args,
    add_tokenizer_args,
    as_embedder_input,
    embedder_from_args,
    tokenizer_from_args,
)
from megatron_dga.prep.inputs import expand_jsonl_inputs, iter_jsonl, parse_text
from megatron_dga.errors import ConfigError, DataError, DGAError, OutputError
from megatron_dga.fileio import atomic_write_json, ensure_writable_dir, ensure_writable_parent, output_error
from megatron_dga.logging_setup import setup_logging

logger = logging.getLogger("cluster_domains")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="jsonl files, globs or directories (writes --output DIR)")
    src.add_argument("--input-shards", nargs="+", metavar="PREFIX",
                     help="Megatron shard prefixes <dir>/<name>_text_document (writes --output-map FILE)")
    p.add_argument("--output", default=None, help="with --input: output directory of per-domain jsonl files")
    p.add_argument("--output-map", default=None, help="with --input-shards: the fine-domain map (.npz) to write")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose values are embedded (joined)")
    p.add_argument("--num-clusters", type=int, nargs="+", default=[64],
                   help="clusters per level: 64 = flat; 8 8 8 = 512 hierarchical leaves")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("--input (jsonl) mode")
    g.add_argument("--kmeans-algorithm", choices=["auto", "kmeans", "minibatch"], default="auto")
    g.add_argument("--kmeans-n-init", type=int, default=3)
    g.add_argument("--minibatch-threshold", type=int, default=50_000,
                   help="auto: use MiniBatchKMeans on sub-problems with more points than this")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's output in --output (only files its manifest lists)")
    g.add_argument("--write-buffer-mb", type=int, default=256, help="buffered output before flushing domain files")
    g = p.add_argument_group("--input-shards mode")
    g.add_argument("--kmeans-backend", choices=KMEANS_BACKENDS, default="auto",
                   help="auto: faiss when installed, else scikit-learn's MiniBatchKMeans")
    g.add_argument("--kmeans-iters", type=int, default=20, help="k-means iterations per node")
    g.add_argument("--kmeans-max-points-per-centroid", type=int, default=256,
                   help="a node trains on at most k * this many of its documents (all are assigned)")
    g.add_argument("--workers", type=int, default=None,
                   help="threads for BLAS and faiss (default: the CPUs this process may use)")
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


def prepare_output(out: str, overwrite: bool) -> None:
    """Create ``out`` (checked writable); refuse to mix with a previous run unless --overwrite."""
    ensure_writable_dir(out, "--output")
    manifest = os.path.join(out, MANIFEST_FILE)
    if os.path.exists(manifest):
        if not overwrite:
            raise ConfigError(f"--output {out} already holds a clustering ({manifest}); pass --overwrite or choose another directory")
        try:
            with open(manifest, encoding="utf-8") as f:
                old = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest}: invalid JSON ({e}); empty --output {out} by hand") from None
        stale = [f"{d}.jsonl" for d in old.get("domains", [])] + [CENTROIDS_FILE, EMBEDDER_STATE_FILE, TFIDF_PAYLOAD_FILE, MANIFEST_FILE]
        for name in stale:
            path = os.path.join(out, name)
            if os.path.isfile(path):
                os.remove(path)
    leftovers = sorted(f for f in os.listdir(out) if f.endswith(".jsonl"))
    if leftovers:
        raise ConfigError(
            f"--output {out} contains {len(leftovers)} jsonl files not from a finished run (e.g. {leftovers[:3]}); "
            "domain files are appended to, so empty the directory or choose another"
        )


class DomainWriter:
    """Appends lines to many per-domain files with bounded memory and few open files.

    Hierarchical runs can have hundreds of thousands of domains, more than the
    open-file limit, so lines are buffered per domain and flushed (open, append,
    close) whenever the buffer exceeds ``max_bytes``.
    """

    def __init__(self, out: str, names: list[str], max_bytes: int):
        self.paths = [os.path.join(out, f"{n}.jsonl") for n in names]
        self.buffers: list[list[str]] = [[] for _ in names]
        self.max_bytes = max_bytes
        self.size = 0
        for path in self.paths:  # create every file, so each domain exists even before its first flush
            open(path, "w", encoding="utf-8").close()

    def write(self, domain: int, line: str) -> None:
        self.buffers[domain].append(line)
        self.size += len(line) + 1
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        for path, buf in zip(self.paths, self.buffers):
            if buf:
                with open(path, "a", encoding="utf-8") as f:
                    f.write("\n".join(buf) + "\n")
                buf.clear()
        self.size = 0


def write_domains(files: list[str], labels: np.ndarray, names: list[str], out: str, max_bytes: int) -> None:
    """Second pass over the inputs: copy each line to its domain's file."""
    writer = DomainWriter(out, names, max_bytes)
    i = -1
    for i, (path, lineno, raw) in enumerate(iter_jsonl(files)):
        if i >= labels.shape[0]:
            raise DataError(f"{path}:{lineno}: input grew while clustering; do not modify the inputs during the run")
        writer.write(int(labels[i]), raw)
    writer.flush()
    if i + 1 != labels.shape[0]:
        raise DataError(f"inputs shrank while clustering ({i + 1} lines now, {labels.shape[0]} before); re-run on stable files")


def build_manifest(args, files, embedder, result, n_docs: int, seconds: float) -> dict:
    ks = list(args.num_clusters)
    return {
        "format": CLUSTERS_FORMAT,
        "method": "kmeans" if len(ks) == 1 else "hierarchical-kmeans",
        "params": {
            "num_clusters": ks,
            "seed": args.seed,
            "kmeans_algorithm": args.kmeans_algorithm,
            "kmeans_n_init": args.kmeans_n_init,
            "minibatch_threshold": args.minibatch_threshold,
            "json_keys": list(args.json_keys),
            "inputs": [os.path.abspath(f) for f in files],
        },
        "embedding": {"kind": embedder.kind, "dim": embedder.dim, "config": embedder.config_dict(),
                      "state": EMBEDDER_STATE_FILE},
        "num_docs": n_docs,
        "domains": result.names,
        "doc_counts": {n: int(c) for n, c in zip(result.names, result.counts)},
        "centroids": CENTROIDS_FILE,
        "hierarchy": {"levels": result.levels, "parents": result.parents},
        "empty_clusters": result.empty,
        "seconds": round(seconds, 2),
    }


def run_jsonl(args) -> None:
    """--input FILES --output DIR: one jsonl per domain (small corpora)."""
    t0 = time.time()
    config = KMeansConfig(num_clusters=tuple(args.num_clusters), seed=args.seed, algorithm=args.kmeans_algorithm,
                          n_init=args.kmeans_n_init, minibatch_threshold=args.minibatch_threshold)
    files = expand_jsonl_inputs(args.input)
    prepare_output(args.output, args.overwrite)
    texts = [parse_text(raw, args.json_keys, p, n) for p, n, raw in iter_jsonl(files)]
    logger.info("%d documents from %d files", len(texts), len(files))
    if not texts:
        raise DataError(f"--input {' '.join(args.input)}: {len(files)} files hold no document (all lines blank)")
    if len(texts) < config.num_leaves:
        raise DataError(
            f"{len(texts)} documents cannot fill --num-clusters {' '.join(map(str, args.num_clusters))} "
            f"= {config.num_leaves} domains; add documents or lower --num-clusters to at most {len(texts)} leaves"
        )
    embedder = embedder_from_args(args)
    docs = as_embedder_input(embedder, texts, tokenizer_from_args(args), what="--input documents")
    del texts
    if hasattr(embedder, "fit"):
        embedder.fit(docs)
    x = embedder.embed(docs, show_progress=not args.no_progress)
    del docs
    result = hierarchical_kmeans(x, config, show_progress=not args.no_progress)
    try:  # inputs are read through iter_jsonl (DataError); an OSError here is a write (e.g. a full disk)
        write_domains(files, result.labels, result.names, args.output, args.write_buffer_mb << 20)
        np.save(os.path.join(args.output, CENTROIDS_FILE), result.centroids.astype(np.float32))
        embedder.save(args.output)
        manifest = build_manifest(args, files, embedder, result, x.shape[0], time.time() - t0)
        atomic_write_json(os.path.join(args.output, MANIFEST_FILE), manifest, indent=1)
    except OutputError:
        raise
    except OSError as e:
        raise output_error(e, args.output, "--output", explained_only=False) from e
    sizes = result.counts
    logger.info("%d domains (%d empty clusters dropped), docs per domain min %d / median %d / max %d -> %s",
                len(result.names), len(result.empty), sizes.min(), int(np.median(sizes)), sizes.max(), args.output)


# --------------------------------------------------------------------------- --input-shards
def clusters_dir_name(map_path: str) -> str:
    """The clusters directory beside a map: ``fine.npz`` -> ``fine.clusters`` (relative to the map's directory)."""
    base = os.path.basename(os.path.abspath(map_path))
    stem = base[: -len(".npz")] if base.endswith(".npz") and len(base) > 4 else base
    return stem + ".clusters"


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def embed_shards(corpus, embedder, tokenizer, args) -> np.ndarray:
    """Fit the embedder on a seeded sample of documents, then embed every document in chunks: (n, dim) float32."""
    from megatron_dga.prep.progress import Progress

    eod = corpus.eod()
    drop = [] if eod is None else [eod]
    n = corpus.num_documents
    if hasattr(embedder, "fit"):
        fit_n = min(n, args.fit_max_docs)
        sample = np.sort(np.random.default_rng(args.seed).choice(n, size=fit_n, replace=False))
        t = time.time()
        embedder.fit(as_embedder_input(embedder, corpus.gather(sample), tokenizer, drop, "--input-shards documents"))
        logger.info("fitted the %s embedder (dim %d) on %d documents in %.1f s", embedder.kind, embedder.dim, fit_n,
                    time.time() - t)
    x = np.empty((n, embedder.dim), dtype=np.float32)
    chunk_docs = getattr(embedder.config, "batch_size", 4096)
    chunk_tokens = getattr(embedder.config, "batch_tokens", 1 << 22)
    with Progress(n, "embed", enabled=False if args.no_progress else None) as bar:
        for start, docs in corpus.iter_chunks(chunk_docs, chunk_tokens):
            inputs = as_embedder_input(embedder, docs, tokenizer, drop, "--input-shards documents")
            x[start:start + len(docs)] = embedder.embed(inputs, show_progress=False)
            bar.update(len(docs))
    logger.info("embedded %d documents in %.1f s (%.0f documents/s)", n, bar.elapsed, n / max(bar.elapsed, 1e-9))
    return x


def check_tokenizer(corpus, tokenizer) -> None:
    """ConfigError when the tokenizer flags disagree with the shards' sidecars."""
    from megatron_dga.prep.shard_corpus import tokenizer_mismatch

    if tokenizer is None or corpus.tokenizer is None:
        return
    diff = tokenizer_mismatch(corpus.tokenizer, tokenizer.fingerprint())
    if diff:
        raise ConfigError(f"--tokenizer-type/--tokenizer-model: the shards were built with another tokenizer "
                          f"({'; '.join(diff)}; shards vs flags); pass the tokenizer tools/preprocess_data.py used")


def run_shards(args) -> None:
    """--input-shards PREFIX ... --output-map FILE: a fine-domain map over the shards."""
    from megatron_dga.data.domain_map import DomainMap, shard_identity, write_domain_map
    from megatron_dga.prep.shard_corpus import ShardCorpus

    t0 = time.time()
    config = CentroidTreeConfig(num_clusters=tuple(args.num_clusters), seed=args.seed, backend=args.kmeans_backend,
                                niter=args.kmeans_iters, max_points_per_centroid=args.kmeans_max_points_per_centroid)
    # Every check that can fail runs before the embedding: an unwritable destination, the shards,
    # the tokenizer, the embedding's needs, the k-means library.
    ensure_writable_parent(args.output_map, "--output-map")
    cdir_name = clusters_dir_name(args.output_map)
    cdir = os.path.join(os.path.dirname(os.path.abspath(args.output_map)), cdir_name)
    ensure_writable_dir(cdir, "--output-map (its clusters directory)")
    backend = resolve_kmeans_backend(config.backend)
    kind = args.embedding or TokenTfidfEmbedder.kind
    tokenizer = tokenizer_from_args(args)
    if EMBEDDERS[kind].input_kind != "tokens" and tokenizer is None:  # checked before a model is loaded
        raise ConfigError(f"--embedding {kind} embeds text: the shards' documents are detokenised first, so "
                          "pass the tokenizer they were built with (--tokenizer-type, --tokenizer-model / "
                          "--vocab-file --merge-file / --vocab-size, as for tools/preprocess_data.py), or use "
                          "--embedding token-tfidf")
    embedder = embedder_from_args(args, default_kind=kind)
    workers = args.workers or default_workers()
    with limit_threads(workers):
        corpus = ShardCorpus(args.input_shards, "--input-shards")
        check_tokenizer(corpus, tokenizer)
        n = corpus.num_documents
        if n < config.num_clusters[0]:
            raise DataError(f"--input-shards: {n} documents cannot fill the {config.num_clusters[0]} clusters of the "
                            f"first level of --num-clusters {' '.join(map(str, args.num_clusters))}; lower it to at "
                            f"most {n}")
        logger.info("%d documents, %d tokens in %d shards -> %d fine domains (%s), %d threads", n, corpus.num_tokens,
                    len(corpus.prefixes), config.num_leaves, " x ".join(map(str, config.num_clusters)), workers)
        identities = [shard_identity(p) for p in corpus.prefixes]
        x = embed_shards(corpus, embedder, tokenizer, args)
        t = time.time()
        tree, ids = build_centroid_tree(x, config, show_progress=False if args.no_progress else None)
        seconds_kmeans = time.time() - t
    tree.tree_id = uuid.uuid4().hex
    try:
        embedder.save(cdir)
        tree.save(cdir)
    except OutputError:
        raise
    except OSError as e:
        raise output_error(e, cdir, "--output-map", explained_only=False) from e
    counts = tree.counts[-1]
    nonempty = counts[counts > 0]
    metadata = {
        "tool": "tools/cluster_domains.py --input-shards",
        "shard_prefixes": [os.path.abspath(p) for p in corpus.prefixes],
        "embedding": {"kind": embedder.kind, "dim": embedder.dim, "config": embedder.config_dict()},
        "kmeans": {"backend": backend, "iterations": config.niter,
                   "max_points_per_centroid": config.max_points_per_centroid},
        "num_clusters": list(config.num_clusters),
        "seed": args.seed,
        "tokenizer": corpus.tokenizer,
        "tree_id": tree.tree_id,
        "empty_domains": int(counts.size - nonempty.size),
        "seconds": round(time.time() - t0, 2),
    }
    dmap = DomainMap(domain_ids=ids.astype(np.int32), shards=identities, levels=list(config.num_clusters),
                     names=None, clusters_dir=cdir_name, metadata=metadata)
    write_domain_map(args.output_map, dmap)  # last: a map on disk always has its clusters directory
    logger.info(
        "%d documents -> %d fine domains (%d empty), documents per non-empty domain: largest %d, smallest %d, "
        "median %d; k-means %.1f s, total %.1f s -> %s (+ %s/)", n, counts.size, counts.size - nonempty.size,
        nonempty.max(), nonempty.min(), int(np.median(nonempty)), seconds_kmeans, time.time() - t0,
        args.output_map, cdir_name)


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


if __name__ == "__main__":
    sys.exit(main())
