"""CRISP-style importance weights and the basis matrix of distribution reweighting: the library of
tools/importance_weights.py (its command line, flags and output formats: megatron_dga/cli/importance_weights.py)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Optional

import numpy as np

from megatron_dga.prep.clustering import (
    CENTROIDS_FILE,
    CLUSTERS_FORMAT,
    MANIFEST_FILE,
    CentroidTree,
    assign_nearest,
    histogram,
    mean_centroids,
    smooth_distribution,
)
from megatron_dga.prep.embeddings import (
    Embedder,
    as_embedder_input,
    embedder_from_args,
    load_embedder,
    missing_tokenizer,
    tokenizer_from_args,
)
from megatron_dga.prep.inputs import expand_jsonl_inputs, is_jsonl_name, jsonl_stem, read_jsonl_texts
from megatron_dga.errors import ConfigError, DataError
from megatron_dga.fileio import NPZ_READ_ERRORS, ensure_writable_parent
from megatron_dga.mixing.weights_io import save_basis, save_weights

logger = logging.getLogger("importance_weights")

_DENSE_COUNTS_MAX = 4096
"""Up to this many domains the weights file's meta lists every count; beyond, the nonzero ones."""
_SPARSE_BASIS_MIN_K = 4096


class DomainSpace:
    """The K domains weights are computed over, and how a document is assigned to one.

    (A plain class, not a dataclass: tests import this script by path, outside sys.modules.)

    Attributes:
        names: Domain names, in output order.
        embedder: The embedder the domains were built with.
        assign: Embeddings (n, dim) -> domain index (n,) in [0, K).
        source: Provenance for the output files' meta.
        support: Boolean (K,): the domains that hold documents (smoothing spreads over them only);
            None = all.
        tokenizer_record: The tokenizer fields of the shards the domains were built from (None: unknown).
    """

    def __init__(
        self,
        names: list[str],
        embedder: Embedder,
        assign: Callable[[np.ndarray], np.ndarray],
        source: dict[str, Any],
        support: Optional[np.ndarray] = None,
        tokenizer_record: Optional[dict] = None,
    ):
        self.names, self.embedder, self.assign, self.source = names, embedder, assign, source
        self.support, self.tokenizer_record = support, tokenizer_record


def load_cluster_space(directory: str) -> DomainSpace:
    """Domain names (manifest order), centroids and embedder of a cluster_domains --input output."""
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"--clusters {directory}: no manifest.json; run tools/cluster_domains.py (to completion) first"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CLUSTERS_FORMAT:
        tag = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: format {tag!r}, expected {CLUSTERS_FORMAT!r}; not a tools/cluster_domains.py output")
    names = manifest.get("domains")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: 'domains' must be a non-empty list of names; re-run tools/cluster_domains.py")
    cpath = os.path.join(directory, manifest.get("centroids", CENTROIDS_FILE))
    try:
        centroids = np.load(cpath, allow_pickle=False)
    except NPZ_READ_ERRORS as e:
        raise DataError(f"--clusters {directory}: cannot read centroids '{cpath}' ({e})") from None
    if centroids.ndim != 2 or centroids.shape[0] != len(names):
        raise DataError(
            f"{cpath}: shape {centroids.shape}, but the manifest lists {len(names)} domains; re-run cluster_domains.py"
        )
    embedder = load_embedder(directory)
    if embedder.dim != centroids.shape[1]:
        raise DataError(
            f"{cpath}: centroid dim {centroids.shape[1]} != embedder dim {embedder.dim}; re-run cluster_domains.py"
        )
    return DomainSpace(
        names,
        embedder,
        lambda x: assign_nearest(x, centroids),
        {"clusters": os.path.abspath(directory), "assignment": "nearest centroid (Euclidean)"},
    )


def load_labelled_space(directory: str, json_keys, args, tokenizer) -> DomainSpace:
    """Domain names (sorted stems), mean-embedding centroids and embedder of a labelled-domains directory."""
    if not os.path.isdir(directory):
        raise DataError(f"--labelled-domains {directory} is not a directory")
    files = {}
    for f in sorted(os.listdir(directory)):
        if is_jsonl_name(f) and os.path.isfile(os.path.join(directory, f)):
            name = jsonl_stem(f)
            if name in files:
                raise DataError(
                    f"--labelled-domains {directory}: domain {name!r} has two files ({files[name]}, {f}); keep one"
                )
            files[name] = f
    if not files:
        raise DataError(f"--labelled-domains {directory}: no *.jsonl files; one file per domain is expected")
    names = sorted(files)
    texts_per_domain = []
    for name in names:
        texts = read_jsonl_texts([os.path.join(directory, files[name])], json_keys)
        if not texts:
            raise DataError(
                f"--labelled-domains: {os.path.join(directory, files[name])} has no document; remove it or add documents"
            )
        texts_per_domain.append(texts)
    all_texts = [t for ts in texts_per_domain for t in ts]
    labels = np.repeat(np.arange(len(names)), [len(ts) for ts in texts_per_domain])
    if args.embedder_dir is not None:
        embedder = load_embedder(args.embedder_dir)
    else:
        embedder = embedder_from_args(args)
    docs = as_embedder_input(embedder, all_texts, tokenizer, what="--labelled-domains documents")
    if args.embedder_dir is None and hasattr(embedder, "fit"):
        embedder.fit(docs)
    x = embedder.embed(docs, show_progress=not args.no_progress)
    centroids = mean_centroids(x, labels, len(names))
    return DomainSpace(
        names,
        embedder,
        lambda y: assign_nearest(y, centroids),
        {"labelled_domains": os.path.abspath(directory), "assignment": "nearest centroid (Euclidean)"},
    )


def load_map_space(path: str) -> DomainSpace:
    """The K fine domains of a domain map, assigned through its clusters directory's centroid tree."""
    from megatron_dga.data.domain_map import clusters_path, read_domain_map

    dmap = read_domain_map(path)
    cdir = clusters_path(path, dmap)
    if cdir is None:
        raise DataError(
            f"--domain-map {path} is a labelled map (clusters_dir is null): it has no centroids to assign new "
            "documents to. Build weights over labelled domains with --labelled-domains DIR (one jsonl per domain), "
            "or cluster the shards with tools/cluster_domains.py --input-shards ... --output-map FILE"
        )
    if not os.path.isdir(cdir):
        raise DataError(
            f"--domain-map {path}: its clusters directory {cdir} is missing (it holds the centroids and "
            "the embedder); keep it beside the map, or re-run tools/cluster_domains.py --input-shards"
        )
    tree = CentroidTree.load(cdir)
    embedder = load_embedder(cdir)
    recorded = dmap.metadata.get("tree_id")
    if tree.levels != dmap.levels or (recorded and tree.tree_id != recorded):
        raise DataError(
            f"--domain-map {path}: {cdir} belongs to another clustering run (levels {tree.levels} vs the map's "
            f"{dmap.levels}, tree id {tree.tree_id[:12]} vs {str(recorded)[:12]}); re-run tools/cluster_domains.py "
            "--input-shards ... --output-map to write both again"
        )
    if embedder.dim != tree.dim:
        raise DataError(
            f"{cdir}: embedder dim {embedder.dim} != centroid dim {tree.dim}; the directory is "
            "inconsistent: re-run tools/cluster_domains.py --input-shards"
        )
    names = [dmap.domain_name(j) for j in range(dmap.num_domains)]
    tok = dmap.metadata.get("tokenizer")
    return DomainSpace(
        names,
        embedder,
        tree.assign,
        {
            "domain_map": os.path.abspath(path),
            "levels": list(dmap.levels),
            "assignment": "nearest non-empty centroid, level by level (Euclidean)",
        },
        support=dmap.domain_counts() > 0,
        tokenizer_record=tok if isinstance(tok, dict) else None,
    )


# --------------------------------------------------------------------------- document sets
class DocumentSet:
    """A specific or basis set: jsonl files and/or Megatron shards.

    Attributes:
        name: The set's name (a basis row's name).
        what: The flag that named it, for messages.
        files: jsonl files.
        prefixes: Shard prefixes.
        corpus: The opened :class:`~megatron_dga.prep.shard_corpus.ShardCorpus` of ``prefixes``
            (validated up front by :func:`open_shards`).
    """

    def __init__(self, name: str, what: str, files: Optional[list[str]] = None, prefixes: Optional[list[str]] = None):
        self.name, self.what = name, what
        self.files, self.prefixes = list(files or []), list(prefixes or [])
        self.corpus = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.files:
            out["files"] = [os.path.abspath(f) for f in self.files]
        if self.prefixes:
            out["shards"] = [os.path.abspath(p) for p in self.prefixes]
        return out


def _split_name(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare PATH (or one that exists with '=' in it) -> ("", PATH)."""
    name, sep, path = spec.partition("=")
    if not sep or os.path.exists(spec) or os.path.exists(spec + ".idx"):
        return "", spec
    return name, path


def parse_basis_specs(specs: list[str] | None, shard_specs: list[str] | None) -> list[DocumentSet]:
    """``[NAME=]PATH`` (jsonl) and ``[NAME=]PREFIX`` (shard) items -> basis sets, jsonl ones first."""
    from megatron_dga.data.domains import domain_name

    out: list[DocumentSet] = []
    for spec in specs or []:
        name, path = _split_name(spec)
        files = expand_jsonl_inputs([path], flag="--basis-sets")
        name = name or jsonl_stem(path)
        out.append(DocumentSet(name, f"--basis-sets {name}", files=files))
    for spec in shard_specs or []:
        name, prefix = _split_name(spec)
        out.append(DocumentSet(name or domain_name(prefix), f"--basis-shards {spec}", prefixes=[prefix]))
    seen = set()
    for s in out:
        if s.name in seen:
            raise ConfigError(
                f"--basis-sets/--basis-shards: name {s.name!r} used twice; write NAME=PATH to give distinct names"
            )
        seen.add(s.name)
    return out


def open_shards(sets: list[DocumentSet], space: DomainSpace) -> None:
    """Validate every set's shards (inspect, one tokenizer) before any embedding; check them against the space."""
    from megatron_dga.prep.shard_corpus import ShardCorpus, tokenizer_mismatch

    for s in sets:
        if not s.prefixes:
            continue
        s.corpus = ShardCorpus(s.prefixes, s.what.split()[0])
        if space.tokenizer_record and s.corpus.tokenizer:
            diff = tokenizer_mismatch(space.tokenizer_record, s.corpus.tokenizer)
            if diff:
                raise DataError(
                    f"{s.what}: the shards were tokenized with another tokenizer than the map's shards "
                    f"({'; '.join(diff)}; map vs set): token-id embeddings are only comparable under one "
                    "tokenizer; re-run tools/preprocess_data.py on the set with the map's tokenizer"
                )


def check_conversions(sets: list[DocumentSet], space: DomainSpace, tokenizer) -> None:
    """ConfigError before any embedding when a set needs a tokenizer (or the tokenizer does not fit the space)."""
    from megatron_dga.prep.shard_corpus import tokenizer_mismatch

    for s in sets:
        for present, are_tokens in ((s.files, False), (s.prefixes, True)):
            error = missing_tokenizer(space.embedder, are_tokens, f"{s.what} documents") if present else None
            if error is not None and tokenizer is None:
                raise error
    if tokenizer is not None and space.tokenizer_record:
        diff = tokenizer_mismatch(space.tokenizer_record, tokenizer.fingerprint())
        if diff:
            raise ConfigError(
                f"--tokenizer-type/--tokenizer-model: not the tokenizer the map's shards were built with "
                f"({'; '.join(diff)}; map vs flags); pass the one tools/preprocess_data.py used"
            )


def set_counts(docs: DocumentSet, space: DomainSpace, args, tokenizer) -> np.ndarray:
    """Counts of the assignments of a document set's documents to the space's domains, (K,) int64."""
    from megatron_dga.prep.progress import Progress

    k = len(space.names)
    counts = np.zeros(k, dtype=np.int64)
    if docs.files:
        texts = read_jsonl_texts(docs.files, args.json_keys)
        inputs = as_embedder_input(space.embedder, texts, tokenizer, what=f"{docs.what} documents")
        x = space.embedder.embed(inputs, show_progress=not args.no_progress)
        counts += histogram(space.assign(x), k)
    if docs.corpus is not None:
        eod = docs.corpus.eod()
        drop = [] if eod is None else [eod]
        with Progress(
            docs.corpus.num_documents, f"embed {docs.name}", enabled=False if args.no_progress else None
        ) as bar:
            for _, chunk in docs.corpus.iter_chunks(8192, 1 << 22):
                inputs = as_embedder_input(space.embedder, chunk, tokenizer, drop, f"{docs.what} documents")
                counts += histogram(space.assign(space.embedder.embed(inputs, show_progress=False)), k)
                bar.update(len(chunk))
    if counts.sum() == 0:
        where = " ".join(docs.files + docs.prefixes)
        raise DataError(f"{docs.what} {where}: no document (all lines blank, or empty shards)")
    return counts


def smooth_over(counts: np.ndarray, eps: float, mode: str, support: Optional[np.ndarray]) -> np.ndarray:
    """:func:`smooth_distribution` over the ``support`` domains (all when None); 0 elsewhere."""
    if support is None:
        return smooth_distribution(counts, eps, mode)
    if np.any(counts[~support]):  # assignment only ever picks non-empty nodes
        raise AssertionError("documents assigned to an empty fine domain")
    p = np.zeros(counts.shape[0], dtype=np.float64)
    p[support] = smooth_distribution(counts[support], eps, mode)
    return p


def smoothing_meta(eps: float, mode: str, support: Optional[np.ndarray] = None) -> dict:
    formula = "(1 - eps) * c_j / n + eps / K" if mode == "uniform" else "(c_j + eps) / (n + K * eps)"
    out = {"eps": eps, "mode": mode, "formula": formula}
    if support is not None:
        out["K"] = f"{int(support.sum())} non-empty fine domains (empty ones keep weight 0)"
    return out


def counts_meta(counts: np.ndarray) -> dict:
    """The histogram for a file's meta: every count up to 4096 domains, the nonzero ones beyond."""
    if counts.shape[0] <= _DENSE_COUNTS_MAX:
        return {"counts": counts.tolist()}
    nz = np.flatnonzero(counts)
    return {"nonzero_counts": {"index": nz.tolist(), "value": counts[nz].tolist()}}


def basis_matrix(rows: list[np.ndarray], fmt: str):
    """Stack the basis rows, as CSR when ``fmt`` says so or (auto) when that saves half the size at K >= 4096."""
    import scipy.sparse as sp

    m = np.stack(rows)
    nnz = int(np.count_nonzero(m))
    sparse = fmt == "sparse" or (fmt == "auto" and m.shape[1] >= _SPARSE_BASIS_MIN_K and 16 * nnz < 0.5 * 8 * m.size)
    return sp.csr_matrix(m) if sparse else m


def run(args) -> None:
    # Before any embedding: an unwritable or full destination fails now, in one line.
    for path, flag in ((args.output, "--output"), (args.basis_output, "--basis-output")):
        if path:
            ensure_writable_parent(path, flag)
    basis_eps = args.smoothing if args.basis_smoothing is None else args.basis_smoothing
    # Validate smoothing before any expensive embedding.
    smooth_distribution(np.ones(1), args.smoothing, args.smoothing_mode)
    smooth_distribution(np.ones(1), basis_eps, args.smoothing_mode)
    basis_sets = parse_basis_specs(args.basis_sets, args.basis_shards)
    specific = None
    if args.specific is not None or args.specific_shards is not None:
        specific = DocumentSet(
            "specific",
            "--specific" if args.specific else "--specific-shards",
            files=expand_jsonl_inputs(args.specific, flag="--specific") if args.specific else [],
            prefixes=list(args.specific_shards or []),
        )
    tokenizer = tokenizer_from_args(args)
    if args.clusters:
        space = load_cluster_space(args.clusters)
    elif args.domain_map:
        space = load_map_space(args.domain_map)
    else:
        space = load_labelled_space(args.labelled_domains, args.json_keys, args, tokenizer)
    sets = ([specific] if specific else []) + basis_sets
    check_conversions(sets, space, tokenizer)
    open_shards(sets, space)
    names = space.names
    common = {**space.source, "embedding": space.embedder.kind, "json_keys": list(args.json_keys)}
    if specific is not None:
        counts = set_counts(specific, space, args, tokenizer)
        weights = smooth_over(counts, args.smoothing, args.smoothing_mode, space.support)
        meta = {
            "method": "importance",
            **common,
            "specific": specific.describe(),
            "num_docs": int(counts.sum()),
            **counts_meta(counts),
            "smoothing": smoothing_meta(args.smoothing, args.smoothing_mode, space.support),
        }
        save_weights(args.output, names, weights, meta)
        top = np.argsort(-weights, kind="stable")[:5]
        logger.info(
            "%d specific docs over %d domains (%d hit) -> %s; top: %s",
            counts.sum(),
            len(names),
            np.count_nonzero(counts),
            args.output,
            ", ".join(f"{names[i]}={weights[i]:.3g}" for i in top),
        )
    if basis_sets:
        rows, set_meta = [], {}
        for s in basis_sets:
            c = set_counts(s, space, args, tokenizer)
            rows.append(smooth_over(c, basis_eps, args.smoothing_mode, space.support))
            set_meta[s.name] = {
                **s.describe(),
                "num_docs": int(c.sum()),
                "num_nonzero_domains": int(np.count_nonzero(c)),
            }
        meta = {
            "method": "importance-basis",
            **common,
            "sets": set_meta,
            "smoothing": smoothing_meta(basis_eps, args.smoothing_mode, space.support),
        }
        matrix = basis_matrix(rows, args.basis_format)
        save_basis(args.basis_output, matrix, [s.name for s in basis_sets], names, meta)
        logger.info(
            "basis %d x %d (%s) -> %s",
            len(rows),
            len(names),
            "dense" if isinstance(matrix, np.ndarray) else f"CSR, {matrix.nnz} nonzeros",
            args.basis_output,
        )
