#!/usr/bin/env python
"""Split an unlabelled jsonl corpus into k-means domains (flat or hierarchical).

Embeds every document (TF-IDF + SVD by default, or a sentence-transformers
model), clusters the embeddings with k-means, and writes one jsonl per domain,
ready for ``tools/preprocess_data.py`` (the shard prefix's basename becomes the
domain name the trainer matches weights by).

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

import numpy as np

from megatron_dga.prep.clustering import CENTROIDS_FILE, CLUSTERS_FORMAT, MANIFEST_FILE, KMeansConfig, hierarchical_kmeans
from megatron_dga.prep.embeddings import (
    EMBEDDER_STATE_FILE,
    TFIDF_PAYLOAD_FILE,
    TfidfSvdEmbedder,
    add_embedding_args,
    embedder_from_args,
)
from megatron_dga.prep.inputs import expand_jsonl_inputs, iter_jsonl, parse_text
from megatron_dga.errors import ConfigError, DataError, DGAError, OutputError
from megatron_dga.fileio import atomic_write_json, ensure_writable_dir, output_error
from megatron_dga.logging_setup import setup_logging

logger = logging.getLogger("cluster_domains")



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl files, globs or directories")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose values are embedded (joined)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--num-clusters", type=int, nargs="+", default=[64],
                   help="clusters per level: 64 = flat; 8 8 8 = 512 hierarchical leaves")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--kmeans-algorithm", choices=["auto", "kmeans", "minibatch"], default="auto")
    p.add_argument("--kmeans-n-init", type=int, default=3)
    p.add_argument("--minibatch-threshold", type=int, default=50_000,
                   help="auto: use MiniBatchKMeans on sub-problems with more points than this")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run's output in --output (only files its manifest lists)")
    p.add_argument("--write-buffer-mb", type=int, default=256, help="buffered output before flushing domain files")
    p.add_argument("--no-progress", action="store_true")
    add_embedding_args(p)
    return p.parse_args(argv)


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


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(logging.INFO, "%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.time()
    try:
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
        if isinstance(embedder, TfidfSvdEmbedder):
            embedder.fit(texts)
        x = embedder.embed(texts, show_progress=not args.no_progress)
        del texts
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
    except DGAError as e:
        print(f"cluster_domains: error: {e}", file=sys.stderr)
        return 2
    sizes = result.counts
    logger.info("%d domains (%d empty clusters dropped), docs per domain min %d / median %d / max %d -> %s",
                len(result.names), len(result.empty), sizes.min(), int(np.median(sizes)), sizes.max(), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
