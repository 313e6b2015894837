"""CRISP-style importance weights and the basis matrix for distribution reweighting.

Importance weights: embed the specific set in the same space as the generic
domains, assign each specific document to its nearest domain (Euclidean), and use
the (optionally smoothed) histogram of assignments as the mixture weights
(``--mixing importance`` or ``--dga-init FILE``).

Basis (``--dga-basis FILE``): for each auxiliary set A_1..A_N the same histogram
over the K (fine) domains; the N x K matrix of these rows is the basis of DGA's
distribution reweighting.

Domains come from one of
  --clusters DIR           the output of tools/cluster_domains.py --input: its manifest's domain order,
                           its centroids.npy and its saved embedder;
  --labelled-domains DIR   one jsonl per domain (name = file stem, e.g. law.jsonl -> law, sorted by name);
                           centroids = mean embedding of each domain's documents, with an embedder fitted on
                           these documents (or loaded from --embedder-dir);
  --domain-map FILE        a fine-domain map written by tools/cluster_domains.py --input-shards ... --output-map
                           FILE: its K fine domains (K = 262,144 for 64 x 64 x 64), named as the map names them
                           (c03_05_01), documents assigned level by level through the centroids and embedder
                           saved in the map's clusters directory (a labelled map, without one, is refused).

Document sets (the specific set, and each basis set) are jsonl files or Megatron shards:
  --specific FILES            jsonl files, globs or directories;
  --specific-shards PREFIX..  the documents of these shards (alone or together with --specific: one set);
  --basis-sets [NAME=]PATH    one basis row per jsonl file/glob/directory (NAME defaults to the file stem);
  --basis-shards [NAME=]PREFIX  one basis row per shard (NAME defaults to the shard's domain name, its
                              basename without _text_document); rows of --basis-sets come first.
The map's embedding works on token ids (token-tfidf), so jsonl sets are tokenized first: pass the
tokenizer the shards were built with (--tokenizer-type ..., as for tools/preprocess_data.py; it is
checked against the shards' sidecar record in the map). Shard sets are embedded from their token ids
directly; with a text embedding (--clusters, --labelled-domains) they are detokenised, which needs
the tokenizer flags too.

Smoothing, for counts c_j over K domains, n = sum c_j (see megatron_dga/prep/clustering.py):
  --smoothing-mode uniform (default), eps in [0, 1]:   p_j = (1 - eps) * c_j / n + eps / K
  --smoothing-mode laplace, eps >= 0 (pseudo-count):   p_j = (c_j + eps) / (n + K * eps)
With --domain-map, K counts the NON-EMPTY fine domains only: an empty fine domain (no document of
the map's shards) keeps weight 0, since the trainer can never sample it.

Output sizes: weights files list every domain (262,144 names and weights with a 64^3 map); the
histogram counts go into the file's meta as a list for K <= 4096, as nonzero {index, value} pairs
beyond. The basis is written dense, or in CSR form (megatron_dga/mixing/weights_io.py) when that is
less than half the size and K >= 4096 (--basis-format auto; dense or sparse force one).

The trainer matches weights to its domains BY NAME (the file's "domains" list against
the shard prefixes' basenames without "_text_document", or the map's fine-domain names), never by position.

    python tools/importance_weights.py --clusters domains/ --specific task.jsonl --output weights.json
    python tools/importance_weights.py --clusters fine/ --basis-sets law=law.jsonl mmlu.jsonl \\
        --basis-output basis.npz --smoothing 0.01
    python tools/importance_weights.py --domain-map fine.npz --specific-shards task/task_text_document \\
        --output iw.json --basis-shards aux/law_text_document aux/mmlu_text_document --basis-output basis.npz
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_dga.errors import DGAError
from megatron_dga.logging_setup import setup_logging
from megatron_dga.prep.embeddings import add_embedding_args, add_tokenizer_args
from megatron_dga.prep.importance_weights import run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--clusters", help="output directory of tools/cluster_domains.py --input")
    src.add_argument("--labelled-domains", help="directory of per-domain jsonl files (domain = file stem)")
    src.add_argument("--domain-map", help="fine-domain map of tools/cluster_domains.py --input-shards --output-map")
    p.add_argument(
        "--embedder-dir", default=None, help="with --labelled-domains: load this saved embedder instead of fitting one"
    )
    p.add_argument("--specific", nargs="+", default=None, help="specific-set jsonl files, globs or directories")
    p.add_argument(
        "--specific-shards",
        nargs="+",
        default=None,
        metavar="PREFIX",
        help="specific-set Megatron shard prefixes (with --specific: one set)",
    )
    p.add_argument("--output", default=None, help="weights file to write (JSON, megatron-dga/weights-v1)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose values are embedded (joined)")
    p.add_argument("--smoothing", type=float, default=0.0, help="smoothing amount eps (see the formulas above)")
    p.add_argument("--smoothing-mode", choices=["uniform", "laplace"], default="uniform")
    p.add_argument(
        "--basis-sets",
        nargs="+",
        default=None,
        help="auxiliary jsonl sets, each [NAME=]PATH (file, glob or directory); NAME defaults to the file stem",
    )
    p.add_argument(
        "--basis-shards",
        nargs="+",
        default=None,
        metavar="[NAME=]PREFIX",
        help="auxiliary sets, one Megatron shard each; NAME defaults to its domain name",
    )
    p.add_argument("--basis-output", default=None, help="basis .npz to write")
    p.add_argument("--basis-smoothing", type=float, default=None, help="eps for basis rows (default: --smoothing)")
    p.add_argument(
        "--basis-format",
        choices=["auto", "dense", "sparse"],
        default="auto",
        help="auto: CSR when under half the dense size and K >= 4096",
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of the embedder fit (--labelled-domains)")
    p.add_argument("--no-progress", action="store_true")
    add_embedding_args(p)
    add_tokenizer_args(p)
    args = p.parse_args(argv)
    has_specific = args.specific is not None or args.specific_shards is not None
    has_basis = args.basis_sets is not None or args.basis_shards is not None
    if not has_specific and not has_basis:
        p.error(
            "nothing to do: pass --specific/--specific-shards (with --output) and/or "
            "--basis-sets/--basis-shards (with --basis-output)"
        )
    if has_specific and args.output is None:
        p.error("--specific/--specific-shards need --output (the weights file to write)")
    if has_basis and args.basis_output is None:
        p.error("--basis-sets/--basis-shards need --basis-output (the .npz to write)")
    if args.embedder_dir is not None and args.labelled_domains is None:
        p.error(
            "--embedder-dir applies to --labelled-domains only (--clusters and --domain-map use the embedder "
            "saved with them)"
        )
    return args


# --------------------------------------------------------------------------- domain spaces


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(logging.INFO, "%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run(args)
    except DGAError as e:
        print(f"importance_weights: error: {e}", file=sys.stderr)
        return 2
    return 0
