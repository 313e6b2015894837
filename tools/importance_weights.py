#!/usr/bin/env python
"""CRISP-style importance weights and the basis matrix for distribution reweighting.

Importance weights: embed the specific set in the same space as the generic
domains, assign each specific document to its nearest domain centroid
(Euclidean), and use the (optionally smoothed) histogram of assignments as the
mixture weights (``--mixing importance`` or ``--dga-init FILE``).

Basis (``--dga-basis FILE``): for each auxiliary set A_1..A_N the same histogram
over the K (fine) domains; the N x K matrix of these rows is the basis of DGA's
distribution reweighting.

Domains come from either
  --clusters DIR           the output of tools/cluster_domains.py: its manifest's domain order,
                           its centroids.npy and its saved embedder; or
  --labelled-domains DIR   one jsonl per domain (name = file stem, e.g. law.jsonl -> law, sorted by name);
                           centroids = mean embedding of each domain's documents, with an embedder fitted on
                           these documents (or loaded from --embedder-dir).

Smoothing, for counts c_j over K domains, n = sum c_j (see megatron_dga/prep/clustering.py):
  --smoothing-mode uniform (default), eps in [0, 1]:   p_j = (1 - eps) * c_j / n + eps / K
  --smoothing-mode laplace, eps >= 0 (pseudo-count):   p_j = (c_j + eps) / (n + K * eps)

The trainer matches weights to its domains BY NAME (the file's "domains" list against
the shard prefixes' basenames without "_text_document"), never by position.

    python tools/importance_weights.py --clusters domains/ --specific task.jsonl --output weights.json
    python tools/importance_weights.py --clusters fine/ --basis-sets law=law.jsonl mmlu.jsonl \\
        --basis-output basis.npz --smoothing 0.01
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

from megatron_dga.prep.clustering import (
    CENTROIDS_FILE,
    CLUSTERS_FORMAT,
    MANIFEST_FILE,
    assign_nearest,
    histogram,
    mean_centroids,
    smooth_distribution,
)
from megatron_dga.prep.embeddings import (
    Embedder,
    TfidfSvdEmbedder,
    add_embedding_args,
    embedder_from_args,
    load_embedder,
)
from megatron_dga.prep.inputs import expand_jsonl_inputs, read_jsonl_texts
from megatron_dga.errors import ConfigError, DataError, DGAError
from megatron_dga.fileio import ensure_writable_parent
from megatron_dga.logging_setup import setup_logging
from megatron_dga.mixing.weights_io import save_basis, save_weights

logger = logging.getLogger("importance_weights")

_DOMAIN_SUFFIXES = (".jsonl.gz", ".jsonl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--clusters", help="output directory of tools/cluster_domains.py")
    src.add_argument("--labelled-domains", help="directory of per-domain jsonl files (domain = file stem)")
    p.add_argument("--embedder-dir", default=None,
                   help="with --labelled-domains: load this saved embedder instead of fitting one")
    p.add_argument("--specific", nargs="+", default=None, help="specific-set jsonl files, globs or directories")
    p.add_argument("--output", default=None, help="weights file to write (JSON, megatron-dga/weights-v1)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose values are embedded (joined)")
    p.add_argument("--smoothing", type=float, default=0.0, help="smoothing amount eps (see the formulas above)")
    p.add_argument("--smoothing-mode", choices=["uniform", "laplace"], default="uniform")
    p.add_argument("--basis-sets", nargs="+", default=None,
                   help="auxiliary sets, each [NAME=]PATH (file, glob or directory); NAME defaults to the file stem")
    p.add_argument("--basis-output", default=None, help="basis .npz to write")
    p.add_argument("--basis-smoothing", type=float, default=None, help="eps for basis rows (default: --smoothing)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the embedder fit (--labelled-domains)")
    p.add_argument("--no-progress", action="store_true")
    add_embedding_args(p)
    args = p.parse_args(argv)
    if args.specific is None and args.basis_sets is None:
        p.error("nothing to do: pass --specific (with --output) and/or --basis-sets (with --basis-output)")
    if args.specific is not None and args.output is None:
        p.error("--specific needs --output (the weights file to write)")
    if args.basis_sets is not None and args.basis_output is None:
        p.error("--basis-sets needs --basis-output (the .npz to write)")
    if args.embedder_dir is not None and args.labelled_domains is None:
        p.error("--embedder-dir applies to --labelled-domains only (--clusters uses the embedder saved in it)")
    return args


# --------------------------------------------------------------------------- domain space
def load_cluster_space(directory: str) -> tuple[list[str], np.ndarray, Embedder]:
    """Domain names (manifest order), centroids and embedder of a cluster_domains output."""
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"--clusters {directory}: no manifest.json; run tools/cluster_domains.py (to completion) first") from None
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
    except (OSError, ValueError) as e:
        raise DataError(f"--clusters {directory}: cannot read centroids '{cpath}' ({e})") from None
    if centroids.ndim != 2 or centroids.shape[0] != len(names):
        raise DataError(f"{cpath}: shape {centroids.shape}, but the manifest lists {len(names)} domains; re-run cluster_domains.py")
    embedder = load_embedder(directory)
    if embedder.dim != centroids.shape[1]:
        raise DataError(f"{cpath}: centroid dim {centroids.shape[1]} != embedder dim {embedder.dim}; re-run cluster_domains.py")
    return names, centroids, embedder


def load_labelled_space(directory: str, json_keys, args) -> tuple[list[str], np.ndarray, Embedder]:
    """Domain names (sorted stems), mean-embedding centroids and embedder of a labelled-domains directory."""
    if not os.path.isdir(directory):
        raise DataError(f"--labelled-domains {directory} is not a directory")
    files = {}
    for f in sorted(os.listdir(directory)):
        for suf in _DOMAIN_SUFFIXES:
            if f.endswith(suf) and os.path.isfile(os.path.join(directory, f)):
                name = f[: -len(suf)]
                if name in files:
                    raise DataError(f"--labelled-domains {directory}: domain {name!r} has two files ({files[name]}, {f}); keep one")
                files[name] = f
                break
    if not files:
        raise DataError(f"--labelled-domains {directory}: no *.jsonl files; one file per domain is expected")
    names = sorted(files)
    texts_per_domain = []
    for name in names:
        texts = read_jsonl_texts([os.path.join(directory, files[name])], json_keys)
        if not texts:
            raise DataError(f"--labelled-domains: {os.path.join(directory, files[name])} has no document; remove it or add documents")
        texts_per_domain.append(texts)
    all_texts = [t for ts in texts_per_domain for t in ts]
    labels = np.repeat(np.arange(len(names)), [len(ts) for ts in texts_per_domain])
    if args.embedder_dir is not None:
        embedder = load_embedder(args.embedder_dir)
    else:
        embedder = embedder_from_args(args)
        if isinstance(embedder, TfidfSvdEmbedder):
            embedder.fit(all_texts)
    x = embedder.embed(all_texts, show_progress=not args.no_progress)
    return names, mean_centroids(x, labels, len(names)), embedder


# --------------------------------------------------------------------------- histograms
def set_counts(files: list[str], json_keys, embedder: Embedder, centroids: np.ndarray, what: str,
               show_progress: bool) -> np.ndarray:
    """Counts of nearest-centroid assignments of a document set, (K,) int64."""
    texts = read_jsonl_texts(files, json_keys)
    if not texts:
        raise DataError(f"{what} {' '.join(files)}: no document (all lines blank)")
    x = embedder.embed(texts, show_progress=show_progress)
    return histogram(assign_nearest(x, centroids), centroids.shape[0])


def parse_basis_specs(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``[NAME=]PATH`` items -> (name, files); names default to the file or directory stem."""
    out, seen = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            name, path = "", spec
        files = expand_jsonl_inputs([path], flag="--basis-sets")
        if not name:
            base = os.path.basename(os.path.normpath(path))
            for suf in (".jsonl.gz", ".jsonl", ".json.gz", ".json"):
                if base.endswith(suf):
                    base = base[: -len(suf)]
                    break
            name = base
        if name in seen:
            raise ConfigError(f"--basis-sets: name {name!r} used twice; write NAME=PATH to give distinct names")
        seen.add(name)
        out.append((name, files))
    return out


def smoothing_meta(eps: float, mode: str) -> dict:
    formula = "(1 - eps) * c_j / n + eps / K" if mode == "uniform" else "(c_j + eps) / (n + K * eps)"
    return {"eps": eps, "mode": mode, "formula": formula}


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(logging.INFO, "%(asctime)s %(name)s %(levelname)s %(message)s")
    progress = not args.no_progress
    try:
        # Before any embedding: an unwritable or full destination fails now, in one line.
        for path, flag in ((args.output, "--output"), (args.basis_output, "--basis-output")):
            if path:
                ensure_writable_parent(path, flag)
        basis_eps = args.smoothing if args.basis_smoothing is None else args.basis_smoothing
        # Validate smoothing before any expensive embedding.
        smooth_distribution(np.ones(1), args.smoothing, args.smoothing_mode)
        smooth_distribution(np.ones(1), basis_eps, args.smoothing_mode)
        basis_specs = parse_basis_specs(args.basis_sets) if args.basis_sets else []
        specific_files = expand_jsonl_inputs(args.specific, flag="--specific") if args.specific else []
        if args.clusters:
            names, centroids, embedder = load_cluster_space(args.clusters)
            source = {"clusters": os.path.abspath(args.clusters)}
        else:
            names, centroids, embedder = load_labelled_space(args.labelled_domains, args.json_keys, args)
            source = {"labelled_domains": os.path.abspath(args.labelled_domains)}
        common = {**source, "embedding": embedder.kind, "assignment": "nearest centroid (Euclidean)",
                  "json_keys": list(args.json_keys)}
        if specific_files:
            counts = set_counts(specific_files, args.json_keys, embedder, centroids, "--specific", progress)
            weights = smooth_distribution(counts, args.smoothing, args.smoothing_mode)
            meta = {"method": "importance", **common, "specific": [os.path.abspath(f) for f in specific_files],
                    "num_docs": int(counts.sum()), "counts": counts.tolist(),
                    "smoothing": smoothing_meta(args.smoothing, args.smoothing_mode)}
            save_weights(args.output, names, weights, meta)
            top = np.argsort(-weights)[:5]
            logger.info("%d specific docs over %d domains -> %s; top: %s", counts.sum(), len(names), args.output,
                        ", ".join(f"{names[i]}={weights[i]:.3f}" for i in top))
        if basis_specs:
            rows, set_meta = [], {}
            for name, files in basis_specs:
                c = set_counts(files, args.json_keys, embedder, centroids, f"--basis-sets {name}", progress)
                rows.append(smooth_distribution(c, basis_eps, args.smoothing_mode))
                set_meta[name] = {"files": [os.path.abspath(f) for f in files], "num_docs": int(c.sum()),
                                  "num_nonzero_domains": int(np.count_nonzero(c))}
            meta = {"method": "importance-basis", **common, "sets": set_meta,
                    "smoothing": smoothing_meta(basis_eps, args.smoothing_mode)}
            save_basis(args.basis_output, np.stack(rows), [n for n, _ in basis_specs], names, meta)
            logger.info("basis %d x %d -> %s", len(rows), len(names), args.basis_output)
    except DGAError as e:
        print(f"importance_weights: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
