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

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from megatron_dga.errors import ConfigError, DataError

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
            raise ConfigError(f"--num-clusters {list(self.num_clusters)}: need one or more integers >= 1, e.g. 64 or 8 8 8")
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
        raise DataError(f"{what}: embeddings contain NaN/Inf (rows {np.flatnonzero(~np.isfinite(x).all(1))[:5].tolist()})")
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
            n_clusters=k, random_state=seed, n_init=cfg.n_init, max_iter=cfg.max_iter,
            batch_size=min(cfg.batch_size, n), reassignment_ratio=0.01,
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
        bar = tqdm(nodes, desc=f"k-means level {depth + 1}/{len(ks)} (k={k})", unit="node",
                   disable=not show_progress or len(nodes) < 2, mininterval=1.0)
        for name, path, idx in bar:
            labels = kmeans(x[idx], k, _node_seed(config.seed, path), config)
            order = np.argsort(labels, kind="stable")
            bounds = np.searchsorted(labels[order], np.arange(k + 1))
            for c in range(k):
                child = _name(name, c, k)
                members = idx[order[bounds[c]:bounds[c + 1]]]
                if members.size == 0:
                    empty.append(child)
                    continue
                if name:
                    parents[child] = name
                children.append((child, path + (c,), members))
        nodes = children
        levels.append([c[0] for c in nodes])
    if empty:
        logger.warning("%d clusters received no document and are left out: %s%s",
                       len(empty), empty[:10], " ..." if len(empty) > 10 else "")
    labels = np.empty(n, dtype=np.int64)
    counts = np.empty(len(nodes), dtype=np.int64)
    for j, (_, _, members) in enumerate(nodes):
        labels[members] = j
        counts[j] = members.size
    centroids = mean_centroids(x, labels, len(nodes))
    return ClusterResult(labels=labels, names=levels[-1], centroids=centroids, counts=counts,
                         levels=levels, parents=parents, empty=empty)


def mean_centroids(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean embedding of each group (float64 accumulation), as float32 (k, d).

    Raises:
        DataError: A group has no member (its mean is undefined).
    """
    x = _check_embeddings(x, "mean_centroids")
    counts = np.bincount(labels, minlength=k)
    if counts.shape[0] != k or np.any(counts == 0):
        raise DataError(f"mean_centroids: groups {np.flatnonzero(counts[:k] == 0)[:10].tolist()} have no member; every domain needs >= 1 document")
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
        xb = x[s:s + rows].astype(np.float32, copy=False)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row, so it is dropped.
        d = c_sq[None, :] - 2.0 * (xb @ c.T)
        out[s:s + rows] = np.argmin(d, axis=1)
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
            raise DataError("histogram is empty (0 documents); nothing to normalise, and no --smoothing to fall back on")
        return np.full(k, 1.0 / k)
    if mode == "uniform":
        p = (1.0 - eps) * c / n + eps / k
    else:
        p = (c + eps) / (n + k * eps)
    return p / p.sum()  # only removes float rounding; p already sums to 1 analytically
