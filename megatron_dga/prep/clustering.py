"""k-means domains, hierarchical k-means, nearest-centroid histograms.

Used by ``tools/cluster_domains.py`` (split a corpus into domains) and
``tools/importance_weights.py`` (CRISP-style importance histograms and the
basis matrix for distribution reweighting).

Naming. Flat k-means with k clusters names them ``c00 .. c{k-1}``; hierarchical
k-means with ``num_clusters = (k1, k2, k3)`` names a leaf ``cAA_BB_CC`` (its index
at each level), e.g. ``c03_05_01`` is child 1 of child 5 of top cluster 3. The index
width is ``max(2, digits(k-1))`` per level. A cluster that ends up with no
document keeps its index (names never shift) but is dropped from the domain list
and reported in :attr:`ClusterResult.empty`.

Centroids. Leaf centroids are the exact means of their members' embeddings (not
the k-means solver's running centres), so that "nearest centroid" means the
same thing here and for labelled domains (:func:`mean_centroids`).

Smoothing (:func:`smooth_distribution`), for counts ``c_j`` over ``K`` domains with
``n = sum_j c_j``:

* ``mode="uniform"`` (default), ``0 <= eps <= 1``: ``p_j = (1 - eps) * c_j / n + eps / K``
  (mix ``eps`` of probability mass uniformly into the histogram);
* ``mode="laplace"``, ``eps >= 0`` pseudo-counts: ``p_j = (c_j + eps) / (n + K * eps)``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from megatron_dga.errors import ConfigError, DataError
from megatron_dga.fileio import NPZ_READ_ERRORS, load_npz, atomic_write

logger = logging.getLogger(__name__)

SMOOTHING_MODES = ("uniform", "laplace")

CLUSTERS_FORMAT = "megatron-dga/clusters-v1"
"""``format`` tag of ``<out>/manifest.json`` written by tools/cluster_domains.py."""
MANIFEST_FILE = "manifest.json"
CENTROIDS_FILE = "centroids.npy"


@dataclass
class KMeansConfig:
    """How to split embeddings into (hierarchical) k-means domains."""

    num_clusters: tuple[int, ...] = (64,)
    """Clusters per level: (k,) is flat k-means, (k1, k2[, k3]) clusters each cluster again, k1*k2*k3 leaves."""
    seed: int = 1234
    """Base seed; every sub-problem derives its own seed from it and its position in the tree."""
    algorithm: str = "auto"
    """"kmeans" (sklearn KMeans), "minibatch" (MiniBatchKMeans) or "auto" (minibatch above minibatch_threshold points)."""
    minibatch_threshold: int = 50_000
    """With algorithm="auto", sub-problems with more points than this use MiniBatchKMeans."""
    n_init: int = 3
    """k-means++ restarts per sub-problem (best inertia kept)."""
    max_iter: int = 300
    """Maximum Lloyd iterations (KMeans) or epochs over the data (MiniBatchKMeans)."""
    batch_size: int = 4096
    """Mini-batch size for MiniBatchKMeans."""

    def __post_init__(self):
        self.num_clusters = tuple(self.num_clusters)
        if not self.num_clusters or any(not isinstance(k, (int, np.integer)) or k < 1 for k in self.num_clusters):
            raise ConfigError(
                f"--num-clusters {list(self.num_clusters)}: need one or more integers >= 1, e.g. 64 or 8 8 8"
            )
        if len(self.num_clusters) > 4:
            raise ConfigError(f"--num-clusters {list(self.num_clusters)}: at most 4 levels are supported")
        if self.algorithm not in ("auto", "kmeans", "minibatch"):
            raise ConfigError(f"--kmeans-algorithm {self.algorithm!r}: choose auto, kmeans or minibatch")
        for name in ("minibatch_threshold", "n_init", "max_iter", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"KMeansConfig.{name}={getattr(self, name)!r}; must be >= 1")

    @property
    def num_leaves(self) -> int:
        """Maximum number of leaf domains, the product of ``num_clusters``."""
        return int(np.prod(self.num_clusters))


@dataclass
class ClusterResult:
    """Output of :func:`hierarchical_kmeans` (flat k-means is the one-level case).

    Attributes:
        labels: (n,) int64, index into ``names`` of each document's leaf domain.
        names: Names of the non-empty leaf domains, in canonical (lexicographic tree) order.
        centroids: (K, d) float32, mean embedding of each leaf, aligned with ``names``.
        counts: (K,) int64 documents per leaf.
        levels: Non-empty node names per level (the last level is ``names``).
        parents: Parent name of every node below the top level.
        empty: Names of clusters (at any level) that received no document.
    """

    labels: np.ndarray
    names: list[str]
    centroids: np.ndarray
    counts: np.ndarray
    levels: list[list[str]] = field(default_factory=list)
    parents: dict[str, str] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)


def _check_embeddings(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1:
        raise DataError(f"{what}: expected a 2-D (n_docs, dim) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DataError(
            f"{what}: embeddings contain NaN/Inf (rows {np.flatnonzero(~np.isfinite(x).all(1))[:5].tolist()})"
        )
    return x


def _node_seed(base: int, path: tuple[int, ...]) -> int:
    # Independent, reproducible streams per tree node regardless of visiting order.
    return int(np.random.SeedSequence([base, len(path), *path]).generate_state(1)[0])


def kmeans(x: np.ndarray, k: int, seed: int, config: KMeansConfig | None = None) -> np.ndarray:
    """Cluster rows of ``x`` into at most ``k`` groups.

    With ``n <= k`` points every distinct point gets its own cluster (what
    k-means converges to) without calling the solver.

    Returns:
        (n,) int64 labels in ``[0, k)``; some labels may be unused (empty clusters).
    """
    cfg = config or KMeansConfig()
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n <= k:
        _, inverse = np.unique(x, axis=0, return_inverse=True)
        return inverse.reshape(-1).astype(np.int64)
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    use_mb = cfg.algorithm == "minibatch" or (cfg.algorithm == "auto" and n > cfg.minibatch_threshold)
    if use_mb:
        est = MiniBatchKMeans(
            n_clusters=k,
            random_state=seed,
            n_init=cfg.n_init,
            max_iter=cfg.max_iter,
            batch_size=min(cfg.batch_size, n),
            reassignment_ratio=0.01,
        )
    else:
        est = KMeans(n_clusters=k, random_state=seed, n_init=cfg.n_init, max_iter=cfg.max_iter)
    with warnings.catch_warnings(record=True) as caught:
        # Fewer distinct points than k triggers a ConvergenceWarning; the resulting
        # empty clusters are reported by the caller, so keep the log clean.
        warnings.simplefilter("always", ConvergenceWarning)
        labels = est.fit_predict(x.astype(np.float32, copy=False))
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return labels.astype(np.int64)


def _name(prefix: str, idx: int, k: int) -> str:
    width = max(2, len(str(k - 1)))
    return f"{prefix}_{idx:0{width}d}" if prefix else f"c{idx:0{width}d}"


def hierarchical_kmeans(x: np.ndarray, config: KMeansConfig, show_progress: bool = True) -> ClusterResult:
    """Cluster, then cluster each cluster, for every level of ``config.num_clusters``.

    Args:
        x: (n, d) embeddings.
        config: Levels, seed and solver choice.
        show_progress: Show a tqdm bar over the sub-problems of each level.

    Returns:
        A :class:`ClusterResult` with leaves in canonical order.

    Raises:
        DataError: No documents, or fewer documents than leaf domains requested.
    """
    from tqdm import tqdm

    x = _check_embeddings(x, "hierarchical_kmeans")
    n = x.shape[0]
    ks = config.num_clusters
    if n == 0:
        raise DataError("no documents to cluster: the input files contain no non-blank jsonl line")
    if n < config.num_leaves:
        raise DataError(
            f"{n} documents cannot fill --num-clusters {' '.join(map(str, ks))} = {config.num_leaves} domains; "
            f"add documents or lower --num-clusters to at most {n} leaves"
        )
    # Each node: (name, tree path, member row indices). The root has an empty name.
    nodes: list[tuple[str, tuple[int, ...], np.ndarray]] = [("", (), np.arange(n))]
    levels: list[list[str]] = []
    parents: dict[str, str] = {}
    empty: list[str] = []
    for depth, k in enumerate(ks):
        children: list[tuple[str, tuple[int, ...], np.ndarray]] = []
        bar = tqdm(
            nodes,
            desc=f"k-means level {depth + 1}/{len(ks)} (k={k})",
            unit="node",
            disable=not show_progress or len(nodes) < 2,
            mininterval=1.0,
        )
        for name, path, idx in bar:
            labels = kmeans(x[idx], k, _node_seed(config.seed, path), config)
            order = np.argsort(labels, kind="stable")
            bounds = np.searchsorted(labels[order], np.arange(k + 1))
            for c in range(k):
                child = _name(name, c, k)
                members = idx[order[bounds[c] : bounds[c + 1]]]
                if members.size == 0:
                    empty.append(child)
                    continue
                if name:
                    parents[child] = name
                children.append((child, path + (c,), members))
        nodes = children
        levels.append([c[0] for c in nodes])
    if empty:
        logger.warning(
            "%d clusters received no document and are left out: %s%s",
            len(empty),
            empty[:10],
            " ..." if len(empty) > 10 else "",
        )
    labels = np.empty(n, dtype=np.int64)
    counts = np.empty(len(nodes), dtype=np.int64)
    for j, (_, _, members) in enumerate(nodes):
        labels[members] = j
        counts[j] = members.size
    centroids = mean_centroids(x, labels, len(nodes))
    return ClusterResult(
        labels=labels, names=levels[-1], centroids=centroids, counts=counts, levels=levels, parents=parents, empty=empty
    )


def mean_centroids(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean embedding of each group (float64 accumulation), as float32 (k, d).

    Raises:
        DataError: A group has no member (its mean is undefined).
    """
    x = _check_embeddings(x, "mean_centroids")
    counts = np.bincount(labels, minlength=k)
    if counts.shape[0] != k or np.any(counts == 0):
        raise DataError(
            f"mean_centroids: groups {np.flatnonzero(counts[:k] == 0)[:10].tolist()} have no member; every domain needs >= 1 document"
        )
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x.astype(np.float64, copy=False))
    return (sums / counts[:, None]).astype(np.float32)


def assign_nearest(x: np.ndarray, centroids: np.ndarray, max_chunk_bytes: int = 256 << 20) -> np.ndarray:
    """Index of the nearest centroid (Euclidean; ties -> lowest index) for every row of ``x``.

    Processed in row chunks so that the (chunk, K) distance block stays under
    ``max_chunk_bytes`` even with hundreds of thousands of centroids.

    Raises:
        DataError: Dimension mismatch between ``x`` and ``centroids``, or no centroid.
    """
    x = _check_embeddings(x, "assign_nearest (documents)")
    c = _check_embeddings(centroids, "assign_nearest (centroids)")
    if c.shape[0] == 0:
        raise DataError("assign_nearest: no centroid to assign to")
    if x.shape[1] != c.shape[1]:
        raise DataError(
            f"embedding dim {x.shape[1]} != centroid dim {c.shape[1]}; embed with the embedder saved beside the centroids"
        )
    c = c.astype(np.float32, copy=False)
    c_sq = np.einsum("ij,ij->i", c, c)
    rows = max(1, int(max_chunk_bytes // (4 * c.shape[0])))
    out = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], rows):
        xb = x[s : s + rows].astype(np.float32, copy=False)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row, so it is dropped.
        d = c_sq[None, :] - 2.0 * (xb @ c.T)
        out[s : s + rows] = np.argmin(d, axis=1)
    return out


def histogram(labels: np.ndarray, k: int) -> np.ndarray:
    """Counts per domain, (k,) int64."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"labels outside [0, {k}): min {labels.min()}, max {labels.max()}")
    return np.bincount(labels, minlength=k).astype(np.int64)


def smooth_distribution(counts: np.ndarray, eps: float = 0.0, mode: str = "uniform") -> np.ndarray:
    """Normalise counts to a distribution, with optional smoothing (formulas in the module docstring).

    Args:
        counts: (K,) non-negative counts.
        eps: Smoothing amount: a probability mass in [0, 1] for ``"uniform"``,
            a pseudo-count >= 0 for ``"laplace"``.
        mode: ``"uniform"`` or ``"laplace"``.

    Returns:
        float64 (K,) on the simplex.

    Raises:
        ConfigError: Bad ``eps``/``mode``.
        DataError: All counts are zero and there is no smoothing to fall back on.
    """
    if mode not in SMOOTHING_MODES:
        raise ConfigError(f"--smoothing-mode {mode!r}: choose one of {list(SMOOTHING_MODES)}")
    eps = float(eps)
    if not np.isfinite(eps) or eps < 0 or (mode == "uniform" and eps > 1):
        limit = "in [0, 1] (a probability mass)" if mode == "uniform" else ">= 0 (a pseudo-count)"
        raise ConfigError(f"--smoothing {eps!r} with --smoothing-mode {mode}: must be {limit}")
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or np.any(c < 0):
        raise DataError(f"counts must be a non-empty 1-D array of non-negative values, got shape {c.shape}")
    k, n = c.size, c.sum()
    if n == 0:
        if eps == 0:
            raise DataError(
                "histogram is empty (0 documents); nothing to normalise, and no --smoothing to fall back on"
            )
        return np.full(k, 1.0 / k)
    if mode == "uniform":
        p = (1.0 - eps) * c / n + eps / k
    else:
        p = (c + eps) / (n + k * eps)
    return p / p.sum()  # only removes float rounding; p already sums to 1 analytically


# =========================================================================== centroid trees (shards, fine-domain maps)
# tools/cluster_domains.py --input-shards clusters millions of documents into up to 2^31 fine
# domains. The jsonl path above holds every sub-problem's labels in sklearn; this one trains each
# node's k centroids on a bounded sample with a k-means library built for the scale (faiss, or
# sklearn's MiniBatchKMeans when faiss is missing), then assigns every document level by level to
# the nearest non-empty child of its node, in chunks. New documents (tools/importance_weights.py
# --domain-map) go through the same assignment, so a corpus document re-assigned lands in its
# map domain.

TREE_FORMAT = "megatron-dga/centroid-tree-v1"
"""``format`` in the header of ``centroid_tree.npz``."""
TREE_FILE = "centroid_tree.npz"
MAX_FINE_DOMAINS = 2**31 - 1
"""Fine ids are int32 in a domain map."""
KMEANS_BACKENDS = ("auto", "faiss", "sklearn")


@dataclass
class CentroidTreeConfig:
    """How :func:`build_centroid_tree` clusters embeddings into a (hierarchical) tree of centroids."""

    num_clusters: tuple[int, ...] = (64,)
    """Clusters per level: (K,) flat, (k1, k2, k3) hierarchical; fine ids are row-major over the levels."""
    seed: int = 1234
    """Base seed; every node derives its own seed from it and its position in the tree."""
    backend: str = "auto"
    """k-means library: "faiss", "sklearn" (MiniBatchKMeans) or "auto" (faiss when installed)."""
    niter: int = 20
    """k-means iterations (faiss) / passes over the sample (MiniBatchKMeans) per node."""
    n_init: int = 3
    """k-means++ restarts per node (the lowest objective is kept): k-means++ alone still merges
    well-separated clusters now and then, and a top-level mistake misplaces whole sub-trees."""
    n_init_min_points_per_centroid: int = 32
    """Nodes trained on fewer than k * this many points run once: the thousands of small nodes
    of a deep tree dominate the run time, and a mistake there moves a handful of documents."""
    max_points_per_centroid: int = 256
    """A node trains on at most k * this many of its documents (seeded sample); all are assigned."""
    assign_chunk_bytes: int = 64 << 20
    """Bound on the (documents, children) float32 distance block of one assignment product."""

    def __post_init__(self):
        self.num_clusters = tuple(int(k) for k in self.num_clusters)
        if not self.num_clusters or any(k < 1 for k in self.num_clusters):
            raise ConfigError(
                f"--num-clusters {list(self.num_clusters)}: need one or more integers >= 1, e.g. 1024 or 64 64 64"
            )
        if self.num_leaves > MAX_FINE_DOMAINS:
            raise ConfigError(
                f"--num-clusters {' '.join(map(str, self.num_clusters))} = {self.num_leaves} fine domains, more than "
                f"the {MAX_FINE_DOMAINS} int32 ids of a domain map allow; use fewer or smaller levels"
            )
        if self.backend not in KMEANS_BACKENDS:
            raise ConfigError(f"--kmeans-backend {self.backend!r}: choose one of {list(KMEANS_BACKENDS)}")
        for name in (
            "niter",
            "n_init",
            "n_init_min_points_per_centroid",
            "max_points_per_centroid",
            "assign_chunk_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"CentroidTreeConfig.{name}={getattr(self, name)!r}; must be >= 1")

    @property
    def num_leaves(self) -> int:
        """K = the product of ``num_clusters``."""
        return int(np.prod(np.array(self.num_clusters, dtype=object)))


def _import_faiss():
    """faiss, or None when not installed; its loader's INFO lines (which CPU build it picked) are dropped."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def resolve_kmeans_backend(backend: str) -> str:
    """ "faiss" or "sklearn" for ``backend`` ("auto" picks faiss when it imports; one INFO line otherwise).

    Raises:
        ConfigError: "faiss" was asked for and is not installed.
    """
    if backend == "sklearn":
        return "sklearn"
    if _import_faiss() is None:
        if backend == "faiss":
            raise ConfigError(
                "--kmeans-backend faiss: faiss is not installed; `pip install faiss-cpu` "
                "(pinned in requirements/cpu.txt) or use --kmeans-backend sklearn"
            ) from None
        logger.info(
            "faiss is not installed: k-means runs on scikit-learn's MiniBatchKMeans (slower at scale; "
            "pip install faiss-cpu)"
        )
        return "sklearn"
    return "faiss"


class limit_threads:
    """Context manager: at most ``n`` threads in BLAS/OpenMP (numpy, scikit-learn) and faiss."""

    def __init__(self, n: int):
        self.n = int(n)
        self._limits = None
        self._faiss_before = None

    def __enter__(self):
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(limits=self.n)
        faiss = _import_faiss()
        if faiss is None:
            return self
        self._faiss_before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self._faiss_before is not None:
            import faiss

            faiss.omp_set_num_threads(self._faiss_before)
        self._limits.restore_original_limits()


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds (Arthur & Vassilvitskii; 2 + ln k candidates per step, as scikit-learn).

    Our own few lines rather than ``sklearn.cluster.kmeans_plusplus``, whose per-call overhead
    (about 30 ms) dominated the thousands of small nodes of a 64 x 64 x 64 tree.

    Returns:
        float32 (k, d) rows of ``x`` (``k <= len(x)``).
    """
    n = x.shape[0]
    trials = 2 + int(np.log(k))
    sq = np.einsum("ij,ij->i", x, x)
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    first = int(rng.integers(n))
    centers[0] = x[first]
    closest = np.maximum(sq + sq[first] - 2.0 * (x @ x[first]), 0.0)
    for c in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # every point sits on a centre (duplicates): any point will do
            cand = rng.integers(n, size=trials)
        else:
            cand = np.minimum(np.searchsorted(np.cumsum(closest), rng.random(trials) * total), n - 1)
        dist = np.maximum(sq[cand][:, None] + sq[None, :] - 2.0 * (x[cand] @ x.T), 0.0)  # (trials, n)
        dist = np.minimum(dist, closest[None, :])
        best = int(np.argmin(dist.sum(axis=1)))
        centers[c] = x[cand[best]]
        closest = dist[best]
    return centers


def train_centroids(x: np.ndarray, k: int, seed: int, backend: str, config: CentroidTreeConfig) -> np.ndarray:
    """At most ``k`` k-means centroids of the rows of ``x``, float32 ``(u, d)``, ``u <= k``.

    With ``n <= k`` points each distinct point is its own centroid (what k-means converges to),
    in lexicographic order, without calling a solver. Otherwise the solver trains on a seeded
    sample of at most ``k * max_points_per_centroid`` points.
    """
    n = x.shape[0]
    if n <= k:
        return np.unique(x, axis=0).astype(np.float32)
    cap = k * config.max_points_per_centroid
    if n > cap:
        x = x[np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if backend == "faiss":
        faiss = _import_faiss()
        # faiss starts from random points, which often merges well-separated clusters; k-means++
        # seeds (on a smaller sample: its cost grows with k^2) avoid that, as sklearn does.
        rng = np.random.default_rng(seed)
        restarts = config.n_init if x.shape[0] >= config.n_init_min_points_per_centroid * k else 1
        threads = faiss.omp_get_max_threads()
        # OpenMP start-up costs more than a small node's whole k-means on a busy machine.
        faiss.omp_set_num_threads(1 if x.shape[0] * k < (1 << 20) else threads)
        best, best_obj = None, np.inf
        try:
            for _ in range(restarts):
                init = kmeans_plusplus(
                    x[np.sort(rng.choice(x.shape[0], size=min(x.shape[0], 16 * k), replace=False))], k, rng
                )
                # The sample is bounded above; min_points_per_centroid=1 keeps faiss quiet on small nodes.
                km = faiss.Kmeans(
                    x.shape[1],
                    k,
                    niter=config.niter,
                    seed=seed % (2**31),
                    verbose=False,
                    min_points_per_centroid=1,
                    max_points_per_centroid=cap + 1,
                )
                obj = km.train(x, init_centroids=init)
                if obj < best_obj:
                    best, best_obj = km.centroids, obj
        finally:
            faiss.omp_set_num_threads(threads)
        return np.asarray(best, dtype=np.float32)
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    est = MiniBatchKMeans(
        n_clusters=k,
        random_state=seed % (2**32),
        n_init=config.n_init,
        max_iter=config.niter,
        batch_size=min(4096, x.shape[0]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate points: empty clusters are expected
        est.fit(x)
    return est.cluster_centers_.astype(np.float32)


@dataclass
class CentroidTree:
    """The centroids of a (hierarchical) k-means tree, and what its corpus put in every node.

    Level ``l`` has ``prod(levels[:l + 1])`` nodes, numbered row-major (node ``p`` of level
    ``l - 1`` has children ``p * k + c``, ``c < k = levels[l]``), so the nodes of the last level
    are the fine domains of a domain map. A document descends from the root, at each level to
    the nearest (Euclidean) *non-empty* child of its node; ties go to the lowest index.

    Attributes:
        levels: Clusters per level.
        centroids: Per level, float32 ``(nodes, dim)``; rows of empty nodes are zero (never chosen).
        counts: Per level, int64 ``(nodes,)``: documents of the clustered corpus in each node.
        tree_id: Random id written with the tree and into the map, so a map never reads another
            run's tree.
    """

    levels: list[int]
    centroids: list[np.ndarray]
    counts: list[np.ndarray]
    tree_id: str = ""

    @property
    def dim(self) -> int:
        return int(self.centroids[0].shape[1])

    @property
    def num_leaves(self) -> int:
        return int(self.counts[-1].shape[0])

    def assign_level(
        self,
        x: np.ndarray,
        parents: np.ndarray | None,
        level: int,
        valid: np.ndarray | None = None,
        chunk_bytes: int = 64 << 20,
    ) -> np.ndarray:
        """Node of ``level`` for every row of ``x``: the nearest valid child of its node ``parents``.

        Rows are grouped by parent (one stable sort) and each group is compared with its own k
        children in one matrix product, in row chunks that keep the (rows, k) distance block
        under ``chunk_bytes``.

        Args:
            x: (n, dim) float32 embeddings.
            parents: (n,) node ids at ``level - 1`` (None at level 0).
            level: The level to assign.
            valid: Boolean mask of the nodes of ``level`` that may be chosen (default: non-empty ones).
            chunk_bytes: Bound on the distance block of one product.

        Returns:
            (n,) int64 node ids at ``level``.
        """
        cents = self.centroids[level]
        valid = self.counts[level] > 0 if valid is None else valid
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every candidate of a row.
        bias = np.where(valid, np.einsum("ij,ij->i", cents, cents), np.inf).astype(np.float32)
        k, n = self.levels[level], x.shape[0]
        out = np.empty(n, dtype=np.int64)
        if parents is None:
            order, groups, bounds = None, np.zeros(1, np.int64), np.array([0, n])
        else:
            order = np.argsort(parents, kind="stable")
            ordered = parents[order]
            bounds = np.concatenate([np.flatnonzero(np.diff(ordered)) + 1, [n]])
            bounds = np.concatenate([[0], bounds]) if n else np.zeros(1, np.int64)
            groups = ordered[bounds[:-1]]
        step = max(1, chunk_bytes // (4 * k))
        for p, a, b in zip(groups, bounds[:-1], bounds[1:]):
            children = slice(int(p) * k, int(p) * k + k)
            for s in range(a, b, step):
                rows = slice(s, min(b, s + step)) if order is None else order[s : min(b, s + step)]
                nearest = np.argmin(bias[children][None, :] - 2.0 * (x[rows] @ cents[children].T), axis=1)
                out[rows] = int(p) * k + nearest
        return out

    def assign(self, x: np.ndarray, chunk_bytes: int = 64 << 20) -> np.ndarray:
        """Fine id (node of the last level) of every row of ``x``, int64 ``(n,)``."""
        x = _check_embeddings(x, "CentroidTree.assign (documents)").astype(np.float32, copy=False)
        if x.shape[1] != self.dim:
            raise DataError(
                f"embedding dim {x.shape[1]} != centroid dim {self.dim}; embed with the embedder saved "
                "beside the centroids"
            )
        ids = None
        for level in range(len(self.levels)):
            ids = self.assign_level(x, ids, level, chunk_bytes=chunk_bytes)
        return ids

    # -- persistence ---------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write ``<directory>/centroid_tree.npz`` atomically (header JSON + centroids/counts per level)."""
        header = {"format": TREE_FORMAT, "levels": list(self.levels), "dim": self.dim, "tree_id": self.tree_id}
        arrays = {"header": np.array(json.dumps(header))}
        for level, (c, n) in enumerate(zip(self.centroids, self.counts)):
            arrays[f"centroids_{level}"] = np.asarray(c, dtype=np.float32)
            arrays[f"counts_{level}"] = np.asarray(n, dtype=np.int64)
        atomic_write(os.path.join(directory, TREE_FILE), lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, directory: str) -> "CentroidTree":
        """Read a tree written by :meth:`save`.

        Raises:
            DataError: naming the file: missing, unreadable, wrong format or inconsistent shapes.
        """
        path = os.path.join(directory, TREE_FILE)
        fix = "re-run tools/cluster_domains.py --input-shards ... --output-map ..."
        if not os.path.isfile(path):
            raise DataError(f"no centroid tree at {path}: the map's clusters directory is incomplete; {fix}")
        try:
            with load_npz(path) as z:
                header = json.loads(str(z["header"][()]))
                tag = header.get("format") if isinstance(header, dict) else None
                if tag != TREE_FORMAT:
                    raise DataError(f"{path}: not a centroid tree (format {tag!r}, expected {TREE_FORMAT!r}); {fix}")
                levels = [int(k) for k in header["levels"]]
                cents = [z[f"centroids_{level}"] for level in range(len(levels))]
                counts = [z[f"counts_{level}"].astype(np.int64) for level in range(len(levels))]
        except DataError:
            raise
        except (*NPZ_READ_ERRORS, KeyError) as e:
            raise DataError(f"cannot read centroid tree {path} ({e}); {fix}") from None
        nodes = 1
        for level, k in enumerate(levels):
            nodes *= k
            if cents[level].ndim != 2 or cents[level].shape[0] != nodes or counts[level].shape != (nodes,):
                raise DataError(
                    f"{path}: level {level} has centroids {cents[level].shape} and counts "
                    f"{counts[level].shape}, expected {nodes} nodes; the file is corrupt: {fix}"
                )
        return cls(
            levels=levels,
            centroids=[c.astype(np.float32) for c in cents],
            counts=counts,
            tree_id=str(header.get("tree_id", "")),
        )


def build_centroid_tree(
    x: np.ndarray,
    config: CentroidTreeConfig,
    show_progress: bool | None = None,
) -> tuple[CentroidTree, np.ndarray]:
    """Cluster ``x`` level by level into a :class:`CentroidTree`; return it and every row's fine id.

    Level 1 trains on a sample of all documents; every non-empty node of a level is then
    clustered into the next level's k children on (a sample of) its own documents. A node with
    fewer distinct documents than k leaves some children empty (allowed: the map then has empty
    fine domains). After each level every document is assigned, in chunks, with
    :meth:`CentroidTree.assign_level`, the same function that assigns new documents later.

    Args:
        x: (n, dim) float32 embeddings of the whole corpus.
        config: Levels, seed, k-means backend.
        show_progress: tqdm on a TTY / log lines (None), always off (False).

    Returns:
        ``(tree, fine_ids)`` with ``fine_ids`` int64 ``(n,)`` in ``[0, num_leaves)``.

    Raises:
        DataError: Fewer documents than the first level's clusters.
    """
    from megatron_dga.prep.progress import Progress

    x = _check_embeddings(x, "build_centroid_tree").astype(np.float32, copy=False)
    n, dim = x.shape
    ks = config.num_clusters
    if n < ks[0]:
        raise DataError(
            f"{n} documents cannot fill the {ks[0]} clusters of the first level of --num-clusters "
            f"{' '.join(map(str, ks))}; lower the first level to at most {n}"
        )
    backend = resolve_kmeans_backend(config.backend)
    tree = CentroidTree(levels=list(ks), centroids=[], counts=[])
    parents: np.ndarray | None = None
    num_parents = 1
    for level, k in enumerate(ks):
        cents = np.zeros((num_parents * k, dim), dtype=np.float32)
        trained = np.zeros(num_parents * k, dtype=bool)
        if parents is None:
            order, bounds, nonempty = np.arange(n), np.array([0, n]), np.array([0])
        else:
            order = np.argsort(parents, kind="stable")
            bounds = np.searchsorted(parents[order], np.arange(num_parents + 1))
            nonempty = np.flatnonzero(np.diff(bounds) > 0)
        with Progress(
            len(nonempty),
            f"k-means level {level + 1}/{len(ks)} (k={k}, {backend})",
            unit="node",
            enabled=show_progress if len(nonempty) > 1 else False,
        ) as bar:
            for p in nonempty:
                members = order[bounds[p] : bounds[p + 1]]
                seed = _node_seed(config.seed, (level, int(p)))
                cap = k * config.max_points_per_centroid
                if members.size > cap:  # sample the ids, not the rows: level 1 would copy every embedding
                    members = members[np.sort(np.random.default_rng(seed).choice(members.size, cap, replace=False))]
                c = train_centroids(x[members], k, seed, backend, config)
                cents[p * k : p * k + c.shape[0]] = c
                trained[p * k : p * k + c.shape[0]] = True
                bar.update(1)
        tree.centroids.append(cents)
        tree.counts.append(np.zeros(num_parents * k, dtype=np.int64))  # filled below
        with Progress(n, f"assign level {level + 1}/{len(ks)}", enabled=show_progress) as bar:
            ids = np.empty(n, dtype=np.int64)
            step = 1 << 18  # large: assign_level loops over the parents inside each step
            for s in range(0, n, step):
                ids[s : s + step] = tree.assign_level(
                    x[s : s + step],
                    None if parents is None else parents[s : s + step],
                    level,
                    valid=trained,
                    chunk_bytes=config.assign_chunk_bytes,
                )
                bar.update(min(step, n - s))
        tree.counts[level] = np.bincount(ids, minlength=num_parents * k).astype(np.int64)
        # Nodes nobody chose were never the argmin, so masking them (counts > 0) for new documents
        # gives the corpus documents the same assignment.
        cents[tree.counts[level] == 0] = 0.0
        parents, num_parents = ids, num_parents * k
    return tree, parents
