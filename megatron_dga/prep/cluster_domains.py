"""k-means domains over jsonl files or over Megatron shards (a fine-domain map): the library of
tools/cluster_domains.py (its command line and outputs: megatron_dga/cli/cluster_domains.py)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

import numpy as np

from megatron_dga.prep.clustering import (
    CENTROIDS_FILE,
    CLUSTERS_FORMAT,
    MANIFEST_FILE,
    CentroidTreeConfig,
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
    as_embedder_input,
    embedder_from_args,
    tokenizer_from_args,
)
from megatron_dga.prep.inputs import expand_jsonl_inputs, iter_jsonl, parse_text
from megatron_dga.errors import ConfigError, DataError, OutputError
from megatron_dga.fileio import atomic_write_json, ensure_writable_dir, ensure_writable_parent, output_error

logger = logging.getLogger("cluster_domains")


def prepare_output(out: str, overwrite: bool) -> None:
    """Create ``out`` (checked writable); refuse to mix with a previous run unless --overwrite."""
    ensure_writable_dir(out, "--output")
    manifest = os.path.join(out, MANIFEST_FILE)
    if os.path.exists(manifest):
        if not overwrite:
            raise ConfigError(
                f"--output {out} already holds a clustering ({manifest}); pass --overwrite or choose another directory"
            )
        try:
            with open(manifest, encoding="utf-8") as f:
                old = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest}: invalid JSON ({e}); empty --output {out} by hand") from None
        stale = [f"{d}.jsonl" for d in old.get("domains", [])] + [
            CENTROIDS_FILE,
            EMBEDDER_STATE_FILE,
            TFIDF_PAYLOAD_FILE,
            MANIFEST_FILE,
        ]
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
        raise DataError(
            f"inputs shrank while clustering ({i + 1} lines now, {labels.shape[0]} before); re-run on stable files"
        )


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
        "embedding": {
            "kind": embedder.kind,
            "dim": embedder.dim,
            "config": embedder.config_dict(),
            "state": EMBEDDER_STATE_FILE,
        },
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
    config = KMeansConfig(
        num_clusters=tuple(args.num_clusters),
        seed=args.seed,
        algorithm=args.kmeans_algorithm,
        n_init=args.kmeans_n_init,
        minibatch_threshold=args.minibatch_threshold,
    )
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
    logger.info(
        "%d domains (%d empty clusters dropped), docs per domain min %d / median %d / max %d -> %s",
        len(result.names),
        len(result.empty),
        sizes.min(),
        int(np.median(sizes)),
        sizes.max(),
        args.output,
    )


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
        logger.info(
            "fitted the %s embedder (dim %d) on %d documents in %.1f s",
            embedder.kind,
            embedder.dim,
            fit_n,
            time.time() - t,
        )
    x = np.empty((n, embedder.dim), dtype=np.float32)
    chunk_docs = getattr(embedder.config, "batch_size", 4096)
    chunk_tokens = getattr(embedder.config, "batch_tokens", 1 << 22)
    with Progress(n, "embed", enabled=False if args.no_progress else None) as bar:
        for start, docs in corpus.iter_chunks(chunk_docs, chunk_tokens):
            inputs = as_embedder_input(embedder, docs, tokenizer, drop, "--input-shards documents")
            x[start : start + len(docs)] = embedder.embed(inputs, show_progress=False)
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
        raise ConfigError(
            f"--tokenizer-type/--tokenizer-model: the shards were built with another tokenizer "
            f"({'; '.join(diff)}; shards vs flags); pass the tokenizer tools/preprocess_data.py used"
        )


def run_shards(args) -> None:
    """--input-shards PREFIX ... --output-map FILE: a fine-domain map over the shards."""
    from megatron_dga.data.domain_map import DomainMap, shard_identity, write_domain_map
    from megatron_dga.prep.shard_corpus import ShardCorpus

    t0 = time.time()
    config = CentroidTreeConfig(
        num_clusters=tuple(args.num_clusters),
        seed=args.seed,
        backend=args.kmeans_backend,
        niter=args.kmeans_iters,
        max_points_per_centroid=args.kmeans_max_points_per_centroid,
    )
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
        raise ConfigError(
            f"--embedding {kind} embeds text: the shards' documents are detokenised first, so "
            "pass the tokenizer they were built with (--tokenizer-type, --tokenizer-model / "
            "--vocab-file --merge-file / --vocab-size, as for tools/preprocess_data.py), or use "
            "--embedding token-tfidf"
        )
    embedder = embedder_from_args(args, default_kind=kind)
    workers = args.workers or default_workers()
    with limit_threads(workers):
        corpus = ShardCorpus(args.input_shards, "--input-shards")
        check_tokenizer(corpus, tokenizer)
        n = corpus.num_documents
        if n < config.num_clusters[0]:
            raise DataError(
                f"--input-shards: {n} documents cannot fill the {config.num_clusters[0]} clusters of the "
                f"first level of --num-clusters {' '.join(map(str, args.num_clusters))}; lower it to at "
                f"most {n}"
            )
        logger.info(
            "%d documents, %d tokens in %d shards -> %d fine domains (%s), %d threads",
            n,
            corpus.num_tokens,
            len(corpus.prefixes),
            config.num_leaves,
            " x ".join(map(str, config.num_clusters)),
            workers,
        )
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
        "kmeans": {
            "backend": backend,
            "iterations": config.niter,
            "max_points_per_centroid": config.max_points_per_centroid,
        },
        "num_clusters": list(config.num_clusters),
        "seed": args.seed,
        "tokenizer": corpus.tokenizer,
        "tree_id": tree.tree_id,
        "empty_domains": int(counts.size - nonempty.size),
        "seconds": round(time.time() - t0, 2),
    }
    dmap = DomainMap(
        domain_ids=ids.astype(np.int32),
        shards=identities,
        levels=list(config.num_clusters),
        names=None,
        clusters_dir=cdir_name,
        metadata=metadata,
    )
    write_domain_map(args.output_map, dmap)  # last: a map on disk always has its clusters directory
    logger.info(
        "%d documents -> %d fine domains (%d empty), documents per non-empty domain: largest %d, smallest %d, "
        "median %d; k-means %.1f s, total %.1f s -> %s (+ %s/)",
        n,
        counts.size,
        counts.size - nonempty.size,
        nonempty.max(),
        nonempty.min(),
        int(np.median(nonempty)),
        seconds_kmeans,
        time.time() - t0,
        args.output_map,
        cdir_name,
    )
